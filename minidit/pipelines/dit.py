"""Class-conditional sampling for DiT models (DiT-XL/2, dit-tiny): labels -> DDIM loop with guidance -> latents.

Follows diffusers' DiTPipeline, which is how the Hub checkpoints are used: the batch is [cond; uncond]
with the null label `num_classes`, guidance on all latent channels, the learned-variance channels dropped
before the scheduler step. `convention="original"` follows facebookresearch/DiT's `forward_with_cfg`
instead: guidance on the first 3 latent channels only, the 4th taken from the conditional half.
"""

from pathlib import Path

import numpy as np
import torch

from minidit import weights
from minidit.attention import AttentionLayer
from minidit.errors import MiniditError
from minidit.models.dit import DiT, load_dit
from minidit.pipelines import recipe
from minidit.schedulers.ddim import DDIM, DDIMConfig
from minidit.vae.autoencoder_kl import load_vae, to_uint8

GUIDED_CHANNELS_ORIGINAL = 3  # NOTE(official): the original DiT guides 3 of the 4 latent channels


@torch.no_grad()
def sample(model: DiT, scheduler: DDIM, labels: torch.Tensor, noise: torch.Tensor, *, guidance: float,
           convention: str = "diffusers") -> torch.Tensor:
    """labels (B,), noise (B, C, H, W) -> final latents (B, C, H, W).

    With guidance the backbone sees [x; x] with labels [y; null] (both references feed the conditional
    latents to both halves), and the guided epsilon moves x.
    """
    channels = model.config.in_channels
    if guidance <= 1:
        return scheduler.sample(lambda x, t: model(x, _timesteps(t, x), labels)[:, :channels], noise)

    y = torch.cat([labels, torch.full_like(labels, model.config.num_embeds_ada_norm)])  # [cond; uncond]
    g = channels if convention == "diffusers" else GUIDED_CHANNELS_ORIGINAL

    def epsilon(x, t):
        x2 = torch.cat([x, x])
        cond, uncond = model(x2, _timesteps(t, x2), y)[:, :channels].chunk(2)  # learned-sigma channels dropped
        return torch.cat([recipe.guided(uncond[:, :g], cond[:, :g], guidance), cond[:, g:]], dim=1)

    return scheduler.sample(epsilon, noise)


def _timesteps(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device)


class DiTRecipe:
    """DiT-XL/2 and dit-tiny for the analysis: a Hub-layout folder -> backbone, scheduler, labels, decoding."""

    name = "DiT"
    options = ("convention",)
    schedulers = ("ddim",)
    default_scheduler = "ddim"
    default_steps = 50  # DiTPipeline's num_inference_steps
    default_guidance = 4.0  # DiTPipeline's guidance_scale
    decodes = True
    # facebookresearch/DiT sample.py's class labels, used when no --prompts file is given
    default_labels = (207, 360, 387, 974, 88, 979, 417, 279)

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, convention: str = "diffusers"):
        self.folder, self.dtype, self.device, self.convention = folder, dtype, device, convention
        self.model = load_dit(folder / "transformer", dtype=dtype, device=device, convention=convention)
        self.num_classes, self.resolution = self.model.config.num_embeds_ada_norm, (self.model.config.sample_size,) * 2
        self.scheduler_config = DDIMConfig.from_hub(weights.read_json(folder / "scheduler" / "scheduler_config.json"))
        index = weights.read_json(folder / "model_index.json")
        self.id2label = {int(k): v for k, v in index.get("id2label", {}).items()}
        self.pixel_space = "vae" not in index  # dit-tiny draws RGB directly; DiT-XL/2 decodes with the SD VAE
        self.vae = None if self.pixel_space else load_vae(folder / "vae", dtype=dtype, device=device)

    def default_prompts(self) -> list[str]:
        if self.num_classes <= len(self.default_labels) or self.pixel_space:
            return [self.id2label.get(i, str(i)) for i in range(self.num_classes)]
        return [str(i) for i in self.default_labels]

    def parse_prompt(self, prompt: str) -> int:
        """A class id ("207") or a class name as in model_index.json's id2label (any of its comma-separated names)."""
        text = prompt.strip()
        if text.isdigit() and int(text) < self.num_classes:
            return int(text)
        for label, names in self.id2label.items():
            if text.lower() in (n.strip().lower() for n in names.split(",")):
                return label
        raise MiniditError(f"{prompt!r} is not a class of this model: use an id 0..{self.num_classes - 1}"
                           + (f" or a name such as {self.id2label[0]!r}" if self.id2label else ""))

    def make_scheduler(self, name: str, steps: int) -> DDIM:
        return DDIM(self.scheduler_config, steps)

    def branches(self, guidance: float) -> tuple[str, ...]:
        return ("cond", "uncond") if guidance > 1 else ("cond",)

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers()

    def prepare(self, prompts: list[str]) -> None:
        """Nothing to precompute: class labels need no encoder."""

    batch_key = recipe.same_batch

    def manifest_fields(self) -> dict:
        return {"convention": self.convention, "resolution": list(self.resolution), "frames": None}

    def generate(self, prompts: list[str], seed: int, scheduler: DDIM, guidance: float) -> torch.Tensor:
        cfg = self.model.config
        noise = recipe.prompt_noise(len(prompts), (cfg.in_channels, *self.resolution), seed, self.dtype, self.device)
        labels = torch.tensor([self.parse_prompt(p) for p in prompts], device=self.device)
        return sample(self.model, scheduler, labels, noise, guidance=guidance, convention=self.convention)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 (B, H, W, 3) images: the latents through the SD VAE, or already pixels for dit-tiny."""
        return to_uint8(latents if self.vae is None else self.vae.decode(latents))
