"""Open-Sora 1.2: STDiT3, a text-to-video diffusion transformer with spatial and temporal blocks (HPC-AI Tech, 2024).

Report: https://github.com/hpcaitech/Open-Sora/blob/v1.2.0/docs/report_03.md. Official code: hpcaitech/Open-Sora at
the tag v1.2.0, `opensora/models/stdit/stdit3.py` and `opensora/models/layers/blocks.py` (the repository's newest code
is a different architecture). Checkpoint: `hpcai-tech/OpenSora-STDiT-v3` on the Hub, `config.json` (transformers'
form, "STDiT3") and one fp32 `model.safetensors`: 973 tensors in the official module paths, which are this module's
attribute names (1,207,643,972 parameters, `rope.freqs` included, plus the stored null caption, 1,228,800 values).

The video is T latent frames of H x W cells; a 1x2x2 Conv3d makes S = (H/2)(W/2) tokens per frame, frame-major
(B, T S, D). 28 pairs of blocks alternate between two views of the same tokens, written in the loop of
`STDiT3.forward`:
- a spatial block's self-attention sees each frame on its own, rows (B T), S tokens;
- a temporal block's self-attention sees each token position across the frames, rows (B S), T tokens, with RoPE
  (rotary_embedding_torch's interleaved channel pairs, theta 10000) on q and k.
Both kinds have the same parts: adaLN-single modulation ("t2i_modulate"), self-attention with a per-head RMS QK-norm,
an unmodulated cross-attention of every video token of a sample to that sample's T5 tokens, and an FFN:
    x = x + gate_msa * attn(LN(x) (1 + scale_msa) + shift_msa)
    x = x + cross_attn(x, text)
    x = x + gate_mlp * mlp(LN(x) (1 + scale_mlp) + shift_mlp)
The six modulation vectors come from one MLP of the conditioning c = MLP(sinusoid(t)) + MLP(sinusoid(fps)) (t_block),
each block adding its own `scale_shift_table`. A fixed 2D sin-cos table is added to every frame once, before the
blocks; its grid is stretched to round(sqrt(S)) cells per side and divided by sqrt(height width) / 512 (the pixel
size of the video). The output has 8 channels: the flow velocity, then 4 unused ones (pred_sigma).

Capture points (layers `spatial_blocks.{i}.attn`, `temporal_blocks.{i}.attn`, and with cross=True
`{spatial,temporal}_blocks.{i}.cross_attn`): K and V enter the attention product as (rows, Nh, L, Dh): after the qkv
projection, head split and RMS QK-norm, and in temporal blocks after RoPE; A is the output of `proj`, before the gate
and the residual, in the fold the attention ran in ((B T, S, D) or (B S, T, D)). In a cross-attention, K and V are
the projected text of each sample, (B, Nh, Lt, Dh), padded tokens included (they are masked out of the attention,
not out of the record), and A is on the video tokens, (B, T S, D).

Quirks of the official code, kept and marked NOTE(official) where they happen:
- the official cross-attention packs the valid text tokens of the whole batch into one sequence and attends with
  xformers' block-diagonal mask (one block per sample). Here the text stays padded, (B, Lt), and padded tokens are
  masked out per sample: the same attention (tests/test_opensora.py compares the two on captions of different
  lengths);
- the position table's scale comes from the first sample's height and width only;
- the first half of the position table's channels encodes the column, the second the row;
- the timestep is cast to the model's dtype before its sinusoid (in bf16 the model sees bf16-rounded timesteps);
- RoPE's frequencies are the checkpoint's `rope.freqs` in the model's dtype, and so are the angles (a bf16 model
  rotates by bf16 angles, as the official one does; the rotation itself is computed in float32 here);
- the final layer modulates with the conditioning c itself, not SiLU(c);
- the output is returned in float32 whatever the model's dtype.
Not implemented: the `x_mask` path (per-frame timestep 0 for conditioning frames, used by image-to-video and video
extension); for text-to-video, scripts/inference.py passes a mask of ones, which selects the ordinary path, so the
result is the same. Also not: sequence parallelism, flash attention, fused LayerNorm kernels, drop path.

Shapes: x (B, C, T, H, W) latents; text (B, Lt, 4096) T5 states, text_mask (B, Lt) 1 = token, 0 = padding;
D = Nh * Dh = 1152.
"""

import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minidit import weights
from minidit.attention import AttentionLayer, attention, attention_output, feed_forward_output, in_block
from minidit.errors import MiniditError
from minidit.layers import modulate, split_heads, timestep_embedding
from minidit.rope import apply_rope

