"""Open-Sora 1.2's recipe and `analyze.py --model opensora` on a tiny folder in minidit's assembled layout:
`transformer/` as hpcai-tech/OpenSora-STDiT-v3 holds it, `text_encoder/` as DeepFloyd/t5-v1_1-xxl's main branch holds
it (the encoder in two .bin shards with their index, the tokenizer beside it).

The expected numbers are those of the official RFLOW.sample of v1.2.0 run by tests/reference/generate_opensora.py
(see test_opensora.py): the prompt through the aesthetic-score suffix, the cleaning and T5, the null caption, the
guidance and 4 RFlow steps on the tiny STDiT3. The official run sampled two prompts in one batch; the recipe samples
one at a time, so the first prompt, whose noise is the first half of the same seeded draw, is compared.
"""

import csv
import functools
import importlib.util
import json
import shutil

import pytest
import torch
from conftest import ROOT, reference_generator, scaled_error
from safetensors.torch import load_file

from minidit import weights
from minidit.errors import MiniditError
from minidit.pipelines.opensora import OpenSoraRecipe, latent_frames, with_aesthetic_score

G = reference_generator("generate_opensora")
SAMPLE_TOL = 3.8e-5  # as test_opensora.py's RFLOW.sample comparison: 7.53e-6 (default capability) x 5
DEPTH = 28

spec = importlib.util.spec_from_file_location("analyze", ROOT / "analyze.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)


@functools.cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@functools.cache
def settings() -> dict:
    return json.loads((G.FIXTURES / "sample.json").read_text())


def write_deepfloyd_t5(folder):
    """The tiny T5 in the layout of DeepFloyd/t5-v1_1-xxl's main branch: the encoder as two torch pickles and their
    index, config.json, and the tokenizer's files in the same folder."""
    folder.mkdir(parents=True)
    sd = weights.load_folder(G.T5_TINY / "text_encoder")
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, folder / file)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    shutil.copy(G.T5_TINY / "text_encoder" / "config.json", folder / "config.json")
    shutil.copy(G.T5_TINY / "tokenizer" / "spiece.model", folder / "spiece.model")
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                                "unk_token": "<unk>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100, "model_max_length": 512}))


