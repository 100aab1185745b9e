"""PixArt-α: the transformer, its original-layout loader, the full-size configs, and the whole text-to-image recipe
against diffusers on identical tiny weights.

Every case goes through minidit's real loading code on files in the Hub layout written by
tests/reference/generate_pixart.py (a whole tiny PixArt-XL-2-1024-MS folder: byte-exact model_index.json and
scheduler config, the Hub's transformer config without use_additional_conditions and interpolation_scale, T5 in
two shards, the sentencepiece tokenizer, an 8x VAE). Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/pixart/VERSIONS.json);
- "live": the reference rebuilt now from the same files with the installed diffusers (skipped without it).
Errors are max |minidit - reference| / max(1, max |reference|).
"""

import json
import subprocess
import sys
from functools import cache

import pytest
import torch
from conftest import ROOT, SOURCES, reference_generator, scaled_error
from safetensors.torch import load_file

from minidit import weights
from minidit.attention import explicit_attention
from minidit.errors import MiniditError
from minidit.models.pixart import PRESETS, PixArt, PixArtConfig, load_pixart, original_to_hub
from minidit.pipelines.pixart import PixArtRecipe, bucket, resize_and_crop

G = reference_generator("generate_pixart")
# fp32. Live (in-process): 0 for the transformer. Against the stored fixtures, worst (tests/measure_tolerances.py,
# default/avx2/avx512): transformer 6.4e-6 (avx512) x 4 -> 2.6e-5; whole pipeline 1.54e-5 (the 700x1200
# request, avx2) x 4 -> 6.2e-5; resize-and-crop 3.2e-6 (default) x 4 -> 1.3e-5.
TOL = 2.6e-5
PIPELINE_TOL = 6.2e-5
RESIZE_TOLERANCE = 1.3e-5


@cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@cache
def fullsize() -> dict:
    return json.loads((G.FIXTURES / "fullsize.json").read_text())


def folder(variant: str):
    return (G.FOLDER_1024 if variant == "1024" else G.FOLDER_512) / "transformer"


def case_inputs(case: str) -> dict[str, torch.Tensor]:
    prefix = f"model/{case}/"
    return {k[len(prefix):]: v for k, v in stored().items() if k.startswith(prefix) and not k.endswith("/out")}


def reference_output(source: str, case: str) -> torch.Tensor:
    if source == "fixture":
        return stored()[f"model/{case}/out"]
    variant, _ = G.MODEL_CASES[case]
    return G.reference_forward(G.load_transformer(folder(variant)), case_inputs(case))


def forward(model: PixArt, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], inputs["text"], inputs.get("text_mask"), inputs.get("resolution"),
                     inputs.get("aspect_ratio"))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.MODEL_CASES)
def test_transformer_matches_reference(case, source):
    """Non-square latents, masked and unmasked text, with (1024) and without (512) micro-conditions."""
    variant, _ = G.MODEL_CASES[case]
    model = load_pixart(folder(variant))
    assert model.config.use_additional_conditions == (variant == "1024")
    assert model.config.interpolation_scale == (2 if variant == "1024" else 1)
    assert scaled_error(forward(model, case_inputs(case)), reference_output(source, case)) < TOL


def test_explicit_attention_matches_fused():
    model, inputs = load_pixart(folder("1024")), case_inputs("1024/masked")
    with explicit_attention():
        explicit = forward(model, inputs)
    assert scaled_error(explicit, forward(model, inputs)) < 1e-5


def test_text_mask_changes_the_output():
    """The masked case differs from the unmasked one only by the padding of row 0; row 1 has none."""
    masked, unmasked = stored()["model/1024/masked/out"], stored()["model/1024/unmasked/out"]
    assert not torch.allclose(masked[0], unmasked[0]) and torch.equal(masked[1], unmasked[1])


def test_original_pth_layout():
    """The released .pth layout ({"state_dict": ...}, fused qkv and kv) through ORIGINAL_TO_HUB."""
    cfg = load_pixart(folder("1024")).config
    model = load_pixart(G.ORIGINAL, config=cfg)
    assert scaled_error(forward(model, case_inputs("1024/masked")), stored()["model/1024/masked/out"]) < TOL


