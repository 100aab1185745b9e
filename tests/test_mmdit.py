"""SD3-medium's MMDiT and FLUX.1's transformer against diffusers on identical tiny weights, in both layouts each.

Every case goes through minidit's real loading code on files written by tests/reference/generate_mmdit.py:
the Hub layout (SD3: one fp16 file with the stored position table; FLUX: three bf16 shards plus the index) and
the single-file layouts (SD3's `model.diffusion_model.` file with fused qkv; BFL's FLUX files with fused qkv
and linear1). Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/mmdit/VERSIONS.json);
- "live": the reference rebuilt now from the same files with the installed diffusers (skipped without it).
Models are loaded in fp32 from the 16-bit files, as the reference is. Errors are max |minidit - reference| /
max(1, max |reference|).
"""

import json
from functools import cache

import pytest
import torch
from conftest import SOURCES, reference_generator, scaled_error
from safetensors.torch import load_file

from minidit.attention import explicit_attention
from minidit.errors import MiniditError
from minidit.models.flux import PRESETS as FLUX_PRESETS
from minidit.models.flux import FluxConfig, FluxTransformer, load_flux
from minidit.models.sd3 import PRESETS as SD3_PRESETS
from minidit.models.sd3 import SD3Config, SD3Transformer, load_sd3

G = reference_generator("generate_mmdit")
# Worst error against the stored fixtures, (tests/measure_tolerances.py, default/avx2/avx512):
# SD3 2.5e-7 (x 4 -> 1e-6), FLUX 2.3e-6 (x 4 -> 9.3e-6).
SD3_TOL, FLUX_TOL = 1e-6, 9.3e-6


@cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


def inputs(case: str) -> dict[str, torch.Tensor]:
    prefix = f"{case}/"
    return {k[len(prefix):]: v for k, v in stored().items() if k.startswith(prefix) and k != f"{case}/out"}


def expected(case: str, source: str) -> torch.Tensor:
    if source == "fixture":
        return stored()[f"{case}/out"]
    kind = "sd3" if case == "sd3" else "flux"
    model = G.load(kind, G.FIXTURES / case / "transformer")
    forward = G.sd3_forward if kind == "sd3" else G.flux_forward
    return forward(model, inputs(case))