def assembled_folder(root):
    """The tiny Open-Sora folder as minidit assembles it: transformer/ and text_encoder/."""
    shutil.copytree(G.FOLDER, root / "transformer")
    write_deepfloyd_t5(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return assembled_folder(tmp_path_factory.mktemp("opensora") / "opensora")


def tiny_recipe(folder, **options) -> OpenSoraRecipe:
    s = settings()
    options = {"height": s["height"], "width": s["width"], "frames": s["num_frames"]} | options
    return OpenSoraRecipe(folder, dtype=torch.float32, device="cpu", **options)


def test_the_folder_is_deepfloyds_layout(folder):
    assert sorted(p.name for p in (folder / "text_encoder").iterdir()) == [
        "config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json", "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
    assert weights.find_weights(folder / "text_encoder").name == "pytorch_model.bin.index.json"


def test_final_latents_equal_rflow_sample(folder):
    """The first prompt of the official run, its noise (seed 42: the first half of the official draw of two), 4
    steps, guidance 7, 64x96 pixels, 17 frames: the official final latents."""
    s = settings()
    r = tiny_recipe(folder)
    prompt = s["prompts"][0]
    z = stored()["sample/z"][:1]
    shape = (1, 4, latent_frames(s["num_frames"]), s["height"] // 8, s["width"] // 8)
    # the same draw; torch.randn's last bit depends on the CPU's kernels (scalar vs AVX), so not bit-exact here
    assert scaled_error(torch.randn(shape, generator=torch.Generator().manual_seed(s["seed"])), z) <= 1e-6
    latents = r.generate([prompt], s["seed"], r.make_scheduler("rflow", s["steps"]), s["guidance"])
    assert scaled_error(latents, stored()["sample/latents"][:1]) <= SAMPLE_TOL


def test_text_is_the_prompt_then_the_null_caption_with_its_mask(folder):
    r = tiny_recipe(folder)
    text, mask = r.text([settings()["prompts"][0]], guidance=7.0)
    assert torch.equal(mask[0], mask[1]) and 0 < mask[0].sum() < mask.shape[1]  # padded: the mask matters
    assert torch.equal(text[1], r.model.null_text(1)[0].float())
    cond_only, cond_mask = r.text([settings()["prompts"][0]], guidance=1.0)
    assert torch.equal(cond_only, text[:1]) and torch.equal(cond_mask, mask[:1])
    assert r.branches(7.0) == ("cond", "uncond") and r.branches(1.0) == ("cond",)


def test_a_shorter_text_length_changes_nothing(folder):
    """--max-sequence-length below the model's 300 (here 24) but long enough for the prompt's tokens: the null
    caption, which takes the prompt's mask, is cut to the same rows; only padding goes."""
    s = settings()
    full = tiny_recipe(folder)
    tokens = int(full.encode(s["prompts"][0])[1].sum())
    short = tiny_recipe(folder, max_sequence_length=tokens)
    assert tokens < full.max_sequence_length
    a = full.generate([s["prompts"][0]], s["seed"], full.make_scheduler("rflow", 2), s["guidance"])
    b = short.generate([s["prompts"][0]], s["seed"], short.make_scheduler("rflow", 2), s["guidance"])
    assert scaled_error(a, b) <= 1.2e-5  # rounding only: 2.3e-6 (avx2), 1.8e-6 (default), 0 (avx512); x 5


def test_prompt_suffix_and_defaults(folder):
    assert with_aesthetic_score("a cat") == "a cat aesthetic score: 6.5."
    assert with_aesthetic_score("a cat aesthetic score: 5.0.") == "a cat aesthetic score: 5.0."
    assert [latent_frames(f) for f in (1, 17, 51, 102, 408, 20)] == [1, 5, 15, 30, 120, 6]
    r = OpenSoraRecipe(folder, dtype=torch.float32, device="cpu")
    assert (r.frames, r.resolution, r.max_sequence_length) == (51, (240, 426), 24)  # 24: the tiny model's length
    assert (r.default_steps, r.default_guidance, r.decodes) == (30, 7.0, False)
    assert r.make_scheduler("rflow", 30).timesteps[0] == 1000.0


@pytest.mark.parametrize(("options", "match"), [
    ({"frames": 16}, r"--frames must be 1 \(an image\) or at least 17"),
    ({"height": 8}, r"--height and --width must be at least 16"),
    ({"max_sequence_length": 25}, r"--max-sequence-length must be between 1 and 24"),
])
def test_bad_options(folder, options, match):
    with pytest.raises(MiniditError, match=match):
        tiny_recipe(folder, **options)


def test_a_missing_part_is_named(folder, tmp_path):
    shutil.copytree(folder / "transformer", tmp_path / "transformer")
    with pytest.raises(MiniditError, match=r"text_encoder is missing: .*DeepFloyd/t5-v1_1-xxl"):
        tiny_recipe(tmp_path)


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opensora-run")
    s = settings()
    (tmp / "prompts.txt").write_text(s["prompts"][0] + "\n")
    out = tmp / "run"
    code = analyze.main(["--model", "opensora", "--weights", str(folder), "--steps", str(s["steps"]),
                         "--height", str(s["height"]), "--width", str(s["width"]), "--frames", str(s["num_frames"]),
                         "--seed", str(s["seed"]), "--prompts", str(tmp / "prompts.txt"), "--device", "cpu",
                         "--cross-attention", "--save-latents", "--out", str(out)])
    return code, out


def test_analyze_end_to_end(run):
    """analyze.py --model opensora --cross-attention: 28 spatial, 28 temporal and 56 cross layers, branches cond and
    uncond; the saved latents are the official run's."""
    code, out = run
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frames"] == 17 and manifest["resolution"] == [64, 96]
    assert manifest["branches"] == ["cond", "uncond"]
    assert manifest["max_sequence_length"] == 24 and manifest["repo"] == "hpcai-tech/OpenSora-STDiT-v3"
    kinds = [layer["kind"] for layer in manifest["layers"]]
    assert kinds == ["spatial"] * DEPTH + ["temporal"] * DEPTH + ["cross"] * 2 * DEPTH
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["layer"]) for r in rows} == set(range(4 * DEPTH))
    assert {(r["stream"], r["branch"], r["tensor"]) for r in rows if r["kind"] == "cross"} >= {
        ("img", "cond", "A"), ("txt", "cond", "K"), ("txt", "uncond", "V")}
    latents = load_file(out / "latents" / "000000.safetensors")["latents"]
    assert scaled_error(latents, stored()["sample/latents"][:1]) <= SAMPLE_TOL


def test_save_images_is_refused_up_front(folder, tmp_path, capsys):
    code = analyze.main(["--model", "opensora", "--weights", str(folder), "--steps", "2", "--num-prompts", "1",
                         "--device", "cpu", "--save-images", "--out", str(tmp_path / "images")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    assert "VAE" in err[-1] and "--save-latents" in err[-1]
    assert not (tmp_path / "images").exists()
