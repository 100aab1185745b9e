"""VAE decoder: minidit's AutoencoderKL decoder against diffusers' on identical tiny weights, its loader's key
handling, and the full-size SD / SD3 / FLUX VAEs on the meta device.

Every fixture goes through `load_vae` on a Hub-layout `vae/` folder (tests/fixtures/vae, written by
tests/reference/generate_vae.py). Each decode is compared with:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/vae/VERSIONS.json);
- "live": diffusers' AutoencoderKL loaded now from the same folder (skipped without diffusers).
The error is max |minidit - reference| / max(1, max |reference|), in fp32.
Full-size expectations: checkpoints.md §2.4, §3.4, §10 (83,653,863 and 83,819,683 parameters for the whole
autoencoders) and diffusers' AutoencoderKL on meta (live, or the committed fixtures/vae/fullsize.json).
"""

import json
import subprocess
import sys
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, installed, reference_generator, scaled_error
from safetensors.torch import load_file

from minidit import weights
from minidit.attention import explicit_attention, recording
from minidit.errors import MiniditError
from minidit.vae.autoencoder_kl import (
    ENCODER_KEYS,
    PRESETS,
    AutoencoderKLDecoder,
    VAEConfig,
    decoder_state_dict,
    load_vae,
    to_uint8,
)

FIXTURES = ROOT / "tests" / "fixtures" / "vae"
# Worst fp32 error against the fixtures (tests/measure_tolerances.py, default/avx2/avx512):
# 1.9e-6 (decode parity, default) x 4 -> 8e-6.
TOL = 8e-6
VAES, CASES = ("sd", "sd3"), ("square", "wide")
SD_AUTOENCODER_PARAMS, SD3_AUTOENCODER_PARAMS = 83_653_863, 83_819_683  # checkpoints.md §10
SD_PRESET, SD3_PRESET, FLUX_PRESET = ("stabilityai/sd-vae-ft-ema", "stabilityai/stable-diffusion-3-medium-diffusers",
                                      "black-forest-labs/FLUX.1-dev")

LIVE = pytest.mark.skipif(not installed("diffusers"), reason="diffusers is not installed: the live VAE reference "
                          "cases are skipped (the stored-fixture cases still run)")
SOURCES = [pytest.param("fixture"), pytest.param("live", marks=LIVE)]


G = reference_generator("generate_vae")


@cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference.safetensors")


@cache
def fullsize() -> dict:
    return json.loads((FIXTURES / "fullsize.json").read_text())


@cache
def minidit_vae(name: str) -> AutoencoderKLDecoder:
    return load_vae(FIXTURES / name / "vae")


def folder(name: str) -> Path:
    return FIXTURES / name / "vae"


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    error = scaled_error(actual, expected)
    assert error <= tol, f"max error {error:.3g} (relative to max(1, |reference|)) exceeds {tol:g}"


def expected_images(source: str, name: str, case: str) -> torch.Tensor:
    if source == "fixture":
        return stored()[f"{name}/{case}/images"]
    return G.reference_decode(G.load_reference(folder(name)), stored()[f"{name}/{case}/latents"])


def write_vae(path: Path, name: str, sd: dict[str, torch.Tensor], fmt: str = "safetensors", **config) -> Path:
    """A Hub-layout folder holding the fixture `name`'s config (updated by `config`) and the state dict `sd`."""
    hub_config = {**weights.read_json(folder(name) / "config.json"), **config}
    return G.write_folder(path, hub_config, sd, torch.float32, fmt)


# ---- config ------------------------------------------------------------------------------------------

def test_config_defaults_for_absent_keys():
    """The SD VAE's config.json has no scaling_factor, shift_factor or quant-conv keys: diffusers' defaults apply."""
    cfg = minidit_vae("sd").config
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.use_post_quant_conv) == (0.18215, None, True)
    assert cfg.block_out_channels == (16, 32) and cfg.layers_per_block == 1 and cfg.norm_num_groups == 8
    assert VAEConfig.from_hub({}) == VAEConfig()  # diffusers' AutoencoderKL defaults
    assert VAEConfig() == VAEConfig(block_out_channels=(64,), up_block_types=("UpDecoderBlock2D",), layers_per_block=1,
                                    latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)


def test_config_sd3_values():
    cfg = minidit_vae("sd3").config
    assert (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor, cfg.use_post_quant_conv) == (16, 1.5305, 0.0609,
                                                                                                     False)
    assert minidit_vae("sd3").post_quant_conv is None and minidit_vae("sd").post_quant_conv is not None


