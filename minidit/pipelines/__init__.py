"""The models `analyze.py` knows, by name: where their weights live and which recipe samples them."""

import importlib
from dataclasses import dataclass
from pathlib import Path

from minidit.errors import MiniditError
from minidit.pipelines.recipe import Recipe

EMBEDDED = Path(__file__).resolve().parents[2] / "weights"
# family -> the class implementing its `Recipe`, as "module:Class": imported (with its model) on first use
RECIPES = {"dit": "minidit.pipelines.dit:DiTRecipe", "pixart": "minidit.pipelines.pixart:PixArtRecipe",
           "sd3": "minidit.pipelines.sd3:SD3Recipe", "flux": "minidit.pipelines.flux:FluxRecipe",
           "latte": "minidit.pipelines.latte:LatteRecipe", "cogvideox": "minidit.pipelines.cogvideox:CogVideoXRecipe",
           "opensora": "minidit.pipelines.opensora:OpenSoraRecipe",
           "mochi": "minidit.pipelines.mochi:MochiRecipe"}


@dataclass(frozen=True)
class Part:
    """A Hub repository that a model needs besides its own, and the sub-folder of the model's folder it goes in."""

    folder: str
    repo: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # which recipe in minidit/pipelines samples it
    repo: str | None  # Hub repository id; None for the embedded model
    files: tuple[str, ...]  # the Hub files the recipe needs (snapshot allow-patterns)
    about: str
    prompts: tuple[str, ...] = ()  # a run's prompts when no --prompts file is given; () = the recipe's own
    # Models assembled from several repositories (Open-Sora: its transformer, and T5 from DeepFloyd): `repo` is the
    # model's own and goes in the sub-folder `folder`; each part goes in its own sub-folder
    folder: str | None = None
    parts: tuple[Part, ...] = ()

    @property
    def embedded(self) -> Path | None:
        return EMBEDDED / self.name if self.repo is None else None


_DIT_FILES = ("model_index.json", "transformer/config.json", "transformer/*.safetensors*", "transformer/*.bin",
              "scheduler/scheduler_config.json", "vae/config.json", "vae/*.safetensors", "vae/*.bin")


def _weights(folder: str, stem: str) -> tuple[str, ...]:
    """A component's config and full-precision safetensors, single or sharded (not the fp16/bf16 variants)."""
    return (f"{folder}/config.json", f"{folder}/{stem}.safetensors", f"{folder}/{stem}-*-of-*.safetensors",
            f"{folder}/{stem}.safetensors.index.json")


_PIXART_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
                 *_weights("transformer", "diffusion_pytorch_model"), *_weights("text_encoder", "model"),
                 *_weights("vae", "diffusion_pytorch_model"))

