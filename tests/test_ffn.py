"""F, the optional feed-forward capture (analyze.py --ffn): every family's F is the block's FFN output by value (FLUX
single-stream: the block's whole update of the residual stream), its sums equal a float64 recomputation, K, V and A
are bit for bit what a run without F records, and the command writes, draws and guards F.

Each family runs on its tiny copy (tests/test_study.py's BATCH_CASES; FLUX as the embedded flux-tiny, whose double-
and single-stream blocks are the FLUX.1 code), a few steps, one prompt with both guidance branches."""

import csv
import functools
import json

import numpy as np
import pytest
import torch
from test_study import BATCH_CASES, assert_close_sums, load

import minidit
from minidit.analysis import SUMS, read_run
from minidit.analysis.recorder import TENSORS, stream_axis, tensors_to_record
from minidit.attention import recording
from minidit.models.cogvideox import CogVideoXBlock

# flux-tiny runs the same FLUX code as FLUX.1-dev, in both block kinds; PixArt's F site is DiT's (its tiny copy's
# 1024-pixel buckets would cost a quarter of this file's time)
CASES = [case for case in BATCH_CASES if case not in ("flux-dev", "pixart")]
STEPS = 3
F = tensors_to_record(ffn=True).index("F")
# The recorder's float32 sums against float64, each within this of its scale (its own size; for s_dot
# sqrt(s_cur2 s_prev2)). Measured worst over CASES: 1.03e-5 with AVX2, 1.02e-5 with ATEN_CPU_CAPABILITY=default
# (Mochi's text F, the s_sq of a stream that barely moves; every other family at most 2.5e-6); 5x margin.
RTOL = 5e-5
# FLUX single-stream F against the block's output minus its input, in float32: the subtraction rounds at the scale
# of the residual stream. Measured worst: 3.0e-7 of max |F| (AVX2 and default); 3x margin. F without the gate, or
# before the projection, is off by far more.
BLOCK_RTOL = 1e-6


class KeepF:
    """A recorder that keeps every F it receives, as the model passes it (streams label, tensor), by backbone call;
    and each layer's K streams, which F's token ranges must follow (CogVideoX: [text; video], FLUX single: the same)."""

    def __init__(self):
        self.step = -1
        self.f: dict[tuple[int, str, str], tuple] = {}  # (step, layer, "img" | "txt" | "joint") -> (streams, F)
        self.k_streams: dict[str, object] = {}

    def next_step(self, *_):
        self.step += 1

    def capture(self, layer, tensor, x, token_dim, streams):
        if tensor == "K":
            self.k_streams[layer] = streams
        if tensor != "F":
            return
        assert token_dim == 1 and x.ndim == 3, (layer, token_dim, x.shape)
        key = (self.step, layer, streams if isinstance(streams, str) else "joint")
        assert key not in self.f, f"F of {key} captured twice in one backbone call"
        self.f[key] = (streams, x.detach().clone())


def hook_ffn_outputs(model: torch.nn.Module, layers, steps: KeepF) -> tuple[dict, list]:
    """The FFN outputs the blocks compute, observed by forward hooks on the FFN modules themselves (not through
    minidit.attention): (step, layer, stream) -> tensor. A block with one FFN per stream gives "img" (ff) and "txt"
    (ff_context); CogVideoX's one FFN over [text; video] gives "joint"; a FLUX single-stream block (f_point "block")
    gives "joint", its output minus its input, [text; image]."""
    seen, handles = {}, []

    def keep(layer: str, stream: str):
        def hook(module, args, output):
            if isinstance(output, tuple):  # a FLUX single-stream block: (x, c) in and out
                (x, c), (x_out, c_out) = args[:2], output
                output = torch.cat([c_out - c, x_out - x], dim=1)
            seen[(steps.step, layer, stream)] = output.detach().clone()
        return hook

    for layer in layers:
        if layer.f_point is None:
            continue
        block = model.get_submodule(layer.name.rsplit(".", 1)[0])
        if layer.f_point == "block":
            handles.append(block.register_forward_hook(keep(layer.name, "joint")))
            continue
        assert layer.f_point == "ffn", layer
        ffn = block.ff if hasattr(block, "ff") else block.mlp  # Open-Sora's is `mlp`
        joint = isinstance(block, CogVideoXBlock)  # one FFN over [text; video]
        handles.append(ffn.register_forward_hook(keep(layer.name, "joint" if joint else "img")))
        context = getattr(block, "ff_context", None)
        if context is not None:  # SD3's and Mochi's last block has none
            handles.append(context.register_forward_hook(keep(layer.name, "txt")))
    return seen, handles


