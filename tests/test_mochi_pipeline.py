"""Mochi 1 preview beyond the transformer: its sampler against diffusers' FlowMatchEulerDiscreteScheduler set up as
MochiPipeline sets it up (linear-quadratic sigmas, invert_sigmas); the other checkpoint layouts (the Hub's bf16
variant, genmo's dit.safetensors) against the diffusers layout and against genmo's own module definitions; the
whole text-to-video recipe against MochiPipeline, then analyze.py end to end.

The fixtures are written by tests/reference/generate_mochi_pipeline.py; the transformer is generate_mochi's tiny
48-block one (its fp32 shards, and the bf16 variant and genmo file made from them). Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/mochi_pipeline/VERSIONS.json);
- "live": the reference rebuilt now with the installed diffusers (skipped without it), which minidit must equal bit
  for bit, except MochiPipeline's final latents (see PIPELINE_TOL for why).
Errors are max |minidit - reference| / max(1, max |reference|).
"""

import csv
import functools
import importlib.util
import json

import pytest
import torch
from conftest import LIVE, ROOT, SOURCES, assert_matches, reference_generator, scaled_error
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
from minidit.pipelines.mochi import MochiRecipe
from minidit.schedulers.flow import FlowMatchConfig, FlowMatchEuler, linear_quadratic_sigmas

G = reference_generator("generate_mochi_pipeline")
M = G._MOCHI  # generate_mochi: the tiny transformer, its cases and their stored outputs
MODEL_TOL = 3.8e-6  # the transformer against generate_mochi's stored outputs, as tests/test_mochi.py measured it
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


# ---- the recipe ---------------------------------------------------------------------------------------------------

# Final latents against MochiPipeline's, fp32. Not bit-exact even in process: for each batch row diffusers attends
# over the visual and the valid text tokens only, minidit over all 256 text tokens with the padded ones masked (the
# same attention; a longer masked reduction that rounds differently; with the text cut to its valid tokens the two
# agree bit for bit). Worst error: live 7.84e-7; stored (tests/measure_tolerances.py, default/avx2/avx512; the fixture
# was written at avx512) 7.84e-7 (avx512), x 5. A wrong threshold, timestep or shift moves the latents by > 1e-2:
PIPELINE_TOL = 4.0e-6
# The same in bf16: 2.80e-2 live and stored (avx512; torch's bf16 attention cannot run under the emulated default
# and avx2 capabilities here), x 5. Loose: it shows that the bf16 path runs and lands near MochiPipeline's, not which
# bf16 rounding each operation does.
PIPELINE_BF16_TOL = 1.4e-1
LAYERS = 48


@functools.cache
def recipe(layout_folder, height=32, width=48, frames=7) -> MochiRecipe:
    return MochiRecipe(layout_folder, dtype=torch.float32, device="cpu", height=height, width=width, frames=frames)


