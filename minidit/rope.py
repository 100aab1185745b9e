"""Rotary position embeddings (RoPE, Su et al., https://arxiv.org/abs/2104.09864) over several position axes.

A token with position ids (p_0, p_1, ...) rotates consecutive channel pairs (2k, 2k+1) of q and k by the
angle p_a * theta^(-2k / d_a), where the head's channels are split into one block of d_a channels per axis
a (FLUX: d = (16, 56, 56) for the axes (text/frame, row, column)).
"""

import torch


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (L, n_axes) positions -> (cos, sin), each (L, sum(axes_dim)) float32, every angle repeated for its pair.

    Angles are computed in float64, as the reference does, then rounded once.
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)  # (d_a/2,)
        angles.append(torch.outer(ids[:, axis].double(), omega).repeat_interleave(2, dim=1))  # (L, d_a)
    angle = torch.cat(angles, dim=1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, Nh, L, Dh), cos and sin (L, Dh): (x_2k, x_2k+1) -> (x_2k cos - x_2k+1 sin, x_2k+1 cos + x_2k sin),
    computed in float32 and returned in x's dtype."""
    pairs = x.unflatten(-1, (-1, 2))  # (B, Nh, L, Dh/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (-x_2k+1, x_2k)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
