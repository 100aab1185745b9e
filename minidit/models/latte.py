"""Latte: a text-to-video latent diffusion transformer with spatial and temporal blocks (Ma et al., 2024).

Paper: https://arxiv.org/abs/2401.03048. Official code: Vchitect/Latte `models/latte_t2v.py`.
Checkpoint: `maxin-cn/Latte-1` on the Hub, whose `transformer/` folder (one fp32 safetensors file, 967 tensors,
1,057,246,880 parameters) is in the diffusers layout: this module's attribute names.

The video is a stack of T frames of latents. Each frame is patchified into L = H*W tokens, and 28 pairs of blocks
alternate between two views of the same tokens:
- a spatial block sees each frame on its own, (B T) L D: PixArt-α's block (adaLN-single self-attention,
  unmodulated cross-attention to the projected T5 states, adaLN-single FFN);
- a temporal block sees each token position across the frames, (B L) T D: adaLN-single self-attention over the T
  frames and an FFN, no cross-attention.
The fold between the two is written in the block loop of `Latte.forward`. One adaLN-single MLP turns the timestep
into the six modulation vectors of every block, spatial and temporal, each block adding its own `scale_shift_table`.
A fixed 1D sin-cos table over the frames is added once, before the first temporal block. The final layer is PixArt's,
and the output has 8 channels: epsilon, then the learned variance interpolation (unused at inference).

Quirks of the diffusers layout and code, kept:
- `config.json` lacks `video_length` (16: the length of the temporal table, which is not stored) and the
  interpolation scale of the 2D position table (max(sample_size // 64, 1)); both take diffusers' defaults;
- the temporal table has exactly `video_length` rows, so a video must have `video_length` frames, or 1 (an image:
  the table is then not added at all, and each temporal attention sees one frame);
- the timestep and the text are shared by the frames of a video: repeated per frame, B outermost.
NOTE(official): LattePipeline passes no text mask to the transformer (it truncates the T5 states instead, see
pipelines/latte.py), and diffusers hands an `encoder_attention_mask` to the attention kernel unconverted and
unrepeated, which only works for a single frame. Here `text_mask` (1 = token, 0 = padding) is repeated per frame and
masks padded text tokens out of the cross-attention, which for one frame is what diffusers does with a boolean mask.
Not implemented: diffusers' `enable_temporal_attentions=False` switch (off by default), which skips every temporal
block.

Shapes: x (B, C, T, H*p, W*p) latents -> L = H*W tokens per frame of width D = Nh*Dh; text (B, Lt, 4096) -> (B, Lt, D).
"""

import functools
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from minidit import weights
from minidit.attention import AttentionLayer, attention, attention_output, feed_forward_output, in_block
from minidit.errors import MiniditError
from minidit.layers import FeedForward, MLPEmbedding, modulate, sincos_2d, split_heads, timestep_embedding, unpatchify

FREQ_DIM = 256  # width of the timestep sinusoids
MAX_PERIOD = 10000.0  # of the temporal sin-cos table