def test_micro_conditions_are_required_by_the_1024_model():
    inputs = case_inputs("1024/masked")
    with pytest.raises(MiniditError, match="micro-conditions"):
        load_pixart(folder("1024"))(inputs["x"], inputs["t"], inputs["text"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_fullsize_on_meta(name):
    """The full-size configs: the official parameter count, key set and shapes (diffusers on meta)."""
    sample_size = 128 if "1024" in name else 64
    hub = G.hub_transformer_config(sample_size, tiny=False)
    assert PixArtConfig.from_hub(hub) == PRESETS[name]  # the Hub file's absent keys take the right defaults
    with torch.device("meta"):
        model = PixArt(PRESETS[name])
    expected = fullsize()[name]
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected["keys"]
    assert len(model.attention_layers()) == 28


def test_fullsize_parameter_counts():
    """checkpoints.md §2.1: 611.35M parameters (2.45 GB fp32) for 1024, 611 and 603 tensors."""
    counts = {name: (t["parameters"], len(t["keys"])) for name, t in fullsize().items()}
    assert counts["PixArt-XL-2-1024-MS"][1] == 611 and counts["PixArt-XL-2-512x512"][1] == 603
    assert round(counts["PixArt-XL-2-1024-MS"][0] / 1e6, 2) == 611.35


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_original_layout_covers_every_fullsize_key(name):
    """Every original full-size key maps to a diffusers key of the same shape, and back to all of them."""
    with torch.device("meta"):
        sd = PixArt(PRESETS[name]).state_dict()
    original = G.to_original(sd, torch.Generator().manual_seed(0))
    converted = original_to_hub(original, PRESETS[name])
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in sd.items()}


def test_cross_attention_layers_are_optional():
    model = load_pixart(folder("512"))
    assert [layer.kind for layer in model.attention_layers()] == ["self"] * 2
    layers = model.attention_layers(cross=True)
    assert [layer.kind for layer in layers] == ["self"] * 2 + ["cross"] * 2
    assert layers[2].name == "transformer_blocks.0.attn2" and layers[2].streams == ("img", "txt")


def test_bad_config_is_refused():
    with pytest.raises(MiniditError, match="norm_type"):
        PixArtConfig.from_hub({**G.HUB_TRANSFORMER, "norm_type": "ada_norm_zero"})


# ---- the recipe: tokenizer + T5 + transformer + DPM-Solver++ + guidance, against PixArtAlphaPipeline -------------

@cache
def recipe(height: int | None, width: int | None) -> PixArtRecipe:
    return PixArtRecipe(G.FOLDER_1024, dtype=torch.float32, device="cpu", height=height, width=width)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.PIPELINE_CASES)
def test_pipeline_final_latents(case, source):
    """4 DPM-Solver++ steps, guidance 4.5, seed 0: the final latents of PixArtAlphaPipeline (default size, and a
    700x1200 request that lands in the 768x1344 bucket)."""
    height, width = G.PIPELINE_CASES[case]
    r = recipe(height, width)
    latents = r.generate([G.PIPELINE_PROMPT], G.PIPELINE_SEED, r.make_scheduler("dpm-solver++", G.PIPELINE_STEPS),
                         G.PIPELINE_GUIDANCE)
    expected = stored()[f"pipeline/{case}/latents"] if source == "fixture" else G.reference_pipeline(
        G.FOLDER_1024, height, width)
    assert scaled_error(latents, expected) < PIPELINE_TOL


def test_buckets():
    """The nearest aspect-ratio bucket, for the 1024, 512 and 256 tables."""
    assert bucket(1024, 1024, 128) == (1024, 1024) and bucket(700, 1200, 128) == (768, 1344)
    assert bucket(512, 2048, 64) == (256, 1024) and bucket(4000, 1000, 32) == (512, 128)
    assert recipe(700, 1200).resolution == (768, 1344) and recipe(None, None).resolution == (1024, 1024)