FREQ_DIM = 256  # width of the sinusoids of the timestep and the fps
NORM_EPS = 1e-6  # the blocks' and the final layer's LayerNorms (no affine)
QK_NORM_EPS = 1e-6  # the per-head RMSNorm of q and k (LlamaRMSNorm's default)
ROPE_THETA = 10000.0  # rotary_embedding_torch's default
POS_THETA = 10000.0  # of the 2D sin-cos position table

# Where each self-attention looks: the einops pattern from the block's (B, T S, D) tokens to the rows it attends in.
SPATIAL = "B (T S) D -> (B T) S D"  # each frame on its own
TEMPORAL = "B (T S) D -> (B S) T D"  # each token position across the frames


@dataclass(frozen=True)
class STDiT3Config:
    # Defaults are those of the official STDiT3Config (v1.2.0), applied to keys a config.json lacks.
    depth: int = 28  # pairs of blocks: 28 spatial and 28 temporal
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)  # frames, rows, columns
    in_channels: int = 4
    pred_sigma: bool = True  # 8 output channels: the velocity, then 4 unused ones
    caption_channels: int = 4096  # T5 v1.1 XXL width
    model_max_length: int = 300  # rows of the null caption: the T5 length the sampler pads to
    input_sq_size: int = 512  # the pixel side at which the position table is not scaled

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.pred_sigma else self.in_channels

    @classmethod
    def from_hub(cls, config: dict) -> "STDiT3Config":
        """Build from the Hub's `config.json`; the switches that change the math must have their inference values."""
        required = {"qk_norm": True, "skip_y_embedder": False}
        for key, value in required.items():
            if config.get(key, value) != value:
                raise MiniditError(f"STDiT3 config has {key}={config[key]!r}; minidit supports only {value!r}")
        values = {k: v for k, v in config.items() if k in {f.name for f in fields(cls)}}
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        cfg = cls(**values)
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 2 or cfg.hidden_size % 4:
            raise MiniditError(f"STDiT3 config: hidden_size {cfg.hidden_size} must split into {cfg.num_heads} heads "
                               f"of an even width, and be a multiple of 4 (the 2D sin-cos table)")
        return cfg


PRESETS = {"OpenSora-STDiT-v3": STDiT3Config()}