@dataclass(frozen=True)
class LatteConfig:
    num_layers: int = 28  # pairs of blocks: 28 spatial and 28 temporal
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8  # epsilon, then the learned variance interpolation (unused at inference)
    patch_size: int = 2
    sample_size: int = 64  # latent side the model was trained at (512 px)
    caption_channels: int = 4096  # T5 v1.1 XXL width
    norm_eps: float = 1e-6
    video_length: int = 16  # rows of the temporal sin-cos table: the frames a video must have
    interpolation_scale: float = 1.0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_hub(cls, config: dict) -> "LatteConfig":
        """Build from a Hub `transformer/config.json`, applying diffusers' defaults for absent keys."""
        expected = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                    "norm_elementwise_affine": False}
        for key, value in expected.items():
            if config.get(key) != value:
                raise MiniditError(f"Latte config has {key}={config.get(key)!r}; minidit supports only {value!r}")
        values = {k: v for k, v in config.items() if k in {f.name for f in fields(cls)} and v is not None}
        values.pop("interpolation_scale", None)  # not a diffusers key: always derived from sample_size
        sample_size = values.get("sample_size", cls.sample_size)
        cfg = cls(**values, interpolation_scale=max(sample_size // 64, 1))
        if config.get("cross_attention_dim", cfg.hidden_size) != cfg.hidden_size:
            raise MiniditError(f"Latte config has cross_attention_dim={config['cross_attention_dim']}, "
                               f"expected the inner dim {cfg.hidden_size}")
        return cfg


PRESETS = {"Latte-1": LatteConfig()}


@functools.lru_cache(maxsize=8)
def temporal_sincos(dim: int, frames: int) -> torch.Tensor:
    """Fixed 1D sin-cos table (frames, dim) in float32: frame f, channel k < dim/2 -> sin(f w_k), then the cos;
    w_k = 1 / 10000^(k / (dim/2)). Computed in float64, as the reference does."""
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.outer(torch.arange(frames, dtype=torch.float64), omega)  # (T, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


# ---- conditioning --------------------------------------------------------------------------------------

class TimestepConditioning(nn.Module):
    """emb = MLP(sinusoid(t)), (B, D); the checkpoint's `adaln_single.emb` (no micro-conditions in Latte)."""

    def __init__(self, cfg: LatteConfig):
        super().__init__()
        self.timestep_embedder = MLPEmbedding(FREQ_DIM, cfg.hidden_size)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(t.flatten(), FREQ_DIM).to(dtype))  # [cos | sin], shift 0


class AdaLNSingle(nn.Module):
    """The one conditioning MLP of the whole model: emb (B, D) and its six modulation vectors (B, 6 * D)."""

    def __init__(self, cfg: LatteConfig):
        super().__init__()
        self.emb = TimestepConditioning(cfg)
        self.linear = nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb(t, dtype)
        return self.linear(F.silu(emb)), emb


class CaptionProjection(nn.Module):
    """T5 states (B, Lt, 4096) -> (B, Lt, D): linear -> GELU(tanh) -> linear."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class PatchEmbed(nn.Module):
    """Frames (N, C, H*p, W*p) -> tokens (N, L, D) plus the fixed 2D sin-cos position table."""

    def __init__(self, cfg: LatteConfig):
        super().__init__()
        self.patch_size, self.base_size = cfg.patch_size, cfg.sample_size // cfg.patch_size
        self.interpolation_scale = cfg.interpolation_scale
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = rearrange(self.proj(x), "N D H W -> N (H W) D").contiguous()  # token-major, as every later op reads it
        pos = sincos_2d(x.shape[-1], h, w, self.base_size, self.interpolation_scale)  # (L, D), fixed
        return x + pos.to(x.device, x.dtype)


# ---- blocks --------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Queries from the tokens of x; keys and values from x (self: spatial or temporal) or from the text (cross)."""

    def __init__(self, cfg: LatteConfig, layer: str, kv_stream: str):
        super().__init__()
        dim = cfg.hidden_size
        self.layer, self.kv_stream, self.num_heads = layer, kv_stream, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint key: to_out.0

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        heads = lambda t: split_heads(t, self.num_heads)  # noqa: E731
        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        out = attention(q, k, v, mask=mask, layer=self.layer, streams=self.kv_stream)  # (N, L, D)
        return attention_output(self.to_out[0](out), layer=self.layer)


class SpatialBlock(nn.Module):
    """PixArt-α's block on the tokens of each frame, rows N = B*T: x (N, L, D), t6 (N, 6D), text (N, Lt, D)."""

    def __init__(self, cfg: LatteConfig, index: int):
        super().__init__()
        dim = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn1 = Attention(cfg, f"transformer_blocks.{index}.attn1", kv_stream="img")
        self.attn2 = Attention(cfg, f"transformer_blocks.{index}.attn2", kv_stream="txt")
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)  # before the FFN
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        mod = self.scale_shift_table[None] + rearrange(t6, "N (six D) -> N six D", six=6)  # (N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(dim=1)  # (N, D) each
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * self.attn1(h, h)
        x = x + self.attn2(x, text, mask)
        f = feed_forward_output(self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp)), layer=self.attn1.layer)
        x = x + gate_mlp[:, None] * f
        return x


class TemporalBlock(nn.Module):
    """Self-attention over the frames of each token position, rows N = B*L: x (N, T, D), t6 (N, 6D)."""

    def __init__(self, cfg: LatteConfig, index: int):
        super().__init__()
        dim = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn1 = Attention(cfg, f"temporal_transformer_blocks.{index}.attn1", kv_stream="img")
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)  # before the FFN
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, t6: torch.Tensor) -> torch.Tensor:
        mod = self.scale_shift_table[None] + rearrange(t6, "N (six D) -> N six D", six=6)  # (N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(dim=1)  # (N, D) each
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * self.attn1(h, h)
        f = feed_forward_output(self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp)), layer=self.attn1.layer)
        x = x + gate_mlp[:, None] * f
        return x