def run_sd3(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(x["x"], x["t"], x["text"], x["pooled"])


def run_flux(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(x["x"], x["t"], x["text"], x["pooled"], x["img_ids"], x["txt_ids"], x.get("guidance"))


def tiny_sd3_config() -> SD3Config:
    return SD3Config.from_hub(json.loads((G.FIXTURES / "sd3" / "transformer" / "config.json").read_text()))


def tiny_flux_config(case: str) -> FluxConfig:
    return FluxConfig.from_hub(json.loads((G.FIXTURES / case / "transformer" / "config.json").read_text()))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("layout", ["hub", "single_file"])
def test_sd3_matches_reference(layout, source):
    """Batch 2, a 3 x 5 patch grid cropped from the position table, two timesteps."""
    path = G.FIXTURES / "sd3" / ("transformer" if layout == "hub" else "sd3_tiny.safetensors")
    model = load_sd3(path, config=tiny_sd3_config() if layout == "single_file" else None)
    assert scaled_error(run_sd3(model, inputs("sd3")), expected("sd3", source)) < SD3_TOL


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("layout", ["hub", "single_file"])
@pytest.mark.parametrize("case", ["flux-dev", "flux-schnell"])
def test_flux_matches_reference(case, layout, source):
    """Packed non-square latents (3 x 5 tokens), RoPE ids as FluxPipeline builds them, with (dev) and without
    (schnell) the guidance embedding."""
    path = G.FIXTURES / case / ("transformer" if layout == "hub" else "flux1-tiny.safetensors")
    model = load_flux(path, dtype=torch.float32, config=tiny_flux_config(case) if layout == "single_file" else None)
    assert model.config.guidance_embeds == (case == "flux-dev")
    assert scaled_error(run_flux(model, inputs(case)), expected(case, source)) < FLUX_TOL


def test_explicit_attention_matches_fused():
    sd3 = load_sd3(G.FIXTURES / "sd3" / "transformer")
    flux = load_flux(G.FIXTURES / "flux-dev" / "transformer", dtype=torch.float32)
    fused = run_sd3(sd3, inputs("sd3")), run_flux(flux, inputs("flux-dev"))
    with explicit_attention():
        explicit = run_sd3(sd3, inputs("sd3")), run_flux(flux, inputs("flux-dev"))
    assert max(scaled_error(a, b) for a, b in zip(explicit, fused, strict=True)) < 1e-5


@pytest.mark.parametrize("name", ["SD3-medium", "FLUX.1-dev", "FLUX.1-schnell"])
def test_fullsize_on_meta(name):
    """The official parameter counts (checkpoints.md §12.1) and diffusers' key names and shapes."""
    table = json.loads((G.FIXTURES / "fullsize.json").read_text())[name]
    with torch.device("meta"):
        if name == "SD3-medium":
            assert SD3Config.from_hub(G.SD3_HUB) == SD3_PRESETS["stable-diffusion-3-medium"]
            model = SD3Transformer(SD3_PRESETS["stable-diffusion-3-medium"])
        else:
            hub = {**G.FLUX_HUB, "guidance_embeds": name == "FLUX.1-dev"}
            assert FluxConfig.from_hub(hub) == FLUX_PRESETS[name]
            model = FluxTransformer(FLUX_PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == table["parameters"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == table["keys"]
    official = {"SD3-medium": (2_028_328_000, 683), "FLUX.1-dev": (11_901_408_320, 1160),
                "FLUX.1-schnell": (11_891_178_560, 1156)}
    assert (table["parameters"], len(table["keys"])) == official[name]
    layers = model.attention_layers()
    assert len(layers) == (24 if name == "SD3-medium" else 57)
    assert all(layer.streams == ("img", "txt") for layer in layers)
    if name != "SD3-medium":
        assert [layer.a_point for layer in layers] == ["post_proj"] * 19 + ["pre_proj"] * 38


def test_streams_are_recorded_by_token_range():
    """Joint attention hands the recorder [image; text] (SD3) and [text; image] (FLUX) K and V, and one A per
    stream; FLUX single-stream A is the attention result before the fused projection."""
    from collections import defaultdict

    from minidit.attention import recording

    class Capture:
        def __init__(self):
            self.calls = defaultdict(list)

        def capture(self, layer, tensor, x, token_dim, streams):
            self.calls[layer].append((tensor, tuple(x.shape), streams))

    rec = Capture()
    with recording(rec):
        run_sd3(load_sd3(G.FIXTURES / "sd3" / "transformer"), inputs("sd3"))
        run_flux(load_flux(G.FIXTURES / "flux-dev" / "transformer", dtype=torch.float32), inputs("flux-dev"))
    lt, l_img = G.SD3_TEXT, 15
    assert rec.calls["transformer_blocks.0.attn"][0][2] == (("img", l_img), ("txt", lt))
    # the last block has no text output: A and F of the image stream only
    assert [c[2] for c in rec.calls["transformer_blocks.2.attn"]] == [(("img", l_img), ("txt", lt))] * 2 + ["img"] * 2
    flux_single = rec.calls["single_transformer_blocks.0.attn"]
    assert [c[0] for c in flux_single] == ["K", "V", "A", "F"]  # F: the block's update, after its fused projection
    assert flux_single[2][2] == (("txt", G.FLUX_TEXT), ("img", 15)) and flux_single[2][1][-1] == 32
    assert flux_single[3][1:] == flux_single[2][1:]  # F: (B, Lt + L, D) over [text; image], as A


def test_bad_single_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    empty = tmp_path / "other.safetensors"
    save_file({"something.weight": torch.zeros(2)}, empty)
    with pytest.raises(MiniditError, match="not an SD3 single file"):
        load_sd3(empty)
    with pytest.raises(MiniditError, match="FLUX single file lacks"):
        load_flux(empty)
    with pytest.raises(MiniditError, match="SD3.5"):
        SD3Config.from_hub({**G.SD3_HUB, "qk_norm": "rms_norm"})