class Observed:
    """One case sampled three times from the same noise: under KeepF with the FFN hooks, then recording without and
    with F."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.prompt = recipe.default_prompts()[0]
        self.guidance = max(recipe.default_guidance, 2.0)  # both branches (flux-tiny: true CFG)
        self.branches = recipe.branches(self.guidance)
        self.layers = recipe.attention_layers()
        keep = KeepF()
        step_hook = recipe.model.register_forward_pre_hook(keep.next_step)
        self.ffn, handles = hook_ffn_outputs(recipe.model, self.layers, keep)
        try:
            with recording(keep):
                self.latents = self.sample()[0]
        finally:
            for handle in [step_hook, *handles]:
                handle.remove()
        self.kept, self.k_streams = keep.f, keep.k_streams
        self.latents_kva, self.kva = self.sample(record=True)
        self.latents_kvaf, self.kvaf = self.sample(record=True, ffn=True)

    def sample(self, **record):
        return minidit.sample(self.recipe, self.prompt, steps=STEPS, guidance=self.guidance, **record)


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    @functools.cache
    def get(case: str) -> Observed:
        return Observed(load(case, tmp_path_factory.mktemp(case)))

    return get


def float64_sums(prev: torch.Tensor, cur: torch.Tensor) -> np.ndarray:
    """The record's seven sums (n first) of one sample, in float64."""
    prev, cur = prev.double(), cur.double()
    d = cur - prev
    return np.array([cur.numel(), d.abs().sum(), prev.abs().sum(), d.square().sum(), (cur * prev).sum(),
                     cur.square().sum(), prev.square().sum()], dtype=np.float64)


