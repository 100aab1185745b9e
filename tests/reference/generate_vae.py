"""Reference fixtures for the VAE decoder tests, computed with diffusers' AutoencoderKL as the oracle.

Run by hand when the reference changes (needs the reference extra: diffusers):

    python tests/reference/generate_vae.py

It writes, under tests/fixtures/vae/ (< 1 MB in all; the run is deterministic):

    sd/vae/            a tiny SD-VAE-like AutoencoderKL (4 latent channels, quant convs, 2 blocks) in the Hub
                       layout of `stabilityai/sd-vae-ft-ema` / PixArt's `vae/`: the whole autoencoder (encoder
                       included) as fp32 safetensors, and a config.json with the content shape of the SD VAE's
                       (no scaling_factor, force_upcast or quant-conv keys: diffusers' defaults apply)
    sd3/vae/           a tiny SD3/FLUX-like one (16 latent channels, no quant convs, 3 blocks, scale 1.5305 and
                       shift 0.0609 as SD3's) stored in fp16 as SD3-medium ships it, config.json with all of SD3's keys
    reference.safetensors   per VAE ("sd", "sd3") and latent shape ("square", "wide"):
                       `{vae}/{case}/latents`  latents in the backbone's space
                       `{vae}/{case}/images`   `vae.decode(latents / scaling_factor + shift_factor).sample`, the
                                               pipelines' call (no shift for the SD VAE), fp32
                       `{vae}/{case}/uint8`    those images through diffusers' VaeImageProcessor.postprocess and
                                               numpy_to_pil's rounding, (B, H, W, 3) uint8
    fullsize.json      the full-size SD and SD3/FLUX VAEs built by diffusers on the meta device: parameter counts
                       (whole autoencoder; decoder + post_quant_conv) and the decoder's key names and shapes
    VERSIONS.json      the library versions that produced the expected outputs

The weights are random (seeded): diffusers' default init, with every GroupNorm's affine parameters moved away
from (1, 0) so that a swapped or skipped norm changes the output. The fp16 fixture's model is rounded to fp16
before the outputs are computed, so the stored file defines it exactly.

Functions here are also used by the tests' "live" cases; diffusers is imported inside the functions that need it.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vae"
REFERENCE = FIXTURES / "reference.safetensors"

SEED = 20240607
NORM_JITTER = 0.2  # std of the random offsets given to the GroupNorms' weight (around 1) and bias (around 0)

# The tiny configs, in the content shape of the Hub files. "dtype" is the stored dtype, not a config key.
TINY = {
    "sd": {"dtype": "float32", "config": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2, "in_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "norm_num_groups": 8, "out_channels": 3, "sample_size": 32, "up_block_types": ["UpDecoderBlock2D"] * 2}},
    "sd3": {"dtype": "float16", "config": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 3, "force_upcast": True, "in_channels": 3, "latent_channels": 16,
        "latents_mean": None, "latents_std": None, "layers_per_block": 1, "norm_num_groups": 4, "out_channels": 3,
        "sample_size": 32, "scaling_factor": 1.5305, "shift_factor": 0.0609, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "use_post_quant_conv": False, "use_quant_conv": False}},
}
CASES = {"square": (2, 4, 4), "wide": (1, 3, 5)}  # (B, H, W) of the latents; "wide" is non-square and odd

# checkpoints.md §2.4, §3.4, §4.4: the full-size configs (FLUX's VAE has SD3's shapes)
FULLSIZE = {
    "sd": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4},
    "sd3": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "use_quant_conv": False, "use_post_quant_conv": False},
}
DECODER_KEYS = ("decoder.", "post_quant_conv.")
# diffusers' deprecated attention names, as older Hub files (the SD VAE, DiT's `vae/` .bin) store them
MODERN_TO_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _quiet_diffusers():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    return diffusers


def class_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build(name: str):
    """The tiny diffusers AutoencoderKL `name` with its seeded random weights (rounded to its stored dtype)."""
    diffusers = _quiet_diffusers()
    spec = TINY[name]
    torch.manual_seed(SEED + list(TINY).index(name))
    vae = diffusers.AutoencoderKL(**class_config(spec["config"])).eval()
    stored = getattr(torch, spec["dtype"])
    with torch.no_grad():
        for key, p in vae.named_parameters():
            if p.ndim == 1 and ("norm" in key.split(".")[-2]):
                p.add_(NORM_JITTER * torch.randn_like(p))
            p.copy_(p.to(stored).float())
    return vae


def load_reference(folder: str | Path):
    """diffusers' AutoencoderKL from a Hub-layout `vae/` folder, in fp32."""
    pickled = (Path(folder) / "diffusion_pytorch_model.bin").is_file()
    return _quiet_diffusers().AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32,
                                                           use_safetensors=not pickled).eval()


