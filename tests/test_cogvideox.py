"""CogVideoX-5b and -2b: the transformer, its capture points, the full-size configs, the CogVideoX DDIM scheduler, and
the whole text-to-video recipe against diffusers on identical tiny weights, then analyze.py end to end.

Every case goes through minidit's real loading code on tiny pipeline folders in the exact Hub layouts written by
tests/reference/generate_cogvideox.py: CogVideoX-5b (42 blocks, RoPE, the transformer in two bf16 shards plus the
index) and CogVideoX-2b (30 blocks, 3D sin-cos positions, one fp16 file), each with the Hub's model_index.json and
scheduler config, T5 in two shards and its sentencepiece tokenizer. Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/cogvideox/VERSIONS.json);
- "live": the reference rebuilt now from the same files with the installed diffusers (skipped without it), which
  minidit must equal bit for bit.
Errors are max |minidit - reference| / max(1, max |reference|).
"""

import csv
import functools
import importlib.util
import json
import math

import pytest
import torch
from conftest import ROOT, SOURCES, assert_matches, reference_generator, scaled_error
from safetensors.torch import load_file
from test_capture_points import KeepAll

from minidit import weights
from minidit.attention import explicit_attention, recording
from minidit.errors import MiniditError
from minidit.models.cogvideox import PRESETS, CogVideoXConfig, CogVideoXTransformer, load_cogvideox, rope_3d, rope_crop
from minidit.pipelines.cogvideox import CogVideoXRecipe, dynamic_guidance
from minidit.schedulers.cogvideox_ddim import CogVideoXDDIM, CogVideoXDDIMConfig

G = reference_generator("generate_cogvideox")
# fp32. Live (in-process): 0 everywhere (bit-exact). Against the stored fixtures, the worst error per comparison
# (tests/measure_tolerances.py, default/avx2/avx512; the fixture was written at avx512, where all are 0), x 5:
TOL = 1.1e-6  # transformer: 2.14e-7 (default) x 5
CAPTURE_TOL = 1.2e-6  # K, V, A: 2.38e-7 (default, avx2) x 5
SCHEDULER_TOL = 2.4e-6  # alphas and steps: 4.75e-7 (default) x 5
PIPELINE_TOL = 3.3e-6  # final latents, through the recipe and through analyze.py: 6.51e-7 (default) x 5
NAMES = {"5b": "CogVideoX-5b", "2b": "CogVideoX-2b"}
LAYERS = {"5b": 42, "2b": 30}


@functools.cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@functools.cache
def fullsize() -> dict:
    return json.loads((G.FIXTURES / "fullsize.json").read_text())


@functools.cache
def model(variant: str) -> CogVideoXTransformer:
    return load_cogvideox(G.FOLDERS[variant] / "transformer", dtype=torch.float32)


def case_inputs(case: str) -> dict[str, torch.Tensor]:
    variant = G.MODEL_CASES[case][0]
    return {"x": stored()[f"model/{case}/x"], "t": stored()[f"model/{case}/t"],
            "text": stored()[f"model/{variant}/text"]}


