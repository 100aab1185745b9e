"""The checkpoint loader on files generated in temporary folders: single and sharded safetensors, torch pickles,
preference order, header-only reads, damaged files, strict key checks, rename tables, dtype casts, and the Hub error
messages."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minidit import weights
from minidit.errors import MiniditError
from minidit.weights import (
    DROP,
    find_weights,
    key_report,
    load_file,
    load_folder,
    load_into,
    rename,
    safetensors_header,
    shared,
    split,
    swap_halves,
    weight_and_bias,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "dit"


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "b.weight": torch.randn(2, 4, generator=g), "b.bias": torch.randn(2, generator=g),
            "steps": torch.arange(5, dtype=torch.int64)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def write_sharded(folder: Path, sd: dict[str, torch.Tensor], groups: list[list[str]], *,
                  name: str = "diffusion_pytorch_model", total: int | None = None) -> Path:
    """Shards named as the Hub names them, plus `<name>.safetensors.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        shard = f"{name}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k] for k in keys}, folder / shard)
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": nbytes(sd) if total is None else total}, "weight_map": weight_map}
    path = folder / f"{name}.safetensors.index.json"
    path.write_text(json.dumps(index))
    return path


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2)
        self.register_buffer("steps", torch.zeros(5, dtype=torch.int64))


def meta_small() -> Small:
    with torch.device("meta"):
        return Small()


# ---- reading files -------------------------------------------------------------------------------------------

def test_single_safetensors(tmp_path):
    sd = tensors()
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    assert find_weights(tmp_path) == tmp_path / "diffusion_pytorch_model.safetensors"
    assert_same(load_folder(tmp_path), sd)


def test_transformers_file_name(tmp_path):
    sd = tensors()
    save_file(sd, tmp_path / "model.safetensors")
    assert_same(load_folder(tmp_path), sd)


def test_sharded_reads_every_shard_exactly_once(tmp_path, monkeypatch):
    sd = tensors()
    write_sharded(tmp_path, sd, [["a.weight", "steps"], ["a.bias", "b.weight"], ["b.bias"]])
    reads = []
    real_load_file = weights.load_file
    monkeypatch.setattr(weights, "load_file",
                        lambda path, dtype=None: reads.append(Path(path).name) or real_load_file(path, dtype))
    assert_same(load_folder(tmp_path), sd)
    assert sorted(reads) == [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_sharded_fixture_matches_its_single_file_twin():
    sharded = FIXTURES / "sharded" / "transformer"
    index = json.loads((sharded / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sd = load_folder(sharded)
    assert index["metadata"]["total_size"] == nbytes(sd)
    assert_same(sd, load_folder(FIXTURES / "single" / "transformer"))


def test_sharded_total_size_is_checked(tmp_path):
    sd = tensors()
    write_sharded(tmp_path, sd, [["a.weight", "a.bias", "steps"], ["b.weight", "b.bias"]], total=nbytes(sd) + 4)
    with pytest.raises(MiniditError, match=f"{nbytes(sd) + 4} bytes.*{nbytes(sd)}"):
        load_folder(tmp_path)


def test_shard_holding_other_tensors_than_its_index_lists(tmp_path):
    sd = tensors()
    path = write_sharded(tmp_path, sd, [["a.weight", "a.bias", "steps"], ["b.weight", "b.bias"]])
    index = json.loads(path.read_text())
    index["weight_map"]["b.bias"] = index["weight_map"]["a.weight"]  # listed in the wrong shard
    path.write_text(json.dumps(index))
    with pytest.raises(MiniditError, match="does not hold the tensors its index lists"):
        load_folder(tmp_path)


def test_corrupt_shard_index(tmp_path):
    write_sharded(tmp_path, tensors(), [["a.weight", "a.bias", "steps", "b.weight", "b.bias"]])
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(index.read_text()[:-10])
    with pytest.raises(MiniditError, match="not valid JSON"):
        load_folder(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    write_sharded(tmp_path, tensors(), [["a.weight", "a.bias", "steps"], ["b.weight", "b.bias"]])
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MiniditError, match="00002-of-00002.safetensors is missing"):
        load_folder(tmp_path)


def test_bin_is_read_with_weights_only(tmp_path):
    sd = tensors()
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    assert find_weights(tmp_path).name == "diffusion_pytorch_model.bin"
    assert_same(load_folder(tmp_path), sd)


class NotATensor:
    """Unpickling this needs arbitrary code: a weights_only load must refuse it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"a.weight": torch.zeros(1), "payload": NotATensor()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(MiniditError, match="could not be read as a PyTorch checkpoint"):
        load_folder(tmp_path)


def test_training_checkpoint_ema_is_taken(tmp_path):
    sd = tensors()
    torch.save({"model": tensors(1), "ema": sd, "opt": {}}, tmp_path / "ckpt.pt")
    assert_same(load_file(tmp_path / "ckpt.pt"), sd)


def test_safetensors_preferred_over_bin(tmp_path):
    save_file(tensors(0), tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save(tensors(1), tmp_path / "diffusion_pytorch_model.bin")
    assert find_weights(tmp_path).suffix == ".safetensors"
    assert_same(load_folder(tmp_path), tensors(0))


def test_sharded_safetensors_preferred_over_bin(tmp_path):
    write_sharded(tmp_path, tensors(0), [["a.weight", "a.bias", "steps"], ["b.weight", "b.bias"]])
    torch.save(tensors(1), tmp_path / "diffusion_pytorch_model.bin")
    assert find_weights(tmp_path).name == "diffusion_pytorch_model.safetensors.index.json"
    assert_same(load_folder(tmp_path), tensors(0))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MiniditError, match="holds no weights"):
        load_folder(tmp_path)
    with pytest.raises(MiniditError, match="does not exist"):
        load_folder(tmp_path / "nowhere")


def test_header_only_names_dtypes_shapes(tmp_path, monkeypatch):
    sd = {"x": torch.zeros(3, 5), "h": torch.zeros(2, dtype=torch.float16),
          "b": torch.zeros(4, 1, 2, dtype=torch.bfloat16), "i": torch.zeros(7, dtype=torch.int64), "s": torch.zeros(())}
    path = tmp_path / "m.safetensors"
    save_file(sd, path, metadata={"format": "pt"})
    import safetensors
    import safetensors.torch

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("the header check must not read tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", no_tensor_reads)
    monkeypatch.setattr(safetensors, "safe_open", no_tensor_reads)
    assert safetensors_header(path) == {"x": ("F32", (3, 5)), "h": ("F16", (2,)), "b": ("BF16", (4, 1, 2)),
                                        "i": ("I64", (7,)), "s": ("F32", ())}


def test_header_of_the_fixture_shards():
    shards = sorted((FIXTURES / "sharded" / "transformer").glob("*.safetensors"))
    names = {}
    for shard in shards:
        names.update(safetensors_header(shard))
    assert len(names) == 44 and all(dtype == "F32" for dtype, _ in names.values())
    assert names["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] == ("F32", (1001, 16))


@pytest.mark.parametrize("keep", [4, 100, -1])
def test_truncated_safetensors(tmp_path, keep):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(MiniditError, match="truncated") as info:
        load_folder(tmp_path)
    assert str(path) in str(info.value) and "download it again" in str(info.value)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"<html>404 not found</html>" * 10)
    with pytest.raises(MiniditError, match="not a safetensors file"):
        load_file(path)


def test_corrupt_safetensors_header(tmp_path):
    path = tmp_path / "m.safetensors"
    body = b"{not json" + b" " * 7
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(MiniditError, match="corrupt safetensors header"):
        safetensors_header(path)


def test_truncated_bin(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(tensors(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MiniditError, match="could not be read as a PyTorch checkpoint"):
        load_folder(tmp_path)


# ---- strict loading --------------------------------------------------------------------------------------------

def test_load_into_strict_and_exact():
    model, sd = meta_small(), tensors()
    load_into(model, sd, dtype=torch.float32, device="cpu", source="test")
    assert_same(model.state_dict(), sd)


def test_missing_key_is_named():
    sd = tensors()
    del sd["b.bias"]
    with pytest.raises(MiniditError, match=r"1 missing \(e\.g\. b\.bias\)"):
        load_into(meta_small(), sd, dtype=torch.float32, device="cpu", source="ckpt.safetensors")


def test_unexpected_key_is_named():
    sd = {**tensors(), "c.weight": torch.zeros(1)}
    with pytest.raises(MiniditError, match=r"1 unexpected \(e\.g\. c\.weight\)") as info:
        load_into(meta_small(), sd, dtype=torch.float32, device="cpu", source="ckpt.safetensors")
    assert "ckpt.safetensors" in str(info.value) and "Small" in str(info.value)


def test_misshaped_key_is_named_with_both_shapes():
    sd = {**tensors(), "a.weight": torch.zeros(3, 4)}
    with pytest.raises(MiniditError, match=r"a\.weight: expected \(4, 3\), found \(3, 4\)"):
        load_into(meta_small(), sd, dtype=torch.float32, device="cpu", source="ckpt")


def test_key_report_lists_everything():
    assert key_report({"a": (1,), "b": (2,)}, {"a": (1,), "b": (2,)}) == []
    report = key_report({"a": (1,), "b": (2,), "c": (3,)}, {"a": (1,), "b": (5,), "d": (1,)})
    assert report == ["1 missing (e.g. c)", "1 unexpected (e.g. d)",
                      "1 with the wrong shape (e.g. b: expected (2,), found (5,))"]


TABLE = {  # every operation of the rename language once; "{i}" over 2 blocks
    **weight_and_bias({"blocks.{i}.qkv": split("layers.{i}.to_{}", "q", "k", "v")}),
    "blocks.{i}.linear1.weight": split("layers.{i}.{}", "q", "mlp", sizes=(1, 2)),
    "final.mod.weight": swap_halves("norm_out.weight"),
    "embed.weight": shared("layers.{i}.embed.weight"),
    "blocks.{i}.scale": "layers.{i}.weight",
    "pos_embed": DROP,
}


def original_layout(g: torch.Generator) -> dict[str, torch.Tensor]:
    sd = {f"blocks.{i}.{name}": torch.randn(shape, generator=g) for i in range(2)
          for name, shape in (("qkv.weight", (6, 2)), ("qkv.bias", (6,)), ("linear1.weight", (3, 2)), ("scale", (2,)))}
    return sd | {"final.mod.weight": torch.randn(4, 2, generator=g), "embed.weight": torch.randn(5, 2, generator=g),
                 "pos_embed": torch.randn(1, 4, 2, generator=g)}


def test_rename_table_operations():
    sd = original_layout(torch.Generator().manual_seed(0))
    out = rename(sd, TABLE, blocks={"i": range(2)}, source="x")
    assert len(out) == 2 * (6 + 2 + 1 + 1) + 1
    for i in range(2):
        for param in ("weight", "bias"):
            q, k, v = (out[f"layers.{i}.to_{n}.{param}"] for n in "qkv")
            assert torch.equal(torch.cat([q, k, v]), sd[f"blocks.{i}.qkv.{param}"]) and len(q) == 2
        assert torch.equal(out[f"layers.{i}.q"], sd[f"blocks.{i}.linear1.weight"][:1])
        assert torch.equal(out[f"layers.{i}.mlp"], sd[f"blocks.{i}.linear1.weight"][1:])
        assert out[f"layers.{i}.embed.weight"] is sd["embed.weight"]  # one tensor, copied into every block by name
        assert out[f"layers.{i}.weight"] is sd[f"blocks.{i}.scale"]
    shift, scale = sd["final.mod.weight"].chunk(2)
    assert torch.equal(out["norm_out.weight"], torch.cat([scale, shift]))
    del sd["pos_embed"]  # a DROP row may be absent
    assert rename(sd, TABLE, blocks={"i": range(2)}, source="x").keys() == out.keys()


def test_rename_refuses_missing_and_unknown_tensors():
    sd = original_layout(torch.Generator().manual_seed(0))
    with pytest.raises(MiniditError, match=r"^x lacks 1 of its tensors \(e\.g\. blocks\.1\.scale\) and holds 1 "
                                           r"it should not \(e\.g\. extra\)"):
        rename({k: v for k, v in sd.items() if k != "blocks.1.scale"} | {"extra": sd["pos_embed"]}, TABLE,
               blocks={"i": range(2)}, source="x")
    with pytest.raises(MiniditError, match=r"x lacks 4 of its tensors \(e\.g\. blocks\.2\.linear1\.weight"):
        rename(sd, TABLE, blocks={"i": range(3)}, source="x")  # a config with one block more than the file
    with pytest.raises(AssertionError, match="makes layers.0.weight twice"):  # a table bug, not a user error
        rename(sd, TABLE | {"embed.weight": shared("layers.{i}.weight")}, blocks={"i": range(2)}, source="x")


def test_dit_folder_with_a_wrong_config(tmp_path):
    """Real files: the tiny weights under a config that asks for 3 layers."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (FIXTURES / "single" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    config = json.loads((FIXTURES / "single" / "transformer" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    from minidit.models.dit import load_dit

    with pytest.raises(MiniditError, match=r"missing \(e\.g\. transformer_blocks\.2\."):
        load_dit(folder)
    (folder / "config.json").write_text(json.dumps({**config, "attention_head_dim": 4}))
    with pytest.raises(MiniditError, match="wrong shape"):
        load_dit(folder)
    (folder / "config.json").unlink()
    with pytest.raises(MiniditError, match="config.json is missing"):
        load_dit(folder)


@pytest.mark.parametrize("stored, target", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_dtype_cast_from_file(tmp_path, stored, target):
    sd = {k: v.to(stored) if v.is_floating_point() else v for k, v in tensors().items()}
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    assert {dtype for dtype, _ in safetensors_header(tmp_path / "diffusion_pytorch_model.safetensors").values()} == {
        {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[stored], "I64"}
    model = meta_small()
    load_into(model, load_folder(tmp_path), dtype=target, device="cpu", source="test")
    loaded = model.state_dict()
    for k, v in sd.items():
        if v.is_floating_point():
            assert loaded[k].dtype == target and torch.equal(loaded[k], v.to(target)), k
        else:
            assert loaded[k].dtype == torch.int64 and torch.equal(loaded[k], v), k  # integers are never cast


# ---- the Hub ------------------------------------------------------------------------------------------------

def http_response(status: int):
    """A response object of the HTTP library huggingface_hub's errors are built on (httpx2 in 2.4)."""
    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    request = http.Request("GET", "https://huggingface.co/api/models/facebook/DiT-XL-2-256")
    return http.Response(status, request=request)


def hub_errors():
    errors = pytest.importorskip("huggingface_hub.errors")
    return {
        "gated": (lambda: errors.GatedRepoError("403 gated", response=http_response(403)),
                  r"facebook/DiT-XL-2-256 at revision v9 is gated: accept its licence .*hf auth login"),
        "not-found": (lambda: errors.RepositoryNotFoundError("404", response=http_response(404)),
                      r"facebook/DiT-XL-2-256 was not found on the Hub"),
        "revision": (lambda: errors.RevisionNotFoundError("404 revision", response=http_response(404)),
                     r"facebook/DiT-XL-2-256 has no revision 'v9'"),
        "offline": (lambda: errors.LocalEntryNotFoundError("no cache, no network"),
                    r"cannot reach the Hugging Face Hub and facebook/DiT-XL-2-256 at revision v9 is not in the local "
                    r"cache: .*--weights DIR"),
    }


@pytest.mark.parametrize("kind", ["gated", "not-found", "revision", "offline"])
def test_download_error_messages(kind, monkeypatch):
    make_error, message = hub_errors()[kind]
    import huggingface_hub

    calls = []

    def failing_snapshot_download(*args, **kwargs):
        calls.append(kwargs)
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_snapshot_download)
    with pytest.raises(MiniditError, match=message) as info:
        weights.download("facebook/DiT-XL-2-256", revision="v9", allow_patterns=["transformer/*"])
    assert "\n" not in str(info.value)  # one line for the user
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no traceback chain to read
    assert calls and all(call.get("revision") == "v9" for call in calls)


def test_download_offline_real_call(tmp_path):
    """One real huggingface_hub call: offline, with an empty HF_HOME, in a fresh interpreter (the library reads
    HF_HUB_OFFLINE and HF_HOME at import)."""
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    code = ("import json\n"
            "from minidit.errors import MiniditError\n"
            "from minidit.weights import download\n"
            "try:\n"
            "    download('facebook/DiT-XL-2-256', allow_patterns=['transformer/config.json'])\n"
            "    print(json.dumps(['returned', '']))\n"
            "except MiniditError as e:\n"
            "    print(json.dumps(['MiniditError', str(e)]))\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    kind, message = json.loads(result.stdout.strip().splitlines()[-1])
    assert kind == "MiniditError"
    assert message.startswith("cannot reach the Hugging Face Hub and facebook/DiT-XL-2-256 is not in the local cache")
    assert "\n" not in message
    assert not any((tmp_path / "hf").rglob("config.json"))



def test_a_model_of_several_repositories_gets_one_folder(tmp_path, monkeypatch):
    """A model assembled from several Hub repositories (Open-Sora: its transformer and DeepFloyd's T5): each is
    downloaded with its own files and revision, and the model's folder links each snapshot as a sub-folder (kept
    when it is already right, moved on when the revision changes); with --download-dir it holds them."""
    import huggingface_hub.constants

    from minidit import api
    from minidit.pipelines import ModelSpec, Part

    spec = ModelSpec("two-repos", "opensora", "org/model", ("model.safetensors",), "a test model",
                     folder="transformer", parts=(Part("text_encoder", "org/t5", ("spiece.model",)),))
    calls = []

    def fake_download(repo, *, revision=None, allow_patterns=(), local_dir=None, local_copy=None):
        calls.append((repo, revision, tuple(allow_patterns), local_dir))
        assert "hf download org/model --local-dir DIR/transformer` and `hf download org/t5" in local_copy
        snapshot = Path(local_dir) if local_dir else tmp_path / "hub" / repo.replace("/", "--") / (revision or "main")
        snapshot.mkdir(parents=True, exist_ok=True)
        return snapshot

    monkeypatch.setattr(weights, "download", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = api.resolve_weights(spec, revision="v1")
    assert folder == tmp_path / "hub" / "minidit" / "two-repos"
    assert (folder / "transformer").resolve() == tmp_path / "hub" / "org--model" / "v1"
    assert (folder / "text_encoder").resolve() == tmp_path / "hub" / "org--t5" / "main"
    assert calls == [("org/model", "v1", ("model.safetensors",), None), ("org/t5", None, ("spiece.model",), None)]
    assert api.resolve_weights(spec, revision="v1") == folder  # again: the links stand
    api.resolve_weights(spec, revision="v2")
    assert (folder / "transformer").resolve() == tmp_path / "hub" / "org--model" / "v2"

    (folder / "text_encoder").unlink()
    (folder / "text_encoder").mkdir()  # a real folder where a link goes: left alone, and said so
    with pytest.raises(MiniditError, match=r"text_encoder is in the way of a link to the download of org/t5"):
        api.resolve_weights(spec)

    calls.clear()
    local = api.resolve_weights(spec, download_dir=tmp_path / "weights")
    assert local == tmp_path / "weights" / "two-repos"
    assert [call[3] for call in calls] == [local / "transformer", local / "text_encoder"]

    with pytest.raises(MiniditError, match=r"hf download org/model --local-dir DIR/transformer` and `hf download "
                                           r"org/t5 --local-dir DIR/text_encoder"):
        api.resolve_weights(spec, weights_dir=tmp_path / "missing")


def test_offline_help_for_several_repositories_names_the_assembled_folder(tmp_path, monkeypatch):
    """Offline and not cached: the one line says how to make the folder --weights takes for such a model."""
    import huggingface_hub
    import huggingface_hub.constants

    from minidit import api
    from minidit.pipelines import model_spec

    make_error, _ = hub_errors()["offline"]

    def offline(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MiniditError) as info:
        api.resolve_weights(model_spec("opensora"))
    assert not (tmp_path / "hub").exists()  # no empty folder left behind
    message = str(info.value)
    assert message.startswith("cannot reach the Hugging Face Hub and hpcai-tech/OpenSora-STDiT-v3 is not in the local")
    assert ("make the folder with `hf download hpcai-tech/OpenSora-STDiT-v3 --local-dir DIR/transformer` and `hf "
            "download DeepFloyd/t5-v1_1-xxl --local-dir DIR/text_encoder` and pass it with --weights DIR") in message
    assert "\n" not in message
