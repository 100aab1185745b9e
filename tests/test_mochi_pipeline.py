"""Mochi 1 preview beyond the transformer: its sampler against diffusers' FlowMatchEulerDiscreteScheduler set up as
MochiPipeline sets it up (linear-quadratic sigmas, invert_sigmas); the other checkpoint layouts (the Hub's bf16
variant, genmo's dit.safetensors) against the diffusers layout and against genmo's own module definitions.

The fixtures are written by tests/reference/generate_mochi_pipeline.py; the transformer is generate_mochi's tiny
48-block one (its fp32 shards, and the bf16 variant and genmo file made from them). Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/mochi_pipeline/VERSIONS.json);
- "live": the reference rebuilt now with the installed diffusers (skipped without it), which minidit must equal bit
  for bit.
Errors are max |minidit - reference| / max(1, max |reference|).
"""

import functools
import json

import pytest
import torch
from conftest import LIVE, SOURCES, assert_matches, reference_generator
from safetensors.torch import load_file, save_file

from minidit import weights
from minidit.errors import MiniditError
from minidit.models.mochi import (
    GENMO_TO_HUB,
    PRESETS,
    MochiConfig,
    MochiTransformer,
    genmo_blocks,
    genmo_to_hub,
    hub_variant,
    load_mochi,
)
from minidit.schedulers.flow import FlowMatchConfig, FlowMatchEuler, linear_quadratic_sigmas

G = reference_generator("generate_mochi_pipeline")
M = G._MOCHI  # generate_mochi: the tiny transformer, its cases and their stored outputs
MODEL_TOL = 2.6e-6  # the transformer against generate_mochi's stored outputs, as tests/test_mochi.py measured it
# Live (in-process): 0 everywhere (bit-exact). Against the stored fixtures, the worst error per comparison
# (tests/measure_tolerances.py, default/avx2/avx512; the fixture was written at avx512): sigmas and timesteps 0; the
# float32 steps 3.93e-7 (default: x + dt v without a fused multiply-add), x 5; the steps that end in bf16 latents 0,
# allowed one bf16 rounding flip (2^-7 on this scale):
SCHEDULER_TOL = 2.0e-6
SCHEDULER_BF16_TOL = 2**-7


@functools.cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@functools.cache
def live_scheduler(steps: int) -> dict[str, torch.Tensor]:
    return G.reference_scheduler(steps)


def scheduler_reference(source: str, steps: int, key: str) -> torch.Tensor:
    return live_scheduler(steps)[key] if source == "live" else stored()[f"scheduler/{steps}/{key}"]


def mochi_scheduler(steps: int) -> FlowMatchEuler:
    return FlowMatchEuler(FlowMatchConfig.from_hub(G.hub_scheduler_config()), steps, schedule="mochi")


# ---- scheduler ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.SCHEDULER_STEPS)
def test_scheduler_matches_reference(steps, source):
    """The Hub config (invert_sigmas, shift 1) given MochiPipeline's linear-quadratic sigmas: the grid the step walks
    (diffusers' scheduler.sigmas: 1 - sigma, ending in 1), the timesteps 1000 (1 - sigma), and every step() in
    float32 and on bf16 latents (upcast for the step, cast back after it, as the pipeline does)."""
    s = mochi_scheduler(steps)
    grid, timesteps = (scheduler_reference(source, steps, key) for key in ("sigmas", "timesteps"))
    assert_matches(s.noise_levels, grid, source, SCHEDULER_TOL, "sigmas")
    assert_matches(torch.tensor(s.timesteps), timesteps, source, SCHEDULER_TOL, "timesteps")
    assert_matches(1 - torch.tensor(s.sigmas), grid[:-1], source, SCHEDULER_TOL, "1 - sigmas")
    inputs = G.step_inputs(steps)
    prev = torch.stack([s.step(inputs["model_output"][i], i, inputs["sample"][i]) for i in range(steps)])
    assert_matches(prev, scheduler_reference(source, steps, "prev"), source, SCHEDULER_TOL, "prev")
    prev_bf16 = torch.stack([s.step(inputs["model_output"][i], t, inputs["sample"][i].bfloat16().float()).bfloat16()
                             for i, t in enumerate(s.timesteps)])
    assert_matches(prev_bf16, scheduler_reference(source, steps, "prev_bf16"), source, SCHEDULER_BF16_TOL, "bf16")