@pytest.mark.parametrize("preset, name", [(SD_PRESET, "sd"), (SD3_PRESET, "sd3")])
def test_presets_match_the_hub_values(preset, name):
    """checkpoints.md §2.4 / §3.4 values, as a Hub config.json carries them, give the preset."""
    hub = {**G.FULLSIZE[name], "act_fn": "silu", "norm_num_groups": 32, "force_upcast": True, "sample_size": 1024,
           **({"scaling_factor": 1.5305, "shift_factor": 0.0609, "latents_mean": None, "latents_std": None}
              if name == "sd3" else {})}
    assert VAEConfig.from_hub(hub) == PRESETS[preset]
    assert replace(PRESETS[SD3_PRESET], scaling_factor=0.3611, shift_factor=0.1159) == PRESETS[FLUX_PRESET]


@pytest.mark.parametrize("key, value, message", [
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("up_block_types", ["AttnUpDecoderBlock2D"], "UpDecoderBlock2D"),
    ("latents_mean", [0.0] * 4, "latents_mean"),
])
def test_config_rejects_what_the_decoder_does_not_implement(key, value, message):
    with pytest.raises(MiniditError, match=message):
        VAEConfig.from_hub({key: value})


# ---- parity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", VAES)
@pytest.mark.parametrize("case", CASES)
def test_decode_parity(source, name, case):
    """decode(latents) == diffusers' `vae.decode(latents / scaling_factor [+ shift_factor]).sample`; "wide" is a
    non-square (3 x 5) latent."""
    latents = stored()[f"{name}/{case}/latents"]
    images = minidit_vae(name).decode(latents)
    factor = 2 ** (len(minidit_vae(name).config.block_out_channels) - 1)
    assert images.shape == (latents.shape[0], 3, latents.shape[2] * factor, latents.shape[3] * factor)
    assert_parity(images, expected_images(source, name, case))


@pytest.mark.parametrize("name", VAES)
def test_explicit_and_fused_attention_agree(name):
    latents = stored()[f"{name}/wide/latents"]
    fused = minidit_vae(name).decode(latents)
    with explicit_attention():
        explicit = minidit_vae(name).decode(latents)
    assert_parity(explicit, fused)
    assert_parity(explicit, stored()[f"{name}/wide/images"])


def test_vae_attention_is_never_recorded():
    captured = []

    class Recorder:
        def capture(self, layer, tensor, x, token_dim, streams):
            captured.append((layer, tensor))

    with recording(Recorder()):
        minidit_vae("sd").decode(stored()["sd/square/latents"])
    assert captured == []


@pytest.mark.parametrize("name", VAES)
def test_to_uint8_matches_diffusers_postprocessing(name):
    for case in CASES:
        images = stored()[f"{name}/{case}/images"]
        assert images.abs().max() > 1  # the clamp is exercised
        out = to_uint8(images)
        assert out.dtype == np.uint8 and out.shape == tuple(stored()[f"{name}/{case}/uint8"].shape)
        np.testing.assert_array_equal(out, stored()[f"{name}/{case}/uint8"].numpy())


def test_fp16_file_loads_in_any_dtype():
    """SD3's VAE ships in fp16: loading casts it; fp32 holds the stored values exactly, bf16 decodes close."""
    sd = weights.load_folder(folder("sd3"))
    assert {v.dtype for v in sd.values()} == {torch.float16}
    model = minidit_vae("sd3")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.decoder.conv_in.weight, sd["decoder.conv_in.weight"].float())
    bf16 = load_vae(folder("sd3"), dtype=torch.bfloat16)
    latents = stored()["sd3/square/latents"]
    assert_parity(bf16.decode(latents).float(), stored()["sd3/square/images"], tol=0.1)


# ---- checkpoint layouts and key checks ---------------------------------------------------------------

def test_legacy_attention_names_in_a_bin(tmp_path):
    """DiT's `vae/` is a `.bin` pickle, and older SD VAE files name the attention query/key/value/proj_attn."""
    legacy = G.to_legacy(weights.load_folder(folder("sd")))
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy and "encoder.conv_in.weight" in legacy
    path = write_vae(tmp_path / "vae", "sd", legacy, fmt="bin")
    assert_parity(load_vae(path).decode(stored()["sd/wide/latents"]), stored()["sd/wide/images"])


