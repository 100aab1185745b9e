"""DiT parity: minidit's loader, model and sampling recipe against the reference, on identical tiny weights.

Every fixture goes through minidit's real loading code (`load_dit` on the Hub-layout folders, the `.bin` folder
and the original `.pt`). Each comparison runs against:
- "fixture": the outputs stored by tests/reference/generate.py (diffusers 0.42.1, see fixtures/dit/VERSIONS.json);
- "live": a reference rebuilt now from the same files with the installed diffusers (skipped without it).
The error is max |minidit - reference| / max(1, max |reference|), in fp32.
"""

import json
from dataclasses import replace
from functools import cache

import pytest
import torch
from conftest import FIXTURES, SOURCES, assert_matches, reference_generator, scaled_error
from safetensors.torch import load_file

from minidit.attention import explicit_attention
from minidit.models import dit
from minidit.models.dit import DiT, DiTConfig, load_dit
from minidit.pipelines.dit import sample
from minidit.pipelines.recipe import initial_noise
from minidit.schedulers.ddim import DDIM, DDIMConfig

ORIGINAL_PT = FIXTURES / "original" / "DiT-tiny-2-64x64.pt"
# Worst fp32 error against the stored fixtures, (tests/measure_tolerances.py, default/avx2/avx512):
# forwards and final latents 4.2e-7 (original convention, avx2) x 4 -> 1.7e-6; the small-variance case 2.5e-7
# (default) x 4 -> 1e-6, where a LayerNorm eps off by 10x moves the output by 3e-2 or more; the initial noise
# 2.8e-7 (default: torch.randn's own kernels) x 4 -> 1.1e-6.
TOL = 1.7e-6
SMALL_VARIANCE_TOL = 1e-6
NOISE_TOLERANCE = 1.1e-6
TINY_PRESET = "DiT-tiny/2"




G = reference_generator()
LAYOUTS = ["sharded", "single", "bin"]



@cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference.safetensors")


def inputs():
    ref = stored()
    return ref["dit/x"], ref["dit/t"], ref["dit/y"]