def test_linear_quadratic_schedule():
    """The 64-step default: the first 32 sigmas fall linearly by 0.025 / 32 from 1, the rest follow the parabola
    through (32, 1 - 0.025) that reaches sigma 0 at step 64 (one step past the last); timesteps rise from 0."""
    sigmas = linear_quadratic_sigmas(64)
    assert len(sigmas) == 64 and sigmas[0] == 1.0
    assert sigmas[:32] == pytest.approx([1 - i * 0.025 / 32 for i in range(32)], abs=1e-15)
    assert sigmas[32] == pytest.approx(1 - 0.025, abs=1e-12)
    d, a = 32 - 0.025 * 64, (32 - 0.025 * 64) / (32 * 32**2)
    b, c = 0.025 / 32 - 2 * d / 32**2, a * 32**2
    assert a * 64**2 + b * 64 + c == pytest.approx(1.0, abs=1e-12)  # the curve ends at x = 1 (sigma 0)
    assert all(x > y for x, y in zip(sigmas, sigmas[1:]))
    s = mochi_scheduler(64)
    assert s.timesteps[0] == 0.0 and s.noise_levels[-1] == 1.0 and s.sigmas[0] == 1.0
    assert all(t == pytest.approx(1000 * (1 - sigma), abs=1e-3) for t, sigma in zip(s.timesteps, s.sigmas))


def test_scheduler_refusals():
    with pytest.raises(MiniditError, match="at least 2 steps"):
        mochi_scheduler(1)
    dynamic = FlowMatchConfig.from_hub({**G.hub_scheduler_config(), "use_dynamic_shifting": True})
    with pytest.raises(MiniditError, match="no mu"):
        FlowMatchEuler(dynamic, 64, image_seq_len=1024, schedule="mochi")


# ---- checkpoint layouts: the bf16 variant and genmo's single file ------------------------------------------------

@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    """layout -> the pipeline folder as that download has it ("variant", "hub", "genmo"; see G.assemble)."""
    root = tmp_path_factory.mktemp("mochi-layouts")
    return functools.cache(lambda layout: G.assemble(layout, root / layout))


@functools.cache
def hub_model(dtype: torch.dtype = torch.float32) -> MochiTransformer:
    return load_mochi(M.TRANSFORMER, dtype=dtype)


@functools.cache
def mochi_stored() -> dict[str, torch.Tensor]:
    return load_file(M.REFERENCE)


def forward(m: MochiTransformer, case: str) -> torch.Tensor:
    inputs = {k: mochi_stored()[f"model/{case}/{k}"] for k in ("x", "t", "text", "mask")}
    with torch.no_grad():
        return m(inputs["x"], inputs["text"], inputs["t"], inputs["mask"])


def tiny_config() -> MochiConfig:
    return MochiConfig.from_hub(weights.read_json(G.FOLDER / "transformer" / "config.json"))


def test_genmo_file_equals_the_hub_layout(assembled):
    """genmo's dit.safetensors, written from the same fp32 weights (fused qkv, SwiGLU halves and final (shift,
    scale) in genmo's order, genmo's names), loads into exactly the Hub layout's tensors, so the outputs are
    bit-identical, and within the stored tolerance of diffusers' outputs for generate_mochi's cases."""
    file = assembled("genmo") / G.GENMO_FILE
    assert len(weights.safetensors_header(file)) == 879
    for dtype in (torch.float32, torch.bfloat16):
        genmo = load_mochi(file, dtype=dtype, config=tiny_config())
        hub = hub_model(dtype)
        assert genmo.state_dict().keys() == hub.state_dict().keys()
        assert all(torch.equal(v, hub.state_dict()[k]) for k, v in genmo.state_dict().items())
    genmo = load_mochi(file, dtype=torch.float32, config=tiny_config())
    for case in M.MODEL_CASES:
        out = forward(genmo, case)
        assert torch.equal(out, forward(hub_model(), case)), case
        assert_matches(out, mochi_stored()[f"model/{case}/out"], "fixture", MODEL_TOL, case)


