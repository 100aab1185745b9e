"""Class-conditional sampling for DiT models (DiT-XL/2, dit-tiny): labels -> DDIM loop with guidance -> latents.

Follows diffusers' DiTPipeline, which is how the Hub checkpoints are used: the batch is [cond; uncond]
with the null label `num_classes`, guidance on all latent channels, the learned-variance channels dropped
before the scheduler step. `convention="original"` follows facebookresearch/DiT's `forward_with_cfg`
instead: guidance on the first 3 channels only, the two halves evolving separately.
"""

import torch

from minidit.models.dit import DiT
from minidit.schedulers.ddim import DDIM

GUIDED_CHANNELS_ORIGINAL = 3  # NOTE(official): the original DiT guides 3 of the 4 latent channels


def initial_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """The reference pipelines' draw: torch.randn of `shape` from a CPU generator seeded with `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def branches(guidance: float) -> tuple[str, ...]:
    """How the backbone's batch is laid out, for the recorder."""
    return ("cond", "uncond") if guidance > 1 else ("cond",)


@torch.no_grad()
def sample(model: DiT, scheduler: DDIM, labels: torch.Tensor, noise: torch.Tensor, *, guidance: float,
           convention: str = "diffusers") -> torch.Tensor:
    """labels (B,), noise (B, C, H, W) -> final latents (B, C, H, W)."""
    cfg = model.config
    channels = cfg.in_channels
    if guidance <= 1:
        def model_fn(x, t):
            out = model(x, torch.full((x.shape[0],), t, device=x.device), labels)
            return out[:, :channels]
        return scheduler.sample(model_fn, noise)

    y = torch.cat([labels, torch.full_like(labels, cfg.num_embeds_ada_norm)])  # [cond; uncond]
    guided = channels if convention == "diffusers" else GUIDED_CHANNELS_ORIGINAL

    def model_fn(x, t):
        out = model(x, torch.full((x.shape[0],), t, device=x.device), y)  # (2B, C_out, H, W)
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = eps.chunk(2)
        eps = uncond + guidance * (cond - uncond)
        return torch.cat([torch.cat([eps, eps]), rest], dim=1)[:, :channels]

    x = scheduler.sample(model_fn, torch.cat([noise, noise]))
    return x.chunk(2)[0]