def assert_parity(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    error = scaled_error(actual, expected)
    assert error <= tol, f"max error {error:.3g} (relative to max(1, |reference|)) exceeds {tol:g}"


def scheduler_config(folder: str = "single") -> dict:
    return json.loads((FIXTURES / folder / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture
def tiny_preset(monkeypatch):
    """An original `.pt` carries no config and load_dit only knows the DiT-XL/2 presets; register the tiny one."""
    monkeypatch.setitem(dit.PRESETS, TINY_PRESET, DiTConfig(**G.TINY))


# ---- the references ---------------------------------------------------------------------------------------

def reference_forward(source: str, layout: str, numerics: str) -> torch.Tensor:
    key = {"diffusers": "dit/hub_out", "original": "dit/hub_out_original_numerics"}[numerics]
    if source == "fixture":
        return stored()[key]
    return G.diffusers_forward(G.diffusers_dit(FIXTURES / layout / "transformer", numerics=numerics), *inputs())


def reference_original_forward(source: str) -> torch.Tensor:
    if source == "fixture":
        return stored()["dit/original_out"]  # from the port of facebookresearch/DiT models.py
    state = G.original_to_diffusers(torch.load(ORIGINAL_PT, weights_only=True), G.TINY["num_layers"])
    return G.diffusers_forward(G.diffusers_dit(state_dict=state, numerics="original"), *inputs())


def reference_pipeline(source: str, guidance: float) -> torch.Tensor:
    name = "guided" if guidance > 1 else "unguided"
    if source == "fixture":
        return stored()[f"pipeline/{name}"]
    return G.diffusers_pipeline_latents(G.diffusers_dit(FIXTURES / "single" / "transformer"), scheduler_config(),
                                        G.PIPELINE_LABELS, G.PIPELINE_STEPS, guidance, G.PIPELINE_SEED)


# ---- the transformer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("convention", ["diffusers", "original"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_layout_forward(layout, convention, source):
    model = load_dit(FIXTURES / layout / "transformer", convention=convention)
    with torch.no_grad():
        out = model(*inputs())
    assert_parity(out, reference_forward(source, layout, convention))


@pytest.mark.parametrize("source", SOURCES)
def test_original_layout_forward(source, tiny_preset):
    model = load_dit(ORIGINAL_PT, preset=TINY_PRESET)
    assert model.config == replace(DiTConfig(**G.TINY), norm_eps=1e-6, freq_shift=0.0)
    with torch.no_grad():
        out = model(*inputs())
    assert_parity(out, reference_original_forward(source))


def test_the_two_numerics_really_differ():
    """Guards the tests above: the diffusers and original conventions must not be confusable at TOL."""
    ref = stored()
    assert scaled_error(ref["dit/hub_out"], ref["dit/hub_out_original_numerics"]) > 100 * TOL


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("convention", ["diffusers", "original"])
def test_layer_norm_eps_shows_at_small_variance(convention, source):
    """The residual stream of the "small-variance" fixture has a per-token std near 1e-2, so a LayerNorm eps off by
    10x (1e-6 <-> 1e-5, in the adaLN, FFN or final norm) moves the output by 3e-2 or more (the generator measures
    and asserts > 1e-3); at the usual O(1) activations the same bug moves it by < 1e-5, within float rounding."""
    folder = FIXTURES / "small-variance" / "transformer"
    x, (_, t, y) = stored()["dit/small_variance/x"], inputs()
    with torch.no_grad():
        out = load_dit(folder, convention=convention)(x, t, y)
    if source == "fixture":
        key = {"diffusers": "dit/small_variance/out", "original": "dit/small_variance/out_original_numerics"}
        expected = stored()[key[convention]]
    else:
        expected = G.diffusers_forward(G.diffusers_dit(folder, numerics=convention), x, t, y)
    assert_parity(out, expected, SMALL_VARIANCE_TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_layout_loads_the_files_bit_exactly(layout):
    model = load_dit(FIXTURES / layout / "transformer")
    expected = load_file(FIXTURES / "single" / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys() and len(loaded) == 44
    for key, tensor in expected.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], tensor), key
    # config.json has no norm_eps: diffusers' default 1e-5 applies; its ignored legacy keys are ignored
    assert model.config == DiTConfig(**G.TINY)
    assert model.config.norm_eps == 1e-5 and model.config.freq_shift == 1.0
    assert load_dit(FIXTURES / layout / "transformer", convention="original").config == replace(
        model.config, norm_eps=1e-6, freq_shift=0.0)


def test_original_layout_loads_bit_exactly(tiny_preset):
    """§13.1: the converter must reproduce the diffusers-layout state dict bit-exactly (here: the conversion as
    diffusers' convert_dit_to_diffusers.py does it, written out in the generator)."""
    model = load_dit(ORIGINAL_PT, preset=TINY_PRESET)
    original = torch.load(ORIGINAL_PT, weights_only=True)
    assert original["pos_embed"].shape == (1, 16, 16)
    expected = G.original_to_diffusers(original, G.TINY["num_layers"])
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_pos_embed_table_equals_the_original_stored_one():
    """minidit recomputes the fixed sin-cos table the original checkpoints store as `pos_embed`."""
    model = load_dit(FIXTURES / "single" / "transformer")
    x = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        table = model.pos_embed(x) - model.pos_embed.proj(x).flatten(2).transpose(1, 2)  # (1, L, D)
    stored_table = torch.load(ORIGINAL_PT, weights_only=True)["pos_embed"]
    assert (table - stored_table).abs().max() < 1e-6


def test_bf16_load_and_forward():
    model = load_dit(FIXTURES / "sharded" / "transformer", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    assert_parity(out.float(), stored()["dit/hub_out"], tol=3e-2)


@pytest.mark.parametrize("source", SOURCES)
def test_explicit_attention_equals_fused_on_the_dit_forward(source, monkeypatch):
    model = load_dit(FIXTURES / "single" / "transformer")
    with torch.no_grad():
        fused = model(*inputs())
        with explicit_attention():
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", None)  # must not be called
            explicit = model(*inputs())
            monkeypatch.undo()
    assert scaled_error(explicit, fused) <= TOL
    assert_parity(explicit, reference_forward(source, "single", "diffusers"))


# ---- end to end --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
def test_initial_noise_is_the_pipelines_draw(source):
    batch = len(G.PIPELINE_LABELS)
    expected = stored()["pipeline/noise"] if source == "fixture" else G.pipeline_noise(batch, G.PIPELINE_SEED)
    # torch.randn itself rounds differently with each CPU's vector kernels (its Box-Muller log and cos)
    assert_matches(initial_noise((batch, 4, 8, 8), G.PIPELINE_SEED, torch.float32, "cpu"), expected, source,
                   NOISE_TOLERANCE)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("guidance", [G.PIPELINE_GUIDANCE, 1.0])
def test_pipeline_final_latents(guidance, source):
    """diffusers' DiTPipeline: DDIM from the Hub scheduler config, 4 steps, labels [1, 3], noise from seed 0."""
    model = load_dit(FIXTURES / "single" / "transformer")
    scheduler = DDIM(DDIMConfig.from_hub(scheduler_config()), G.PIPELINE_STEPS)
    noise = initial_noise((len(G.PIPELINE_LABELS), 4, 8, 8), G.PIPELINE_SEED, torch.float32, "cpu")
    latents = sample(model, scheduler, torch.tensor(G.PIPELINE_LABELS), noise, guidance=guidance)
    assert_parity(latents, reference_pipeline(source, guidance))


def original_convention_model() -> DiT:
    """The `.pt` weights through minidit's original-layout loader (original numerics come with the layout)."""
    return load_dit(ORIGINAL_PT, preset=TINY_PRESET)


def reference_original_pipeline(source: str, steps: int) -> torch.Tensor:
    if source == "fixture":
        return stored()[f"pipeline/original_steps{steps}"]
    port = G.load_original(torch.load(ORIGINAL_PT, weights_only=True))
    return G.original_pipeline_latents(port, scheduler_config(), G.PIPELINE_LABELS, steps, G.PIPELINE_GUIDANCE,
                                       G.PIPELINE_SEED)


def run_original_convention(steps: int) -> torch.Tensor:  # needs the tiny_preset fixture
    scheduler = DDIM(DDIMConfig.from_hub(scheduler_config()), steps)
    noise = initial_noise((len(G.PIPELINE_LABELS), 4, 8, 8), G.PIPELINE_SEED, torch.float32, "cpu")
    return sample(original_convention_model(), scheduler, torch.tensor(G.PIPELINE_LABELS), noise,
                  guidance=G.PIPELINE_GUIDANCE, convention="original")


@pytest.mark.parametrize("source", SOURCES)
def test_original_convention_one_step(source, tiny_preset):
    """One step: guidance on 3 channels (the 4th channel is the conditional eps), vs the port's forward_with_cfg."""
    assert_parity(run_original_convention(1), reference_original_pipeline(source, 1))


@pytest.mark.parametrize("source", SOURCES)
def test_original_convention_four_steps(source, tiny_preset):
    assert_parity(run_original_convention(G.PIPELINE_STEPS), reference_original_pipeline(source, G.PIPELINE_STEPS))


def test_fixture_matches_the_generator():
    """The stored references were made with the generator's current constants (else: rerun it)."""
    from safetensors import safe_open

    with safe_open(FIXTURES / "reference.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["reference"])
    assert meta["tiny"] == G.TINY
    assert meta["pipeline"] == {"labels": G.PIPELINE_LABELS, "steps": G.PIPELINE_STEPS,
                                "guidance": G.PIPELINE_GUIDANCE, "seed": G.PIPELINE_SEED}
    assert stored()["dit/t"].tolist() == G.FORWARD_T and stored()["dit/y"].tolist() == G.FORWARD_Y
    assert 0 in G.FORWARD_T and 999 in G.FORWARD_T and 1000 in G.FORWARD_Y
    versions = json.loads((FIXTURES / "VERSIONS.json").read_text())
    assert {"diffusers", "transformers", "torch"} <= versions.keys()