def test_genmo_table_is_the_inverse(tmp_path):
    """minidit's GENMO_TO_HUB undoes the generator's hub_to_genmo bit for bit (which diffusers' own converter also
    undoes: checked by the generator and by the live test below); ComfyUI's key prefix is accepted."""
    sd = G.fp32_weights()
    genmo = G.hub_to_genmo(sd)
    back = genmo_to_hub(genmo, tiny_config())
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    comfy = tmp_path / "mochi_preview_comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in genmo.items()}, comfy)
    m = load_mochi(comfy, dtype=torch.float32, config=tiny_config())
    assert all(torch.equal(v, hub_model().state_dict()[k]) for k, v in m.state_dict().items())
    with pytest.raises(MiniditError, match="lacks 1 of its tensors"):
        genmo_to_hub({k: v for k, v in genmo.items() if k != "blocks.3.mlp_x.w1.weight"}, tiny_config())


@LIVE
def test_genmo_inverse_matches_diffusers_converter():
    """diffusers' single-file converter (what from_single_file runs on dit.safetensors) turns the generator's genmo
    state dict back into the Hub layout exactly: the test's genmo file is the layout diffusers reads."""
    sd = G.fp32_weights()
    back = G.reference_from_genmo(G.hub_to_genmo(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_genmo_keys_at_full_size():
    """genmo's AsymmDiTJoint with the released arguments, built on meta by the generator (genmo_fullsize.json):
    879 keys and 10,027,677,744 parameters. GENMO_TO_HUB names exactly those keys, and maps those shapes onto the
    1071 keys and shapes of minidit's (= diffusers') full-size model."""
    genmo = json.loads(G.GENMO_FULLSIZE.read_text())
    assert len(genmo["keys"]) == 879 and genmo["parameters"] == 10_027_677_744
    cfg = PRESETS["mochi-1-preview"]
    assert set(weights.source_keys(GENMO_TO_HUB, genmo_blocks(cfg))) == set(genmo["keys"])
    with torch.device("meta"):
        hub = genmo_to_hub({k: torch.empty(shape) for k, shape in genmo["keys"].items()}, cfg)
        model = MochiTransformer(cfg)
    expected = json.loads((M.FIXTURES / "fullsize.json").read_text())["mochi-1-preview"]["keys"]
    assert {k: list(v.shape) for k, v in hub.items()} == {k: list(v.shape) for k, v in model.state_dict().items()} \
        == expected
    assert len(hub) == 1071 and sum(v.numel() for v in hub.values()) == genmo["parameters"]


def test_bf16_variant(assembled):
    """The Hub's bf16 variant (three shards and diffusion_pytorch_model.safetensors.index.bf16.json) is read where
    the folder has no fp32 files (what `--model mochi` downloads): in bf16 exactly the fp32 weights cast to bf16, in
    fp32 those values. Where the fp32 files are there too (the whole Hub repository), they are read."""
    folder = G.FOLDER / "transformer"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == [f"diffusion_pytorch_model.bf16-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert {dtype for f in files for dtype, _ in weights.safetensors_header(folder / f).values()} == {"BF16"}
    assert hub_variant(folder) == "bf16" and hub_variant(assembled("hub") / "transformer") is None
    variant = load_mochi(folder, dtype=torch.bfloat16)
    assert all(torch.equal(v, hub_model(torch.bfloat16).state_dict()[k]) for k, v in variant.state_dict().items())
    upcast = load_mochi(folder, dtype=torch.float32).state_dict()
    assert all(torch.equal(v, hub_model().state_dict()[k].bfloat16().float()) for k, v in upcast.items())
    full = load_mochi(assembled("hub") / "transformer", dtype=torch.float32).state_dict()
    assert all(torch.equal(v, hub_model().state_dict()[k]) for k, v in full.items())


def test_missing_transformer_weights(tmp_path):
    (tmp_path / "config.json").write_text((G.FOLDER / "transformer" / "config.json").read_text())
    with pytest.raises(MiniditError, match="no Mochi transformer weights.*bf16 variant"):
        load_mochi(tmp_path)