def test_decoder_only_file_loads(tmp_path):
    """The encoder half is dropped by the named allow-list ENCODER_KEYS, so a file without it loads the same."""
    sd = weights.load_folder(folder("sd"))
    dropped = {k for k in sd if k.startswith(ENCODER_KEYS)}
    assert dropped and {k.split(".")[0] for k in dropped} == {"encoder", "quant_conv"}
    assert set(decoder_state_dict(sd)) == set(sd) - dropped
    path = write_vae(tmp_path / "vae", "sd", {k: v for k, v in sd.items() if k not in dropped})
    assert_parity(load_vae(path).decode(stored()["sd/square/latents"]), stored()["sd/square/images"])


@pytest.mark.parametrize("edit, message", [
    ("missing", "1 missing (e.g. decoder.up_blocks.1.resnets.0.conv_shortcut.weight)"),
    ("unexpected", "1 unexpected (e.g. decoder.mid_block.attentions.0.to_r.weight)"),
    ("misshaped", "decoder.conv_out.weight: expected (3, 16, 3, 3), found (3, 16, 1, 1)"),
    ("post_quant_conv", "unexpected (e.g. post_quant_conv.bias"),
])
def test_key_errors_name_the_key(tmp_path, edit, message):
    sd = weights.load_folder(folder("sd"))
    config = {}
    if edit == "missing":
        del sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    elif edit == "unexpected":
        sd["decoder.mid_block.attentions.0.to_r.weight"] = sd["decoder.mid_block.attentions.0.to_q.weight"].clone()
    elif edit == "misshaped":
        sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"][:, :, :1, :1]
    else:  # a config without post_quant_conv for a file that has one
        config = {"use_post_quant_conv": False}
    path = write_vae(tmp_path / "vae", "sd", sd, **config)
    with pytest.raises(MiniditError, match="does not match AutoencoderKLDecoder") as info:
        load_vae(path)
    assert message in str(info.value)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(MiniditError, match="config.json is missing"):
        load_vae(tmp_path)


# ---- full size on the meta device --------------------------------------------------------------------

def meta_decoder(preset: str) -> AutoencoderKLDecoder:
    with torch.device("meta"):
        return AutoencoderKLDecoder(PRESETS[preset])


def diffusers_meta(name: str):
    diffusers = G._quiet_diffusers()
    with torch.device("meta"):
        return diffusers.AutoencoderKL(**G.FULLSIZE[name])


@pytest.mark.parametrize("preset, name", [(SD_PRESET, "sd"), (SD3_PRESET, "sd3"), (FLUX_PRESET, "sd3")])
def test_fullsize_keys_and_params_fixture(preset, name):
    model = meta_decoder(preset)
    table = fullsize()[name]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == table["decoder_keys"]
    assert sum(p.numel() for p in model.parameters()) == table["decoder_params"]
    assert table["autoencoder_params"] == {"sd": SD_AUTOENCODER_PARAMS, "sd3": SD3_AUTOENCODER_PARAMS}[name]


@LIVE
@pytest.mark.parametrize("preset, name, total", [(SD_PRESET, "sd", SD_AUTOENCODER_PARAMS),
                                                 (SD3_PRESET, "sd3", SD3_AUTOENCODER_PARAMS)])
def test_fullsize_params_live(preset, name, total):
    """minidit's decoder + post_quant_conv == diffusers' decoder + post_quant_conv; the whole autoencoder (encoder
    included) is 83,653,863 (SD VAE) / 83,819,683 (SD3, FLUX) parameters in diffusers."""
    reference = diffusers_meta(name)
    assert sum(p.numel() for p in reference.parameters()) == total
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k.startswith(G.DECODER_KEYS)}
    model = meta_decoder(preset)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == sum(map(np.prod, expected.values()))
    assert decoder_state_dict(reference.state_dict()).keys() == expected.keys()  # only the encoder half is dropped


# ---- minidit never needs diffusers ---------------------------------------------------------------------

def test_decodes_with_diffusers_blocked():
    code = ("import sys\n"
            "sys.modules['diffusers'] = None\n"
            "from safetensors.torch import load_file\n"
            "from minidit.vae.autoencoder_kl import load_vae\n"
            f"ref = load_file({str(FIXTURES / 'reference.safetensors')!r})\n"
            f"images = load_vae({str(folder('sd3'))!r}).decode(ref['sd3/wide/latents'])\n"
            "print((images - ref['sd3/wide/images']).abs().max().item())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) < TOL