_SD3_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*", "tokenizer_3/*",
              *_weights("transformer", "diffusion_pytorch_model"), *_weights("text_encoder", "model"),
              *_weights("text_encoder_2", "model"), *_weights("text_encoder_3", "model"),
              *_weights("vae", "diffusion_pytorch_model"))

_FLUX_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*",
               *_weights("transformer", "diffusion_pytorch_model"), *_weights("text_encoder", "model"),
               *_weights("text_encoder_2", "model"), *_weights("vae", "diffusion_pytorch_model"))

_LATTE_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
                 *_weights("transformer", "diffusion_pytorch_model"), *_weights("text_encoder", "model"),
                 *_weights("vae", "diffusion_pytorch_model"))

# CogVideoX's 3D VAE is not implemented yet: its config only (the latent scale), not its 862 MB of weights
_COGVIDEOX_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "vae/config.json",
                    *_weights("transformer", "diffusion_pytorch_model"), *_weights("text_encoder", "model"))

# Open-Sora: its transformer's repository, and T5 from DeepFloyd's (its main branch has the encoder as two .bin
# shards; safetensors are taken where a revision has them). Its VAE is not implemented yet, so not fetched.
_OPENSORA_FILES = ("config.json", "model.safetensors")
_DEEPFLOYD_T5 = Part("text_encoder", "DeepFloyd/t5-v1_1-xxl",
                     ("config.json", "spiece.model", "special_tokens_map.json", "tokenizer_config.json",
                      "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                      "pytorch_model.bin.index.json"))

# Mochi: the transformer's bf16 variant (20 GB; the fp32 files are 40 GB and give the same values in a bf16 run), T5,
# and only the VAE's config (no VAE yet); genmo's root files (dit.safetensors, the VAE halves) are not fetched
_MOCHI_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "vae/config.json",
                "transformer/config.json", "transformer/diffusion_pytorch_model.bf16-*-of-*.safetensors",
                "transformer/diffusion_pytorch_model.safetensors.index.bf16.json", *_weights("text_encoder", "model"))

# flux-tiny's default prompts: captions of its training data (minidit/tiny/shapes.py), every shape once
FLUX_TINY_PROMPTS = (
    "a red circle on a black background",
    "a yellow square on a dark blue background",
    "a green triangle on a dark red background",
    "a blue cross on a dark green background",
    "an orange ring on a dark blue background",
    "a purple horizontal bar on a black background",
    "a yellow vertical bar on a dark green background",
    "a red diamond on a dark red background",
)

MODELS = {spec.name: spec for spec in [
    ModelSpec("flux-tiny", "flux", None, (), "minidit's embedded text-to-image FLUX.1 trained on captioned shapes "
              "(CPU, seconds)", FLUX_TINY_PROMPTS),
    ModelSpec("dit-tiny", "dit", None, (), "minidit's embedded 8-class DiT trained on drawn shapes (CPU, seconds)"),
    ModelSpec("dit-xl-256", "dit", "facebook/DiT-XL-2-256", _DIT_FILES, "DiT-XL/2 at 256x256, ImageNet classes"),
    ModelSpec("dit-xl-512", "dit", "facebook/DiT-XL-2-512", _DIT_FILES, "DiT-XL/2 at 512x512, ImageNet classes"),
    ModelSpec("pixart-1024", "pixart", "PixArt-alpha/PixArt-XL-2-1024-MS", _PIXART_FILES,
              "PixArt-α at 1024x1024 (multi-aspect), T5-XXL text encoder"),
    ModelSpec("pixart-512", "pixart", "PixArt-alpha/PixArt-XL-2-512x512", _PIXART_FILES,
              "PixArt-α at 512x512, T5-XXL text encoder"),
    ModelSpec("sd3", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", _SD3_FILES,
              "SD3-medium at 1024x1024, CLIP-L + CLIP-bigG + T5-XXL, CFG 7.0 (gated: needs a Hub token)"),
    ModelSpec("flux-dev", "flux", "black-forest-labs/FLUX.1-dev", _FLUX_FILES,
              "FLUX.1 [dev] at 1024x1024, CLIP-L + T5-XXL, distilled guidance (gated: needs a Hub token)"),
    ModelSpec("flux-schnell", "flux", "black-forest-labs/FLUX.1-schnell", _FLUX_FILES,
              "FLUX.1 [schnell] at 1024x1024, 4 steps, no guidance"),
    ModelSpec("latte", "latte", "maxin-cn/Latte-1", _LATTE_FILES,
              "Latte-1 text-to-video, 16 frames at 512x512, T5-XXL, spatial and temporal attention"),
    ModelSpec("cogvideox-5b", "cogvideox", "THUDM/CogVideoX-5b", _COGVIDEOX_FILES,
              "CogVideoX-5b text-to-video, 49 frames at 480x720, T5-XXL, full 3D attention with 3D RoPE"),
    ModelSpec("cogvideox-2b", "cogvideox", "THUDM/CogVideoX-2b", _COGVIDEOX_FILES,
              "CogVideoX-2b text-to-video, 49 frames at 480x720, T5-XXL, full 3D attention"),
    ModelSpec("opensora", "opensora", "hpcai-tech/OpenSora-STDiT-v3", _OPENSORA_FILES,
              "Open-Sora 1.2 (STDiT3) text-to-video, 51 frames at 240x426, T5-XXL (gated: needs a Hub token), "
              "spatial and temporal attention", folder="transformer", parts=(_DEEPFLOYD_T5,)),
    ModelSpec("mochi", "mochi", "genmo/mochi-1-preview", _MOCHI_FILES,
              "Mochi 1 preview text-to-video, 19 frames at 480x848, T5-XXL, asymmetric joint attention (bf16 weights)"),
]}
ALIASES = {"dit": "dit-xl-256", "pixart": "pixart-1024", "flux": "flux-dev", "cogvideox": "cogvideox-5b"}


def model_spec(name: str) -> ModelSpec:
    spec = MODELS.get(ALIASES.get(name, name))
    if spec is None:
        raise MiniditError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS) + sorted(ALIASES))}")
    return spec


def recipe_class(family: str) -> type[Recipe]:
    module, name = RECIPES[family].split(":")
    return getattr(importlib.import_module(module), name)
