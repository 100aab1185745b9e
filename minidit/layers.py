"""Small shared pieces: timestep sinusoids, adaLN modulation, 2D sin-cos position tables, the head split, patchify,
and the transformer FFN that DiT, PixArt, SD3 and FLUX all use with the same checkpoint keys."""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def timestep_embedding(
    t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32.

    Frequencies are exp(-ln(max_period) * k / (dim/2 - freq_shift)), k = 0 .. dim/2 - 1; the output is
    [cos | sin] when `flip_sin_to_cos`, else [sin | cos].
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, dim/2)
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) shift/scale broadcast over the tokens of (B, L, D) x."""
    return x * (1 + scale[:, None]) + shift[:, None]


@functools.lru_cache(maxsize=16)
def sincos_2d(dim: int, h: int, w: int, base_size: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """Fixed 2D sin-cos position table (H*W, dim) in float32, tokens in row-major (h, w) order.

    The grid coordinate along each axis is arange(n) / (n / base_size) / interpolation_scale. The first
    half of the channels encodes the column (w) coordinate, the second half the row (h) coordinate, each
    as [sin | cos] with frequencies 1 / 10000^(k / (dim/4)). Computed in float64, as the reference does.
    """
    rows = torch.arange(h, dtype=torch.float32) / (h / base_size) / interpolation_scale
    cols = torch.arange(w, dtype=torch.float32) / (w / base_size) / interpolation_scale
    grid_h, grid_w = torch.meshgrid(rows, cols, indexing="ij")  # (H, W) each
    return torch.cat([_sincos_1d(dim // 2, grid_w.flatten()), _sincos_1d(dim // 2, grid_h.flatten())], dim=1).float()


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.outer(pos.double(), omega)  # (L, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, Nh*Dh) projections -> (B, Nh, L, Dh) heads, as attention() takes q, k and v."""
    return rearrange(x, "B L (Nh Dh) -> B Nh L Dh", Nh=num_heads)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, H*W, p*p*C) tokens -> (B, C, H*p, W*p) image, patch pixels ordered (p, q, C) as DiT writes them."""
    return rearrange(x, "B (H W) (p q C) -> B C (H p) (W q)", H=h, W=w, p=p, q=p)


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear (D -> 4D), GELU (tanh approximation), Linear (4D -> D): the FFN of diffusers' transformer blocks."""

    def __init__(self, dim: int):
        super().__init__()
        # checkpoint keys: net.0.proj, net.2 (index 1 was a dropout layer in training code)
        self.net = nn.ModuleList([GELUProjection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class MLPEmbedding(nn.Module):
    """Linear -> SiLU -> Linear: diffusers' TimestepEmbedding (keys linear_1, linear_2), which the models also use
    for the pooled-text, guidance and micro-condition embeddings."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