def generate(r: MochiRecipe, guidance: float) -> torch.Tensor:
    return r.generate([G.PIPELINE_PROMPT], G.PIPELINE_SEED, r.make_scheduler("mochi", G.PIPELINE_STEPS), guidance)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what=None) -> None:
    """Within `tolerance` (scaled_error), live or stored alike: see PIPELINE_TOL."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    error = scaled_error(actual, expected)
    assert error <= tolerance, (what, error, tolerance)


@functools.cache
def final_latents(case: str, folder) -> torch.Tensor:
    _, height, width, frames, guidance = G.PIPELINE_CASES[case]
    return generate(recipe(folder, height, width, frames), guidance)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.PIPELINE_CASES)
def test_pipeline_final_latents(case, source, assembled):
    """3 steps, guidance 4.5 ([uncond; cond] batch) or 1 (one branch), seed 0, T5 length 256 with the mask, from the
    bf16 variant (upcast to fp32) or the fp32 files: MochiPipeline's final latents at 7 frames of 32x48 and 13 of
    48x32 (2 and 3 latent frames)."""
    layout, height, width, frames, _ = G.PIPELINE_CASES[case]
    folder = assembled(layout)
    latents = final_latents(case, folder)
    assert latents.shape == (1, 12, (frames - 1) // 6 + 1, height // 8, width // 8)
    expected = stored()[f"pipeline/{case}/latents"] if source == "fixture" else G.reference_pipeline(case, folder)
    assert_close(latents, expected, PIPELINE_TOL, case)


@pytest.mark.parametrize("source", SOURCES)
def test_pipeline_in_bf16(source, assembled):
    """The whole recipe in bf16 (a GPU run's dtype: the noise cast after a float32 draw, t in bf16, the step in
    float32 and cast back) against MochiPipeline run in bf16 from the bf16 variant. Far from bit-exact: the rounding
    differences of the masked attention (see PIPELINE_TOL) grow through 48 blocks in bf16."""
    _, height, width, frames, guidance = G.PIPELINE_CASES[G.BF16_CASE]
    folder = assembled("variant")
    r = MochiRecipe(folder, dtype=torch.bfloat16, device="cpu", height=height, width=width, frames=frames)
    latents = generate(r, guidance)
    expected = stored()[f"pipeline/{G.BF16_CASE}/latents_bf16"] if source == "fixture" else \
        G.reference_pipeline(G.BF16_CASE, folder, torch.bfloat16)
    assert_close(latents, expected, PIPELINE_BF16_TOL, "bf16")


def test_genmo_and_hub_folders_give_the_same_latents(assembled):
    """A folder with genmo's dit.safetensors at its root (and no transformer weights) samples exactly what the Hub
    layout's fp32 files sample."""
    genmo = generate(recipe(assembled("genmo")), 4.5)
    assert torch.equal(genmo, final_latents("hub/small", assembled("hub")))
    assert_close(genmo, stored()["pipeline/hub/small/latents"], PIPELINE_TOL, "genmo")


def test_recipe_defaults_and_layers(assembled):
    """MochiPipeline's defaults: 64 steps, guidance 4.5, 19 frames at 480x848, 256 T5 tokens; 48 joint layers."""
    r = MochiRecipe(assembled("variant"), dtype=torch.float32, device="cpu")
    assert (r.default_steps, r.default_guidance, r.frames, r.resolution, r.max_sequence_length) == \
        (64, 4.5, 19, (480, 848), 256)
    assert r.schedulers == ("mochi",) and r.default_scheduler == "mochi" and not r.decodes
    assert r.branches(4.5) == ("uncond", "cond") and r.branches(1.0) == ("cond",)
    assert r.default_prompts()[0].startswith("a red fox")
    assert recipe(assembled("variant")).manifest_fields() == {"resolution": [32, 48], "frames": 7,
                                                             "max_sequence_length": 256}
    s = r.make_scheduler("mochi", 64)
    assert s.cfg.invert_sigmas and s.timesteps[0] == 0.0 and s.sigmas[0] == 1.0
    layers = r.attention_layers()
    assert len(layers) == LAYERS and all(layer.kind == "joint" for layer in layers)
    text, mask = r.encode(G.PIPELINE_PROMPT)
    assert text.shape == (1, 256, 32) and mask.shape == (1, 256) and 1 < int(mask.sum()) < 256
    assert not torch.equal(r.encode(G.PIPELINE_PROMPT.lower())[0], text)  # the prompt as given, not lower-cased


def test_bad_frames_size_and_missing_weights(tmp_path):
    """Refused with one clear message, before any weights are read (an empty folder gives the frames and size
    errors, not a missing-file one)."""
    for frames in (8, 0, 18):
        with pytest.raises(MiniditError, match=r"--frames must be 6k\+1 for Mochi 1 preview \(1, 7, 13, 19, \.\.\.; "):
            MochiRecipe(tmp_path, dtype=torch.float32, device="cpu", frames=frames)
    for size in ((40, 48), (32, 40), (0, 48)):
        with pytest.raises(MiniditError, match="multiples of 16"):
            MochiRecipe(tmp_path, dtype=torch.float32, device="cpu", height=size[0], width=size[1])
    with pytest.raises(MiniditError, match="--max-sequence-length must be at least 1"):
        MochiRecipe(tmp_path, dtype=torch.float32, device="cpu", max_sequence_length=0)
    with pytest.raises(MiniditError, match="scheduler_config.json is missing"):
        MochiRecipe(tmp_path, dtype=torch.float32, device="cpu")
    folder = G.assemble("variant", tmp_path / "no-transformer")
    for f in (folder / "transformer").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(MiniditError, match="holds no Mochi transformer.*or genmo's dit.safetensors"):
        MochiRecipe(folder, dtype=torch.float32, device="cpu")