class Latte(nn.Module):
    def __init__(self, cfg: LatteConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg)
        self.adaln_single = AdaLNSingle(cfg)
        self.caption_projection = CaptionProjection(cfg.caption_channels, dim)
        self.transformer_blocks = nn.ModuleList([SpatialBlock(cfg, i) for i in range(cfg.num_layers)])
        self.temporal_transformer_blocks = nn.ModuleList([TemporalBlock(cfg, i) for i in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim))  # the final layer's shift and scale
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T, H*p, W*p) latents with T = video_length or 1, t (B,) timesteps in [0, 1000), text (B, Lt, 4096)
        T5 states, text_mask (B, Lt) 1 = token, 0 = padding. Returns (B, C_out, T, H*p, W*p)."""
        cfg, (B, _, T, _, _) = self.config, x.shape
        if T not in (1, cfg.video_length):
            raise MiniditError(f"Latte takes videos of {cfg.video_length} frames (the length of its temporal "
                               f"position table) or single frames, got {T} frames")
        h, w = x.shape[-2] // cfg.patch_size, x.shape[-1] // cfg.patch_size
        x = self.pos_embed(rearrange(x, "B C T H W -> (B T) C H W"))  # (B T, L, D)
        t6, emb = self.adaln_single(t, x.dtype)  # (B, 6D), (B, D)
        # every frame of a video (and every token position of it) shares its timestep and text; B stays outermost
        t6_spatial, t6_temporal = repeat(t6, "B D -> (B T) D", T=T), repeat(t6, "B D -> (B L) D", L=h * w)
        text = repeat(self.caption_projection(text), "B Lt D -> (B T) Lt D", T=T)
        mask = None if text_mask is None else repeat(text_mask.bool(), "B Lt -> (B T) 1 1 Lt", T=T)
        for i, (spatial, temporal) in enumerate(zip(self.transformer_blocks, self.temporal_transformer_blocks)):
            x = spatial(x, t6_spatial, text, mask)  # each frame on its own
            x = rearrange(x, "(B T) L D -> (B L) T D", B=B)
            if i == 0 and T > 1:
                x = x + temporal_sincos(x.shape[-1], cfg.video_length).to(x.device, x.dtype)  # (T, D), fixed
            x = temporal(x, t6_temporal)  # each token position across the frames
            x = rearrange(x, "(B L) T D -> (B T) L D", B=B)
        shift, scale = (self.scale_shift_table[None] + repeat(emb, "B D -> (B T) 1 D", T=T)).unbind(dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B T, L, p*p*C_out)
        return rearrange(unpatchify(x, h, w, cfg.patch_size), "(B T) C H W -> B C T H W", B=B)

    def attention_layers(self, cross: bool = False) -> list[AttentionLayer]:
        """The 28 spatial then the 28 temporal self-attention layers; with `cross`, then the 28 cross-attention
        layers of the spatial blocks (kind cross: K and V from the text, A on the video tokens; a block's F is filed
        under its self-attention, none under its cross-attention)."""
        layers = [AttentionLayer(b.attn1.layer, "spatial", ffn=in_block(b.attn1.layer, "ff"))
                  for b in self.transformer_blocks]
        layers += [AttentionLayer(b.attn1.layer, "temporal", ffn=in_block(b.attn1.layer, "ff"))
                   for b in self.temporal_transformer_blocks]
        if cross:
            layers += [AttentionLayer(b.attn2.layer, "cross", streams=("img", "txt"), f_point=None)
                       for b in self.transformer_blocks]
        return layers


# ---- checkpoints -------------------------------------------------------------------------------------

def load_latte(folder: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Latte:
    """Load Latte from a Hub-layout `transformer/` folder (config.json and the safetensors)."""
    folder = Path(folder)
    cfg = LatteConfig.from_hub(weights.read_json(folder / "config.json"))
    sd = weights.load_folder(folder, dtype)
    sd.pop("pos_embed.pos_embed", None)  # the fixed 2D table, should an export store it; recomputed here
    with torch.device("meta"):
        model = Latte(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(folder))
    return model.eval()