@functools.lru_cache(maxsize=16)
def position_table(dim: int, h: int, w: int, scale: float, base_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos table (h w, dim) in float32, tokens in row-major (row, column) order.

    The coordinate of row i is i / scale * (base_size / h), of column j is j / scale * (base_size / w). Each half of
    the channels is [sin | cos] of a coordinate times 1 / 10000^(k / (dim/4)), k = 0 .. dim/8 - 1.
    NOTE(official): the first half encodes the column, the second half the row.
    """
    inv_freq = 1.0 / POS_THETA ** (torch.arange(0, dim // 2, 2).float() / (dim // 2))  # (dim/4,)
    rows = torch.arange(h) / scale * (base_size / h)
    cols = torch.arange(w) / scale * (base_size / w)
    grid_row, grid_col = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each

    def sincos(coordinate: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(coordinate.flatten(), inv_freq)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([sincos(grid_col), sincos(grid_row)], dim=1)


# ---- embedders --------------------------------------------------------------------------------------------------

class SinusoidEmbedder(nn.Module):
    """A scalar per sample (the timestep, or the fps) -> MLP(sinusoid), (B, D). Keys mlp.0, mlp.2."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(value.flatten(), FREQ_DIM).to(dtype))  # [cos | sin]


class MLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2: the blocks' FFN and the caption projection (timm's Mlp keys)."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """T5 states (B, Lt, C_text) -> (B, Lt, D), and the learned null caption `y_embedding` (Lt, C_text): the text of
    the unconditional branch, a buffer stored in the checkpoint."""

    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        self.y_proj = MLP(cfg.caption_channels, cfg.hidden_size, cfg.hidden_size)
        self.register_buffer("y_embedding", torch.zeros(cfg.model_max_length, cfg.caption_channels))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.y_proj(text)


class PatchEmbed3D(nn.Module):
    """Latents (B, C, T, H, W) -> tokens (B, T' H' W', D), frame-major; T, H, W padded with zeros (after the end) to
    multiples of the patch size."""

    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        T, H, W = x.shape[-3:]
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        return rearrange(self.proj(x), "B D T H W -> B (T H W) D")


class RotaryFrequencies(nn.Module):
    """RoPE over the frames (temporal attention): channel pair (2k, 2k+1) of q and k turns by the angle f * freqs[k]
    for frame f, freqs[k] = 1 / 10000^(2k / Dh). `freqs` is stored in the checkpoint (`rope.freqs`)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.freqs = nn.Parameter(rope_frequencies(head_dim), requires_grad=False)

    def forward(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, (T, Dh) each, in the dtype of `freqs` (NOTE(official): so are the angles)."""
        positions = torch.arange(frames, device=self.freqs.device, dtype=self.freqs.dtype)
        angles = torch.outer(positions, self.freqs).repeat_interleave(2, dim=1)  # each angle for its pair
        return angles.cos(), angles.sin()


def rope_frequencies(head_dim: int) -> torch.Tensor:
    """rotary_embedding_torch's frequencies, float32 (Dh/2,): what `rope.freqs` holds."""
    return 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim)


# ---- blocks -----------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32, then times a learned weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + QK_NORM_EPS)).to(x.dtype)


class SelfAttention(nn.Module):
    """Attention among the tokens of each row (a frame, or a token position across the frames)."""

    def __init__(self, cfg: STDiT3Config, layer: str):
        super().__init__()
        dim = cfg.hidden_size
        self.layer, self.num_heads = layer, cfg.num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(cfg.head_dim), RMSNorm(cfg.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "N L (three Nh Dh) -> three N Nh L Dh", three=3, Nh=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # temporal blocks
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, layer=self.layer)  # (N, L, D)
        return attention_output(self.proj(out), layer=self.layer)


class CrossAttention(nn.Module):
    """Every video token of a sample attends to that sample's valid text tokens; no QK-norm."""

    def __init__(self, cfg: STDiT3Config, layer: str):
        super().__init__()
        dim = cfg.hidden_size
        self.layer, self.num_heads = layer, cfg.num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)  # k, then v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = split_heads(self.q_linear(x), self.num_heads)  # (B, Nh, T S, Dh)
        k, v = rearrange(self.kv_linear(text), "B Lt (two Nh Dh) -> two B Nh Lt Dh", two=2, Nh=self.num_heads)
        # NOTE(official): padded (B, Lt) text with a per-sample mask, where the official code packs the valid tokens
        # of the batch and uses a block-diagonal mask: the same attention
        out = attention(q, k, v, mask=mask, layer=self.layer, streams="txt")  # (B, T S, D)
        return attention_output(self.proj(out), layer=self.layer)


class STDiT3Block(nn.Module):
    """One spatial or temporal block; which one it is depends only on the fold and the RoPE the loop hands it."""

    def __init__(self, cfg: STDiT3Config, name: str):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.attn = SelfAttention(cfg, f"{name}.attn")
        self.cross_attn = CrossAttention(cfg, f"{name}.cross_attn")
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), dim)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))

    def forward(self, x: torch.Tensor, t6: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None, fold: str,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, **sizes: int) -> torch.Tensor:
        """x (B, T S, D), t6 (B, 6 D), text (B, Lt, D); `fold` is the einops pattern to the self-attention's rows,
        `sizes` its T and S."""
        unfold = " -> ".join(reversed(fold.split(" -> ")))
        mod = self.scale_shift_table[None] + rearrange(t6, "B (six D) -> B six D", six=6)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(dim=1)  # (B, D) each
        h = rearrange(modulate(self.norm1(x), shift_msa, scale_msa), fold, **sizes)
        h = rearrange(self.attn(h, rope), unfold, **sizes)  # (B, T S, D)
        x = x + gate_msa[:, None] * h
        x = x + self.cross_attn(x, text, mask)
        f = feed_forward_output(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), layer=self.attn.layer)
        x = x + gate_mlp[:, None] * f
        return x