def test_resize_and_crop():
    images = stored()["resize/images"]
    assert scaled_error(resize_and_crop(images, 30, 44), stored()["resize/out"]) <= RESIZE_TOLERANCE


def test_decode_gives_the_requested_size():
    r = recipe(700, 1200)
    images = r.decode(torch.randn(1, 4, 96, 168))
    assert images.shape == (1, 700, 1200, 3) and images.dtype.name == "uint8"


def test_text_encoder_is_released_after_prepare():
    r = PixArtRecipe(G.FOLDER_1024, dtype=torch.float32, device="cpu", height=256, width=256)
    expected = r.encode("a prompt")
    r.prepare(["a prompt"])
    assert r.text_encoder is None
    assert torch.equal(r.encode("a prompt")[0], expected[0])
    with pytest.raises(MiniditError, match="released"):
        r.encode("another prompt")


def test_fp16_backbone_runs_t5_in_bf16():
    r = PixArtRecipe(G.FOLDER_1024, dtype=torch.float16, device="cpu", height=256, width=256)
    assert r.text_encoder.shared.weight.dtype == torch.bfloat16 and r.model.proj_out.weight.dtype == torch.float16
    assert r.encode("a prompt")[0].dtype == torch.float16


# ---- the analysis, end to end ------------------------------------------------------------------------------

@pytest.mark.any_cpu
def test_analyze_pixart_end_to_end(tmp_path):
    """analyze.py on the Hub-layout folder: PixArt's 28 self-attention layers (and the 28 cross-attention ones on
    request), summary, cv, figures and images written."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "analyze.py"), "--model", "pixart", "--weights", str(G.FOLDER_1024),
           "--steps", "3", "--num-prompts", "2", "--height", "512", "--width", "512", "--cross-attention",
           "--save-images", "--save-latents", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = [layer["kind"] for layer in manifest["layers"]]
    assert kinds == ["self"] * 28 + ["cross"] * 28
    # diffusers' binning: a 512x512 request runs the 1024 model at its 1024x1024 bucket, then resizes the image
    assert manifest["branches"] == ["uncond", "cond"] and manifest["resolution"] == [1024, 1024]
    assert manifest["scheduler"]["name"] == "dpm-solver++" and len(manifest["timesteps"]) == 3
    import csv

    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["layer"]) for r in rows} == set(range(56))
    cross_k = [r for r in rows if r["kind"] == "cross" and r["tensor"] == "K" and r["metric"] == "l1"
               and r["branch"] == "cond"]
    assert cross_k and all(float(r["mean"]) == 0 for r in cross_k)  # text K is the same at every step
    assert (out / "figures").is_dir() and any((out / "figures").glob("*.png"))
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 2 and len(list((out / "latents").glob("*"))) == 2
    from PIL import Image

    assert Image.open(images[0]).size == (512, 512)


def test_no_network_gives_one_line(tmp_path):
    """Without the weights and without the Hub: one line naming the repository and the ways to provide it."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(ROOT / "analyze.py"), "--model", "pixart", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PixArt-alpha/PixArt-XL-2-1024-MS" in lines[0] and "--weights" in lines[0], lines
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", [["--convention", "original"], ["--height", "0"]])
def test_bad_flags(tmp_path, flag):
    cmd = [sys.executable, str(ROOT / "analyze.py"), "--model", "pixart", "--weights", str(G.FOLDER_1024),
           "--out", str(tmp_path / "run"), *flag]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ")


def test_dit_refuses_text_flags(tmp_path):
    argv = ["--model", "dit-tiny", "--height", "64", "--out", str(tmp_path / "r")]
    result = subprocess.run([sys.executable, str(ROOT / "analyze.py"), *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "--height does not apply to dit-tiny" in result.stderr


def test_truncated_shard_is_reported(tmp_path):
    import shutil

    copy = tmp_path / "PixArt-XL-2-1024-MS"
    shutil.copytree(G.FOLDER_1024, copy)
    shard = copy / "text_encoder" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MiniditError, match="truncated"):
        weights.load_folder(copy / "text_encoder")