def forward(m: CogVideoXTransformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return m(inputs["x"], inputs["text"], inputs["t"])


# ---- the transformer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.MODEL_CASES)
def test_transformer_matches_reference(case, source):
    """RoPE (5b) and sin-cos (2b); the training grid, other latent grids (5b: positions from a crop of the training
    grid; 2b: the table rebuilt), 1 to 5 latent frames, timesteps 0 to 999, given as CogVideoXPipeline gives them."""
    variant = G.MODEL_CASES[case][0]
    inputs = case_inputs(case)
    if source == "fixture":
        expected = stored()[f"model/{case}/out"]
    else:
        expected = G.reference_forward(G.load_transformer(variant), inputs)
    assert_matches(forward(model(variant), inputs), expected, source, TOL, case)


def test_explicit_attention_matches_fused():
    for case in ("5b/cropped", "2b/other-size"):
        m, inputs = model(G.MODEL_CASES[case][0]), case_inputs(case)
        with explicit_attention():
            explicit = forward(m, inputs)
        assert scaled_error(explicit, forward(m, inputs)) < 1e-5


@pytest.mark.parametrize("variant", ["5b", "2b"])
def test_loads_the_stored_dtypes(variant):
    """5b: two bf16 shards plus the index; 2b: one fp16 file. Either loads in the requested dtype: the stored values
    (exactly in fp32)."""
    folder = G.FOLDERS[variant] / "transformer"
    stored_dtype = {"5b": "BF16", "2b": "F16"}[variant]
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == (2 if variant == "5b" else 1)
    assert {dtype for f in files for dtype, _ in weights.safetensors_header(f).values()} == {stored_dtype}
    raw = weights.load_folder(folder)
    for dtype in (torch.float32, torch.bfloat16):
        m = model(variant) if dtype == torch.float32 else load_cogvideox(folder, dtype=dtype)
        sd = m.state_dict()
        assert len(sd) == len(raw) and all(p.dtype == dtype for p in sd.values())
        assert all(torch.equal(sd[k], raw[k].to(dtype)) for k in raw)
    cfg = model(variant).config
    assert cfg.use_rotary_positional_embeddings == (variant == "5b") and cfg.num_layers == LAYERS[variant]


def test_2b_needs_its_text_length():
    inputs = case_inputs("2b/other-size")
    with pytest.raises(MiniditError, match="exactly 226 text tokens"):
        model("2b")(inputs["x"], inputs["text"][:, :100], inputs["t"])


def test_rope_crop_and_pairing():
    """The crop of the training grid (the identity at 480x720), and the rotation angles of a token against a
    hand-computed float64 table: channels t:h:w = 4:6:6 of a 16-wide head, consecutive pairs."""
    assert rope_crop((30, 45), (30, 45)) == ((0, 0), (30, 45))
    assert rope_crop((3, 4), (4, 6)) == ((0, 0), (4, 5))  # NOTE(official): round(0.5) = 0, Python's rounding
    assert rope_crop((6, 3), (4, 6)) == ((0, 2), (4, 4))
    cos, sin = rope_3d(16, 3, (4, 6), ((0, 0), (4, 6)))
    assert cos.shape == sin.shape == (3 * 4 * 6, 16)
    t, i, j = 2, 3, 5
    token = (t * 4 + i) * 6 + j
    angles = [p * 10000.0 ** (-2 * k / d) for p, d in ((t, 4), (i, 6), (j, 6)) for k in range(d // 2)]
    expected = torch.tensor([a for a in angles for _ in range(2)], dtype=torch.float64)
    assert torch.allclose(cos[token].double(), expected.cos(), atol=1e-6)
    assert torch.allclose(sin[token].double(), expected.sin(), atol=1e-6)


# ---- capture points ---------------------------------------------------------------------------------------------

@functools.cache
def captured(variant: str) -> dict[str, torch.Tensor]:
    recorder = KeepAll()
    inputs = {k: v[:1] for k, v in case_inputs(G.CAPTURE_CASE[variant]).items()}
    with recording(recorder):
        forward(model(variant), inputs)
    return recorder.tensors


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("variant", ["5b", "2b"])
def test_captured_tensors_equal_the_reference(variant, source):
    """K and V (after the projection, head split, QK LayerNorm and, 5b, RoPE on the video tokens) and A (to_out's
    output over the joint sequence), each cut into its text and video tokens, [text; video] as the processor joins
    them. The fixture holds the first, second and last layers; the live case checks every layer."""
    if source == "fixture":
        prefix = f"captures/{variant}/"
        theirs = {k[len(prefix):]: v for k, v in stored().items() if k.startswith(prefix)}
        layers = [f"transformer_blocks.{i}.attn1" for i in G.CAPTURE_LAYERS[variant]]
    else:
        theirs = G.reference_captures(variant)
        layers = [f"transformer_blocks.{i}.attn1" for i in range(LAYERS[variant])]
    expected_keys = {f"{layer}/{tensor}/{s}" for layer in layers for tensor in "KVA" for s in ("txt", "img")}
    ours = captured(variant)
    assert {k.rsplit("/", 2)[0] for k in ours} == {f"transformer_blocks.{i}.attn1" for i in range(LAYERS[variant])}
    assert theirs.keys() == expected_keys
    for key in sorted(expected_keys):
        assert_matches(ours[key], theirs[key], source, CAPTURE_TOL, key)


# ---- full size --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["5b", "2b"])
def test_fullsize_on_meta(variant):
    """The official configs: parameter counts (5,570,283,072 and 1,693,783,872), the 1024 / 736 key names and shapes
    (diffusers on meta), 42 / 30 joint layers."""
    name = NAMES[variant]
    assert CogVideoXConfig.from_hub(G.hub_transformer_config(variant, tiny=False)) == PRESETS[name]
    with torch.device("meta"):
        m = CogVideoXTransformer(PRESETS[name])
    expected = fullsize()[name]
    count = sum(p.numel() for p in m.parameters())
    assert count == expected["parameters"] == {"5b": 5_570_283_072, "2b": 1_693_783_872}[variant]
    keys = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert keys == expected["keys"] and len(keys) == {"5b": 1024, "2b": 736}[variant]
    layers = m.attention_layers()
    assert [layer.name for layer in layers] == [f"transformer_blocks.{i}.attn1" for i in range(LAYERS[variant])]
    assert all(layer.kind == "joint" and layer.streams == ("img", "txt") for layer in layers)


def test_config_defaults_and_refusals():
    """Keys absent from the Hub file take diffusers' defaults; the variants minidit does not implement are refused."""
    hub = G.hub_transformer_config("5b", tiny=False)
    assert "patch_size_t" not in hub and "use_learned_positional_embeddings" not in hub
    cfg = CogVideoXConfig.from_hub({"num_layers": 42})  # everything else absent
    assert (cfg.num_attention_heads, cfg.time_embed_dim, cfg.norm_eps, cfg.use_rotary_positional_embeddings) == \
        (30, 512, 1e-5, False)
    for key, value in (("patch_size_t", 2), ("ofs_embed_dim", 512), ("use_learned_positional_embeddings", True)):
        with pytest.raises(MiniditError, match=key):
            CogVideoXConfig.from_hub({**hub, key: value})


# ---- scheduler ----------------------------------------------------------------------------------------------------

@functools.cache
def live_scheduler(case: str, steps: int) -> dict[str, torch.Tensor]:
    return G.reference_scheduler(case, steps) | {"alphas_cumprod": G.make_scheduler(case).alphas_cumprod}


def scheduler_reference(source: str, case: str, steps: int, key: str) -> torch.Tensor:
    if source == "live":
        return live_scheduler(case, steps)[key]
    if key == "alphas_cumprod":
        return stored()[f"scheduler/{case}/alphas_cumprod"]
    return stored()[f"scheduler/{case}/{steps}/{key}"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.SCHEDULER_STEPS)
@pytest.mark.parametrize("case", G.SCHEDULER_CONFIGS)
def test_scheduler_matches_reference(case, steps, source):
    """The 5b (snr_shift_scale 1.0) and 2b (3.0) Hub configs (v-prediction, trailing, zero terminal SNR) and diffusers'
    defaults (epsilon, leading, no rescale): timesteps, alphas, and every step() in float32 and on bf16 latents."""
    s = CogVideoXDDIM(CogVideoXDDIMConfig.from_hub(G.SCHEDULER_CONFIGS[case]), steps)
    assert s.timesteps == scheduler_reference(source, case, steps, "timesteps").tolist()
    assert_matches(s.alphas_cumprod, scheduler_reference(source, case, steps, "alphas_cumprod"), source,
                   SCHEDULER_TOL, "alphas_cumprod")
    inputs = G.step_inputs(case, steps)
    for key, sample in (("prev", inputs["sample"]), ("prev_bf16", inputs["sample"].bfloat16())):
        ours = torch.stack([s.step(inputs["model_output"][i], t, sample[i]) for i, t in enumerate(s.timesteps)])
        assert_matches(ours, scheduler_reference(source, case, steps, key), source, SCHEDULER_TOL, key)


def test_scheduler_hub_configs():
    """Zero terminal SNR: the first trailing timestep (999) is pure noise (alpha 0, sigma inf in the manifest)."""
    for variant in ("5b", "2b"):
        cfg = CogVideoXDDIMConfig.from_hub(weights.read_json(G.FOLDERS[variant] / "scheduler" /
                                                             "scheduler_config.json"))
        assert cfg.snr_shift_scale == G.SNR_SHIFT_SCALE[variant] and cfg.rescale_betas_zero_snr
        s = CogVideoXDDIM(cfg, 50)
        assert s.timesteps[0] == 999 and s.timesteps[-1] == 19 and s.alphas_cumprod[999] == 0
        assert s.sigmas[0] == math.inf and all(math.isfinite(v) for v in s.sigmas[1:])
    with pytest.raises(MiniditError, match="trained_betas"):
        CogVideoXDDIMConfig.from_hub({"trained_betas": [0.1, 0.2]})


def test_dynamic_guidance():
    """The pipeline's formula takes the DDIM timestep, not the step index: at t = 0 the scale is the full 1 + g, and
    it stays within [1, 1 + g]."""
    assert dynamic_guidance(6.0, 0, 50) == pytest.approx(1 + 6.0 * (1 - math.cos(math.pi)) / 2) == 7.0
    values = [dynamic_guidance(6.0, t, 50) for t in CogVideoXDDIM(CogVideoXDDIMConfig.from_hub(G.HUB_SCHEDULER),
                                                                    50).timesteps]
    assert all(1 <= g <= 7 for g in values) and len(set(values)) > 10


# ---- the recipe ---------------------------------------------------------------------------------------------------

@functools.cache
def recipe(variant: str, height=None, width=None, frames=None, dynamic_cfg=None) -> CogVideoXRecipe:
    return CogVideoXRecipe(G.FOLDERS[variant], dtype=torch.float32, device="cpu", height=height, width=width,
                           frames=frames, dynamic_cfg=dynamic_cfg)


@functools.cache
def final_latents(case: str) -> torch.Tensor:
    variant, height, width, frames, dynamic = G.PIPELINE_CASES[case]
    r = recipe(variant, height, width, frames, dynamic)
    return r.generate([G.PIPELINE_PROMPT], G.PIPELINE_SEED, r.make_scheduler("ddim", G.PIPELINE_STEPS),
                      G.PIPELINE_GUIDANCE)


@functools.cache
def pipeline_reference(case: str, source: str) -> torch.Tensor:
    return stored()[f"pipeline/{case}/latents"] if source == "fixture" else G.reference_pipeline(case)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.PIPELINE_CASES)
def test_pipeline_final_latents(case, source):
    """3 DDIM steps, guidance 6 ([uncond; cond] batch), seed 0, T5 length 226: CogVideoXPipeline's final latents at
    the default 64x96 (5 frames) and at 48x64 (9 frames), 5b once with use_dynamic_cfg."""
    variant, height, width, frames, _ = G.PIPELINE_CASES[case]
    latents = final_latents(case)
    assert latents.shape == (1, (frames - 1) // 4 + 1, 16, (height or 64) // 8, (width or 96) // 8)
    assert_matches(latents, pipeline_reference(case, source), source, PIPELINE_TOL, case)


def test_dynamic_cfg_changes_the_latents():
    variant, height, width, frames, _ = G.PIPELINE_CASES["5b/small-dynamic"]
    r = recipe(variant, height, width, frames)
    static = r.generate([G.PIPELINE_PROMPT], G.PIPELINE_SEED, r.make_scheduler("ddim", G.PIPELINE_STEPS),
                        G.PIPELINE_GUIDANCE)
    assert scaled_error(static, final_latents("5b/small-dynamic")) > 1e-3


@pytest.mark.parametrize("variant", ["5b", "2b"])
def test_recipe_defaults_and_layers(variant):
    r = recipe(variant)
    assert (r.default_steps, r.default_guidance, r.max_sequence_length, r.dynamic_cfg) == (50, 6.0, 226, False)
    assert r.frames == 9 and r.resolution == (64, 96)  # the config's sample_frames and sample size x 8
    assert r.schedulers == ("ddim",) and r.default_scheduler == "ddim" and not r.decodes
    assert r.branches(6.0) == ("uncond", "cond") and r.branches(1.0) == ("cond",)
    assert recipe(variant, 48, 64, 5).manifest_fields() == {"resolution": [48, 64], "frames": 5,
                                                            "max_sequence_length": 226, "dynamic_cfg": False}
    layers = r.attention_layers()
    assert len(layers) == LAYERS[variant] and all(layer.kind == "joint" for layer in layers)
    assert r.make_scheduler("ddim", 50).cfg.snr_shift_scale == G.SNR_SHIFT_SCALE[variant]


def test_bad_frames_size_and_text_length():
    for frames in (10, 0, 48):
        with pytest.raises(MiniditError, match=r"--frames must be 4k\+1 for CogVideoX \(1, 5, 9, 13, \.\.\.; defau"):
            recipe("5b", frames=frames)
    with pytest.raises(MiniditError, match="multiples of 16"):
        recipe("5b", 40, 64)
    with pytest.raises(MiniditError, match="--max-sequence-length must be 226"):
        CogVideoXRecipe(G.FOLDERS["2b"], dtype=torch.float32, device="cpu", max_sequence_length=120)
    short = CogVideoXRecipe(G.FOLDERS["5b"], dtype=torch.float32, device="cpu", max_sequence_length=120)
    assert short.encode("a boat")[0].shape == (1, 120, 32)  # 5b (RoPE) takes any length
    with pytest.raises(MiniditError, match="save-latents"):
        recipe("5b").decode(final_latents("5b/default"))


def test_text_encoder_is_released_after_prepare():
    r = CogVideoXRecipe(G.FOLDERS["2b"], dtype=torch.float32, device="cpu")
    expected = r.encode("a prompt")[0]
    r.prepare(["a prompt"])
    assert r.text_encoder is None and "" in r.embeddings
    assert torch.equal(r.encode("a prompt")[0], expected)
    with pytest.raises(MiniditError, match="released"):
        r.encode("another prompt")


# ---- analyze.py end to end ----------------------------------------------------------------------------------------

spec = importlib.util.spec_from_file_location("analyze", ROOT / "analyze.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)


@functools.cache
def analysis(variant: str, tmp) -> tuple:
    prompts = tmp / f"prompts-{variant}.txt"
    prompts.write_text(G.PIPELINE_PROMPT + "\n")
    out = tmp / f"run-{variant}"
    code = analyze.main(["--model", f"cogvideox-{variant}", "--weights", str(G.FOLDERS[variant]), "--steps",
                         str(G.PIPELINE_STEPS), "--num-prompts", "1", "--frames", "5", "--prompts", str(prompts),
                         "--device", "cpu", "--save-latents", "--out", str(out)])
    return code, out


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("cogvideox-analyze")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("variant", ["5b", "2b"])
def test_analyze_end_to_end(variant, source, tmp):
    """analyze.py --model cogvideox-5b|2b on the tiny folders: 42 / 30 joint layers, streams img and txt, branches
    uncond and cond in summary.csv; --save-latents writes CogVideoXPipeline's final latents for the same prompt, seed
    and settings (the default 64x96, 5 frames, 3 steps, guidance 6)."""
    code, out = analysis(variant, tmp)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert manifest["frames"] == 5 and manifest["resolution"] == [64, 96] and manifest["timesteps"] == [999, 666, 332]
    assert manifest["sigmas"][0] is None  # zero terminal SNR: pure noise, an infinite sigma (standard JSON: null)
    assert manifest["scheduler"]["config"]["snr_shift_scale"] == G.SNR_SHIFT_SCALE[variant]
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["layer"]) for r in rows} == set(range(LAYERS[variant]))
    assert {r["kind"] for r in rows} == {"joint"}
    assert manifest["branches"] == ["uncond", "cond"] and manifest["streams"] == ["img", "txt"]
    assert {(r["stream"], r["branch"], r["tensor"]) for r in rows} >= {
        (s, b, t) for s in ("img", "txt") for b in ("uncond", "cond") for t in "KVA"}
    latents = load_file(out / "latents" / "000000.safetensors")["latents"]
    assert_matches(latents, pipeline_reference(f"{variant}/default", source), source, PIPELINE_TOL, "latents")


def test_analyze_save_images_fails_cleanly(tmp, capsys):
    code = analyze.main(["--model", "cogvideox-2b", "--weights", str(G.FOLDERS["2b"]), "--steps", "2",
                         "--num-prompts", "1", "--frames", "1", "--device", "cpu", "--save-images",
                         "--out", str(tmp / "images")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    assert "3D VAE" in err[-1] and "--save-latents" in err[-1]
    assert not (tmp / "images").exists()  # refused before anything was loaded or sampled


@pytest.mark.parametrize(("flag", "field"), [(["--dynamic-cfg"], "dynamic_cfg"),
                                             (["--max-sequence-length", "200"], "max_sequence_length")])
def test_resume_with_other_text_or_guidance_settings_is_refused(flag, field, tmp, capsys):
    """dynamic_cfg and the T5 length change the samples, so they are part of a run's identity: a --resume that
    changes them is refused, naming the field, and leaves the run as it was."""
    code, out = analysis("5b", tmp)
    assert code == 0 and json.loads((out / "manifest.json").read_text())[field] in (False, 226)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    code = analyze.main(["--model", "cogvideox-5b", "--weights", str(G.FOLDERS["5b"]), "--steps",
                         str(G.PIPELINE_STEPS), "--frames", "5", "--prompts", str(tmp / "prompts-5b.txt"),
                         "--device", "cpu", "--save-latents", "--out", str(out), "--resume", *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"different {field}" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