class FinalLayer(nn.Module):
    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden_size, eps=NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(cfg.hidden_size, math.prod(cfg.patch_size) * cfg.out_channels)
        self.scale_shift_table = nn.Parameter(torch.empty(2, cfg.hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # NOTE(official): modulated by the conditioning c itself, where the blocks get t_block(c) = Linear(SiLU(c))
        shift, scale = (self.scale_shift_table[None] + c[:, None]).unbind(dim=1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---- the model --------------------------------------------------------------------------------------------------

class STDiT3(nn.Module):
    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.rope = RotaryFrequencies(cfg.head_dim)
        self.x_embedder = PatchEmbed3D(cfg)
        self.t_embedder = SinusoidEmbedder(dim)
        self.fps_embedder = SinusoidEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = CaptionEmbedder(cfg)
        self.spatial_blocks = nn.ModuleList([STDiT3Block(cfg, f"spatial_blocks.{i}") for i in range(cfg.depth)])
        self.temporal_blocks = nn.ModuleList([STDiT3Block(cfg, f"temporal_blocks.{i}") for i in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                fps: torch.Tensor, height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) latents; timestep (B,) in [0, 1000] (1000 = pure noise); text (B, Lt, C_text) T5 states
        or the null caption (`null_text`); text_mask (B, Lt) 1 = token, 0 = padding (None: every token); fps (B,) the
        video's frame rate; height, width (B,) its size in pixels (NOTE(official): only the first sample's is read).
        Returns (B, 2 C, T, H, W) in float32: the velocity (data - noise) in the first C channels."""
        cfg, dtype = self.config, self.x_embedder.proj.weight.dtype
        (Tx, Hx, Wx), (pt, ph, pw) = x.shape[-3:], cfg.patch_size
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)  # the patch grid, padded up
        S = H * W
        scale = (float(height[0]) * float(width[0])) ** 0.5 / cfg.input_sq_size
        pos = position_table(cfg.hidden_size, H, W, scale, round(S**0.5)).to(x.device, dtype)  # (S, D)

        # NOTE(official): the timestep is cast to the model's dtype before its sinusoid
        c = self.t_embedder(timestep.to(dtype), dtype) + self.fps_embedder(fps, dtype)  # (B, D)
        t6 = self.t_block(c)  # (B, 6 D)
        text = self.y_embedder(text.to(dtype))  # (B, Lt, D)
        mask = None if text_mask is None else text_mask.bool()[:, None, None, :]  # (B, 1, 1, Lt)
        x = rearrange(self.x_embedder(x.to(dtype)), "B (T S) D -> B T S D", T=T) + pos
        x = rearrange(x, "B T S D -> B (T S) D")
        rope = self.rope(T)

        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, t6, text, mask, fold=SPATIAL, T=T, S=S)  # each frame on its own
            x = temporal(x, t6, text, mask, fold=TEMPORAL, rope=rope, T=T, S=S)  # each position across the frames

        x = self.final_layer(x, c)  # (B, T S, pt ph pw C_out)
        x = rearrange(x, "B (T H W) (p q r C) -> B C (T p) (H q) (W r)", T=T, H=H, p=pt, q=ph, r=pw)
        return x[:, :, :Tx, :Hx, :Wx].float()  # NOTE(official): float32 out

    def null_text(self, batch: int) -> torch.Tensor:
        """The learned null caption for the unconditional branch, (B, Lt, C_text). NOTE(official): RFLOW.sample
        gives it the text mask of the prompt it is paired with (the batch [cond; uncond] repeats the cond mask)."""
        return self.y_embedder.y_embedding[None].expand(batch, -1, -1)

    def attention_layers(self, cross: bool = False) -> list[AttentionLayer]:
        """The 28 spatial then the 28 temporal self-attention layers; with `cross`, then the 28 + 28 cross-attention
        layers of the same blocks (kind cross: K and V from the text, A on the video tokens; a block's F is filed
        under its self-attention, none under its cross-attention)."""
        layers = [AttentionLayer(b.attn.layer, "spatial", ffn=in_block(b.attn.layer, "mlp"))
                  for b in self.spatial_blocks]
        layers += [AttentionLayer(b.attn.layer, "temporal", ffn=in_block(b.attn.layer, "mlp"))
                   for b in self.temporal_blocks]
        if cross:
            layers += [AttentionLayer(b.cross_attn.layer, "cross", streams=("img", "txt"), f_point=None)
                       for b in [*self.spatial_blocks, *self.temporal_blocks]]
        return layers


# ---- checkpoints ------------------------------------------------------------------------------------------------

def load_opensora(path: str | Path, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> STDiT3:
    """Load STDiT3 from the Hub folder of `hpcai-tech/OpenSora-STDiT-v3` (config.json and model.safetensors), or
    from a weight file with its config.json beside it; floating tensors are cast to `dtype` as they are read."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = STDiT3Config.from_hub(weights.read_json(folder / "config.json"))
    sd = weights.load_folder(folder, dtype) if path.is_dir() else weights.load_file(path, dtype)
    sd.setdefault("rope.freqs", rope_frequencies(cfg.head_dim))  # fixed: recomputed should a file not store it
    with torch.device("meta"):
        model = STDiT3(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(path))
    return model.eval()