def pieces(streams, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """F cut into its streams' token ranges."""
    if isinstance(streams, str):
        return {streams: x}
    names, lengths = zip(*streams)
    return dict(zip(names, x.split(list(lengths), dim=1)))


@pytest.mark.any_cpu
@pytest.mark.parametrize("case", CASES)
def test_f_sums_equal_a_float64_recomputation(case, observed):
    """The acceptance test: every F sum of a recorded run (minidit.sample(record=True, ffn=True)) equals the sums
    recomputed in float64 from the F tensors the model handed a plain recorder, per layer, stream, branch and
    transition; the cells with no F (no text output in SD3's and Mochi's last block, no text stream) hold n = 0."""
    o = observed(case)
    streams, index = stream_axis(o.layers), {layer.name: i for i, layer in enumerate(o.layers)}
    expected = np.zeros(o.kvaf.shape[:3] + (STEPS - 1, len(SUMS)))  # [layer, stream, branch, d, 7]
    for (step, name, label), (labels, cur) in o.kept.items():
        if step == 0:
            continue
        prev_labels, prev = o.kept[(step - 1, name, label)]
        assert prev_labels == labels, (name, prev_labels, labels)
        for (stream, p), c in zip(pieces(labels, prev).items(), pieces(labels, cur).values()):
            for bi, (p_branch, c_branch) in enumerate(zip(p.chunk(len(o.branches)), c.chunk(len(o.branches)))):
                expected[index[name], streams.index(stream), bi, step - 1] = float64_sums(p_branch, c_branch)
    actual = o.kvaf[..., F, :, :]
    assert expected.shape == actual.shape
    np.testing.assert_array_equal(actual[..., 0], expected[..., 0])  # n, and where there is no F
    for li, layer in enumerate(o.layers):  # every block's F has image tokens
        assert (expected[li, streams.index("img"), ..., 0] > 0).all() == (layer.f_point is not None), layer
    assert_close_sums(actual, expected, case, RTOL)


@pytest.mark.any_cpu
@pytest.mark.parametrize("case", CASES)
def test_f_is_the_ffn_output(case, observed):
    """F by value: the FFN module's own output (after its last projection, before gate, residual or norm), per
    stream where a block has one FFN per stream, filed under the block's attention layer; a FLUX single-stream block's
    F is its output minus its input, [text; image], so its gate is in and nothing of the residual is. Joint token
    ranges follow the layer's K (CogVideoX: [text; video])."""
    o = observed(case)
    assert o.kept.keys() == o.ffn.keys(), f"{case}: F captured at {sorted(set(o.kept) ^ set(o.ffn))[:4]} differs"
    for key, (streams, f) in o.kept.items():
        expected = o.ffn[key]
        assert f.shape == expected.shape, (key, f.shape, expected.shape)
        layer = next(layer for layer in o.layers if layer.name == key[1])
        if layer.f_point == "block":
            tolerance = BLOCK_RTOL * expected.abs().max().item()
            assert (f - expected).abs().max().item() <= tolerance, key
        else:
            assert torch.equal(f, expected), key
        if key[2] == "joint":
            assert streams == o.k_streams[key[1]], (key, streams, o.k_streams[key[1]])
    points = {layer.f_point for layer in o.layers}
    assert points <= {"ffn", "block", None} and ("block" in points) == (case == "flux-tiny")


@pytest.mark.any_cpu
@pytest.mark.parametrize("case", CASES)
def test_kva_are_unchanged_by_ffn(case, observed):
    """With F recorded, K, V and A are bit for bit those of a run without it, and so are the samples; without it the
    record holds K, V and A only, as before."""
    o = observed(case)
    assert o.kva.shape[3] == len(TENSORS) == 3 and o.kvaf.shape[3] == 4
    np.testing.assert_array_equal(o.kvaf[..., :3, :, :], o.kva)
    assert torch.equal(o.latents_kvaf, o.latents_kva) and torch.equal(o.latents, o.latents_kva)


@pytest.mark.any_cpu
@pytest.mark.parametrize("prev_on_host", [False, True])
def test_f_on_the_large_capture_path(prev_on_host, observed, monkeypatch):
    """Every capture reduced as it arrives, holding the model's own F (or its host copy) until the next step: the
    same sums as the grouped small-capture path, float32 rounding apart, and the same samples (nothing the model
    still uses was written to)."""
    from minidit.analysis import recorder

    o = observed("flux-tiny")
    monkeypatch.setattr(recorder, "GROUP_BELOW_BYTES", 0)
    latents, sums = minidit.sample(o.recipe, o.prompt, steps=STEPS, guidance=o.guidance, record=True, ffn=True,
                                   prev_on_host=prev_on_host)
    assert torch.equal(latents, o.latents_kvaf)
    np.testing.assert_allclose(sums, o.kvaf, rtol=1e-5, atol=1e-6)


def test_memory_rules_count_f(tmp_path):
    """memory.Setting.captures("KVAF") lists the capture sizes a recorder with F sees: Mochi's text F at the text
    width and none in the last block, as its text A."""
    from test_analysis import MEMORY_FOLDERS, tiny_video_backbone

    from minidit.analysis import memory, recorder

    r = tiny_video_backbone("mochi", "fp32", tmp_path)
    rec = recorder.Recorder(r.attention_layers(), branches=r.branches(r.default_guidance), num_steps=2, device="cpu",
                            tensors=tensors_to_record(ffn=True))
    with rec.attach(r.model):
        r.generate([r.default_prompts()[0]], 0, r.make_scheduler(r.default_scheduler, 2), r.default_guidance)
    rec.finish()
    cfg, size = r.model.config, MEMORY_FOLDERS["mochi"][1]
    setting = memory.Setting("mochi", "tiny", 0, cfg.num_layers, cfg.hidden_size,
                             {"img": ((size["frames"] - 1) // 6 + 1) * (size["height"] // 16) * (size["width"] // 16),
                              "txt": r.max_sequence_length}, 2, text_in_last=False,
                             text_width=cfg.pooled_projection_dim)
    assert sorted(setting.captures("KVAF")) == sorted(int(n) for n in rec.n.flatten() if n > 0)
    assert len(setting.captures("KVAF")) == len(setting.captures()) + 2 * cfg.num_layers - 1


@pytest.mark.any_cpu
def test_the_command_records_draws_and_guards_f(tmp_path, capsys):
    """analyze.py --ffn: summary.csv and cv.csv carry F rows (the K, V and A rows are those of a run without
    --ffn, byte for byte), the manifest lists the tensors and each layer's f_point, the figures draw F; the run
    cannot be resumed without --ffn, nor a run without F with it."""
    common = ["--model", "dit-tiny", "--steps", "3", "--num-prompts", "2", "--device", "cpu"]
    with_f, without = tmp_path / "ffn", tmp_path / "plain"
    for out, extra in ((with_f, ["--ffn"]), (without, [])):
        code, err = cli(capsys, *common, *extra, "--out", out)
        assert code == 0, err

    manifest, plain = (json.loads((out / "manifest.json").read_text()) for out in (with_f, without))
    assert manifest["tensors"] == ["K", "V", "A", "F"] and plain["tensors"] == ["K", "V", "A"]
    n_layers = len(manifest["layers"])
    assert [layer["f_point"] for layer in manifest["layers"]] == ["ffn"] * n_layers
    assert all("f_point" not in layer for layer in plain["layers"])
    assert [{k: v for k, v in layer.items() if k != "f_point"} for layer in manifest["layers"]] == plain["layers"]
    differ = ("tensors", "layers", "last_command", "analysis_held_bytes")  # F is held too
    assert {k: v for k, v in manifest.items() if k not in differ} == {k: v for k, v in plain.items() if k not in differ}

    lines = (with_f / "summary.csv").read_text().splitlines()
    header = lines[0].split(",")
    f_rows = [line for line in lines[1:] if line.split(",")[header.index("tensor")] == "F"]
    assert len(f_rows) == n_layers * 3 * 2 * 4  # layers x branches (cond, uncond, all) x transitions x metrics
    assert [line for line in lines if line not in f_rows] == (without / "summary.csv").read_text().splitlines()
    cv = list(csv.DictReader((with_f / "cv.csv").open()))
    assert {row["tensor"] for row in cv} == {"K", "V", "A", "F"}
    assert all(float(row["mean_cv"]) >= 0 and int(row["n_cells"]) == n_layers * 2 for row in cv if row["tensor"] == "F")
    assert {p.name for p in (with_f / "figures").iterdir()} == {p.name for p in (without / "figures").iterdir()}

    from minidit.analysis import figures

    run = read_run(with_f)
    assert run.tensors == ("K", "V", "A", "F")
    legend = [t.get_text() for t in figures.layer_grid_figure(run, "l1").legends[0].get_texts()]
    assert legend[:4] == ["K", "V", "A", "F"]
    assert [ax.get_title() for ax in figures.heatmap_figure(run, "l1").axes if ax.get_title()] == ["K", "V", "A", "F"]

    code, err = cli(capsys, *common, "--out", with_f, "--resume")
    assert code == 2 and "different tensors;" in err, err
    code, err = cli(capsys, *common, "--ffn", "--out", without, "--resume")
    assert code == 2 and "different tensors;" in err, err
    code, err = cli(capsys, *common, "--ffn", "--out", with_f, "--resume")
    assert code == 0 and "2 of 2 prompts already done" in err, err


def cli(capsys, *args) -> tuple[int, str]:
    """analyze.py in this process: its exit code and what it wrote to stderr."""
    import analyze

    capsys.readouterr()
    code = analyze.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_compare_draws_the_tensors_every_run_has(tmp_path):
    """figures.compare: F when every run recorded it, K, V and A alone when one did not."""
    from test_figures import make_run, self_layers

    from minidit.analysis import figures

    kvaf = [make_run(tmp_path / f"f{steps}", layers=self_layers(3), steps=steps, tensors=("K", "V", "A", "F"))
            for steps in (8, 15)]
    kva = make_run(tmp_path / "plain", layers=self_layers(3), steps=15)
    rows = figures.compare(kvaf, ["8", "15"], "l1", tmp_path / "both.png")
    assert [row["tensor"] for row in rows] == ["K", "V", "A", "F"]
    rows = figures.compare([kvaf[0], kva], ["8", "plain"], "l1", tmp_path / "one.png")
    assert [row["tensor"] for row in rows] == ["K", "V", "A"]