@torch.no_grad()
def reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The pipelines' decode: PixArt's `vae.decode(z / s)`, SD3's and FLUX's `vae.decode(z / s + shift)`."""
    z = latents / vae.config.scaling_factor
    if vae.config.shift_factor is not None:
        z = z + vae.config.shift_factor
    return vae.decode(z).sample


def reference_uint8(images: torch.Tensor) -> torch.Tensor:
    """diffusers' postprocessing to uint8: VaeImageProcessor.postprocess(output_type="np"), numpy_to_pil's rounding."""
    from diffusers.image_processor import VaeImageProcessor

    unit = VaeImageProcessor(do_resize=False).postprocess(images, output_type="np")  # (B, H, W, 3) in [0, 1]
    return torch.from_numpy((unit * 255).round().astype("uint8"))


def latents(name: str, case: str) -> torch.Tensor:
    b, h, w = CASES[case]
    generator = torch.Generator().manual_seed(SEED + 100 + list(CASES).index(case))
    return torch.randn(b, TINY[name]["config"]["latent_channels"], h, w, generator=generator)


def to_legacy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the mid-block attention keys to diffusers' deprecated names (query, key, value, proj_attn)."""
    out = {}
    for key, tensor in sd.items():
        prefix, sep, rest = key.partition(".attentions.0.")
        if sep:
            name, param = rest.rsplit(".", 1)
            rest = f"{MODERN_TO_LEGACY.get(name, name)}.{param}"
        out[prefix + sep + rest] = tensor
    return out


def write_folder(folder: Path, config: dict, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                 fmt: str = "safetensors") -> Path:
    """A Hub-layout `vae/` folder: config.json and the whole state dict (safetensors, or a `.bin` pickle)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.to(dtype).contiguous() for k, v in sorted(sd.items())}
    if fmt == "safetensors":
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(tensors, folder / "diffusion_pytorch_model.bin")
    return folder


def fullsize_tables() -> dict:
    """Full-size parameter counts and decoder key shapes from diffusers' AutoencoderKL on meta."""
    diffusers = _quiet_diffusers()
    tables = {}
    for name, config in FULLSIZE.items():
        with torch.device("meta"):
            vae = diffusers.AutoencoderKL(**config)
        decoder = {k: list(p.shape) for k, p in vae.state_dict().items() if k.startswith(DECODER_KEYS)}
        decoder_params = sum(p.numel() for k, p in vae.named_parameters() if k.startswith(DECODER_KEYS))
        tables[name] = {"autoencoder_params": sum(p.numel() for p in vae.parameters()),
                        "decoder_params": decoder_params, "decoder_keys": dict(sorted(decoder.items()))}
    return tables


def fullsize_json(tables: dict) -> str:
    """JSON with one decoder key per line."""
    lines = ["{"]
    for i, (name, table) in enumerate(tables.items()):
        keys = [f'    {json.dumps(k)}: {json.dumps(v)}' for k, v in table["decoder_keys"].items()]
        lines += [f'  {json.dumps(name)}: {{',
                  f'   "autoencoder_params": {table["autoencoder_params"]},',
                  f'   "decoder_params": {table["decoder_params"]},',
                  '   "decoder_keys": {', ",\n".join(keys), "   }",
                  "  }" + ("," if i < len(tables) - 1 else "")]
    return "\n".join(lines + ["}"]) + "\n"


def versions() -> dict:
    import diffusers
    import safetensors

    return {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "python": sys.version.split()[0]}


def max_scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()


def main() -> None:
    import shutil
    import tempfile

    from safetensors.torch import save_file

    diffusers = _quiet_diffusers()
    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)

    ref = {}
    for name, spec in TINY.items():
        vae = build(name)
        config = {**spec["config"], "_diffusers_version": diffusers.__version__}
        folder = write_folder(FIXTURES / name / "vae", config, vae.state_dict(), getattr(torch, spec["dtype"]))
        reloaded = load_reference(folder)
        with tempfile.TemporaryDirectory() as tmp:  # the legacy names, as a `.bin` like DiT's `vae/` folder
            legacy = load_reference(write_folder(Path(tmp), config, to_legacy(vae.state_dict()), torch.float32, "bin"))
        for case in CASES:
            z = latents(name, case)
            images = reference_decode(reloaded, z)
            # the reloaded model must be the one built here, also through the legacy names
            assert torch.equal(images, reference_decode(vae, z))
            assert torch.equal(images, reference_decode(legacy, z))
            ref[f"{name}/{case}/latents"], ref[f"{name}/{case}/images"] = z, images
            ref[f"{name}/{case}/uint8"] = reference_uint8(images)
            print(f"{name}/{case}: latents {tuple(z.shape)} -> images {tuple(images.shape)}, "
                  f"|images| max {images.abs().max():.3f}, std {images.std():.3f}")

    metadata = {"seed": SEED, "cases": CASES, "tiny": {k: v["dtype"] for k, v in TINY.items()}}
    save_file({k: v.contiguous() for k, v in sorted(ref.items())}, REFERENCE,
              metadata={"reference": json.dumps(metadata, sort_keys=True)})
    (FIXTURES / "fullsize.json").write_text(fullsize_json(fullsize_tables()))
    (FIXTURES / "VERSIONS.json").write_text(json.dumps(versions(), indent=2) + "\n")
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