def test_text_encoder_is_released_after_prepare(assembled):
    r = MochiRecipe(assembled("variant"), dtype=torch.float32, device="cpu")
    expected = r.encode("a prompt")
    r.prepare(["a prompt"])
    assert r.text_encoder is None and "" in r.embeddings
    assert all(torch.equal(a, b) for a, b in zip(r.encode("a prompt"), expected))
    with pytest.raises(MiniditError, match="released"):
        r.encode("another prompt")
    with pytest.raises(MiniditError, match="save-latents"):
        r.decode(torch.zeros(1, 12, 2, 4, 6))


# ---- analyze.py end to end ----------------------------------------------------------------------------------------

spec = importlib.util.spec_from_file_location("analyze", ROOT / "analyze.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("mochi-analyze")


@functools.cache
def analysis(tmp) -> tuple[int, object]:
    prompts = tmp / "prompts.txt"
    prompts.write_text(G.PIPELINE_PROMPT + "\n")
    out = tmp / "run"
    code = analyze.main(["--model", "mochi", "--weights", str(G.FOLDER), "--steps", str(G.PIPELINE_STEPS),
                         "--height", "32", "--width", "48", "--frames", "7", "--prompts", str(prompts),
                         "--device", "cpu", "--save-latents", "--out", str(out)])
    return code, out


@pytest.mark.parametrize("source", SOURCES)
def test_analyze_end_to_end(source, tmp):
    """analyze.py --model mochi --weights on the committed folder (the bf16 variant, as downloaded): 48 joint layers,
    streams img and txt (the last block's text has K and V but no A), branches uncond and cond; the manifest's
    schedule is Mochi's; --save-latents writes MochiPipeline's final latents for the same prompt, seed and settings."""
    code, out = analysis(tmp)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    s = mochi_scheduler(G.PIPELINE_STEPS)
    assert manifest["frames"] == 7 and manifest["resolution"] == [32, 48] and manifest["max_sequence_length"] == 256
    assert manifest["timesteps"] == s.timesteps and manifest["sigmas"] == s.sigmas and manifest["sigmas"][0] == 1.0
    assert manifest["scheduler"]["schedule"] == "mochi" and manifest["scheduler"]["config"]["invert_sigmas"]
    assert manifest["guidance"] == 4.5 and manifest["repo"] == "genmo/mochi-1-preview"
    assert manifest["branches"] == ["uncond", "cond"] and manifest["streams"] == ["img", "txt"]
    assert [layer["name"] for layer in manifest["layers"]] == [f"transformer_blocks.{i}.attn1" for i in range(LAYERS)]
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["layer"]) for r in rows} == set(range(LAYERS)) and {r["kind"] for r in rows} == {"joint"}
    cells = {(int(r["layer"]), r["stream"], r["tensor"]) for r in rows}
    last_text_a = (LAYERS - 1, "txt", "A")
    assert cells == {(i, s, t) for i in range(LAYERS) for s in ("img", "txt") for t in "KVA"} - {last_text_a}
    assert {r["branch"] for r in rows} >= {"uncond", "cond"}
    latents = load_file(out / "latents" / "000000.safetensors")["latents"]
    expected = stored()["pipeline/variant/small/latents"] if source == "fixture" else \
        G.reference_pipeline("variant/small", G.FOLDER)
    assert_close(latents, expected, PIPELINE_TOL, "latents")


@pytest.mark.parametrize(("flags", "message"), [
    (["--save-images"], "--save-latents"),
    (["--frames", "8"], "6k+1"),
    (["--height", "40"], "multiples of 16"),
    (["--dynamic-cfg"], "--dynamic-cfg does not apply to mochi"),
])
def test_analyze_bad_input_fails_cleanly(flags, message, tmp, capsys):
    """One error line, no traceback, exit code 2, no run directory."""
    out = tmp / f"refused{len(flags)}{flags[0]}"
    code = analyze.main(["--model", "mochi", "--weights", str(G.FOLDER), "--steps", "2", "--device", "cpu",
                         "--num-prompts", "1", "--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
