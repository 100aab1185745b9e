"""CogVideoX-5b and -2b: a text-to-video diffusion transformer with one full 3D attention over text and video tokens.

Paper: Yang et al., "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer",
https://arxiv.org/abs/2408.06072. Official code: THUDM/CogVideo (`sat/`, the SwissArmyTransformer training code).
Checkpoints: `THUDM/CogVideoX-5b` (`transformer/`: two bf16 shards plus the index) and `THUDM/CogVideoX-2b`
(`transformer/`: one fp16 file), both in the diffusers layout, which is this module's attribute names (5b: 1024
tensors, 42 blocks of 48 heads x 64; 2b: 736 tensors, 30 blocks of 30 heads x 64).

The model sees 2x2 patches of every latent frame (no temporal patching) and T5 tokens:
- patch_embed: a 2x2 stride-2 convolution per latent frame, tokens frame-major (T, H/2, W/2); text_proj maps T5's
  4096 channels to the width D;
- each block ("expert adaLN"): one modulation linear per sub-layer gives six vectors, a shift, scale and gate for
  the video tokens and another three for the text tokens, which share the LayerNorm but not its modulation;
  one attention over [text; video] (text first) with per-head LayerNorm on q and k, then one GELU(tanh) FFN over
  the same joint sequence, each stream gated by its own gate;
- output: norm_final (LayerNorm), norm_out (adaLN, shift then scale), proj_out to 2x2x16 values per token.
Positions, not stored in the checkpoint:
- 5b: 3D RoPE on the video tokens' q and k only (head channels t:h:w = 16:24:24), over a grid of positions that
  the pipeline crops from the training grid (`rope_crop`; the identity at the default 480x720);
- 2b: a fixed 3D sin-cos table (temporal quarter, spatial three quarters) added to the video tokens at the input.
Conditioning: emb = MLP(sinusoid(t)) with a sinusoid as wide as the model (D), t the integer DDIM timestep.

Shapes: x (B, T, C, H, W) latents, frame-major as the pipeline keeps them; L = T (H/2)(W/2) video tokens of width
D = Nh * Dh; text (B, Lt, 4096), Lt = 226; emb (B, 512).
"""

import functools
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minidit import weights
from minidit.attention import AttentionLayer, attention, attention_output, feed_forward_output, in_block
from minidit.errors import MiniditError
from minidit.layers import FeedForward, MLPEmbedding, modulate, split_heads, timestep_embedding
from minidit.rope import apply_rope

QK_NORM_EPS = 1e-6  # the per-head LayerNorm of q and k (the blocks' norms use the config's norm_eps, 1e-5)
ROPE_THETA = 10000.0
SINCOS_BASE = 10000.0


@dataclass(frozen=True)
class CogVideoXConfig:
    # Defaults are those of diffusers' CogVideoXTransformer3DModel, applied to keys a config.json lacks.
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    sample_width: int = 90  # the training latent grid (480x720 pixels / 8); RoPE crops its positions from it
    sample_height: int = 60
    sample_frames: int = 49  # NOTE(official): video frames, not latent frames ((49 - 1) / 4 + 1 = 13)
    patch_size: int = 2
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False  # 5b: true; 2b: false (the sin-cos table)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_hub(cls, config: dict) -> "CogVideoXConfig":
        """Build from a Hub `transformer/config.json`; absent keys take diffusers' defaults. Variants no CogVideoX 1.0
        checkpoint uses (CogVideoX 1.5's temporal patches, the I2V models' learned positions and ofs embedding)
        are refused."""
        unsupported = {"patch_size_t": None, "ofs_embed_dim": None, "use_learned_positional_embeddings": False,
                       "patch_bias": True, "attention_bias": True, "norm_elementwise_affine": True,
                       "activation_fn": "gelu-approximate", "timestep_activation_fn": "silu"}
        for key, supported in unsupported.items():
            if config.get(key, supported) != supported:
                raise MiniditError(f"CogVideoX config with {key}={config[key]!r} is not supported by minidit (it "
                                   f"implements CogVideoX-5b and -2b, where {key} is {supported!r})")
        return cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})


PRESETS = {"CogVideoX-5b": CogVideoXConfig(num_layers=42, num_attention_heads=48,
                                           use_rotary_positional_embeddings=True),
           "CogVideoX-2b": CogVideoXConfig()}


# ---- positions ---------------------------------------------------------------------------------------------

def rope_crop(grid: tuple[int, int], base: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The region ((top, left), (bottom, right)) of the training grid `base` (h, w) that the pipeline maps the
    latent patch grid `grid` (h, w) onto: `grid` scaled to fit inside `base`, centred (Python's round, as the
    reference's get_resize_crop_region_for_grid). The identity at the default size."""
    (h, w), (base_h, base_w) = grid, base
    if h / w > base_h / base_w:
        size = base_h, int(round(base_h / h * w))
    else:
        size = int(round(base_w / w * h)), base_w
    top, left = int(round((base_h - size[0]) / 2.0)), int(round((base_w - size[1]) / 2.0))
    return (top, left), (top + size[0], left + size[1])


def rope_3d(head_dim: int, frames: int, grid: tuple[int, int], crop, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T*h*w, Dh) in float32, for video tokens in (T, h, w) order: the head's channels split
    t:h:w = Dh/4 : 3Dh/8 : 3Dh/8, each axis rotating consecutive pairs by pos * theta^(-2k/d_axis).

    NOTE(official): positions are linspace(start, stop * (n - 1) / n, n) over the crop region (so 0 .. n-1 when
    the crop is the identity), and everything, the frequencies included, is computed in float32.
    """
    (top, left), (bottom, right) = crop
    h, w = grid
    positions = lambda start, stop, n: torch.linspace(start, stop * (n - 1) / n, n, dtype=torch.float32,  # noqa: E731
                                                      device=device)
    axes = [(head_dim // 4, positions(0, frames, frames)),
            (head_dim // 8 * 3, positions(top, bottom, h)),
            (head_dim // 8 * 3, positions(left, right, w))]
    cos, sin = [], []
    for axis, (dim, pos) in enumerate(axes):
        omega = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        angle = torch.outer(pos, omega)  # (n, d/2)
        shape = [frames, h, w, dim]
        view = [1, 1, 1, dim]
        view[axis] = -1
        cos.append(angle.cos().repeat_interleave(2, dim=1).view(view).expand(shape))
        sin.append(angle.sin().repeat_interleave(2, dim=1).view(view).expand(shape))
    return torch.cat(cos, dim=-1).reshape(-1, head_dim), torch.cat(sin, dim=-1).reshape(-1, head_dim)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(n,) positions -> (n, dim) [sin | cos] in float64, frequencies 1 / 10000^(k / (dim/2))."""
    omega = 1.0 / SINCOS_BASE ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.outer(pos.double(), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


@functools.lru_cache(maxsize=8)
def sincos_3d(dim: int, frames: int, h: int, w: int, spatial_scale: float, temporal_scale: float) -> torch.Tensor:
    """The 2b's fixed position table (T*h*w, dim) in float64, tokens in (T, h, w) order: [temporal (dim/4) |
    column (3dim/8) | row (3dim/8)], coordinates arange(n) / interpolation scale (computed in float32)."""
    rows = torch.arange(h, dtype=torch.float32) / spatial_scale
    cols = torch.arange(w, dtype=torch.float32) / spatial_scale
    grid_h, grid_w = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    spatial = torch.cat([_sincos_1d(3 * dim // 8, grid_w.flatten()), _sincos_1d(3 * dim // 8, grid_h.flatten())], 1)
    temporal = _sincos_1d(dim // 4, torch.arange(frames, dtype=torch.float32) / temporal_scale)  # (T, dim/4)
    table = torch.cat([temporal[:, None].expand(-1, h * w, -1), spatial[None].expand(frames, -1, -1)], dim=-1)
    return table.reshape(frames * h * w, dim)


# ---- embedders and norms -------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Video latents -> 2x2 patch tokens (a convolution per frame, frame-major); T5 states -> text tokens."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        p, dim = cfg.patch_size, cfg.hidden_size
        self.proj = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        self.text_proj = nn.Linear(cfg.text_embed_dim, dim)

    def forward(self, text: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        x = self.proj(rearrange(x, "B T C H W -> (B T) C H W"))  # (B T, D, H/2, W/2)
        return self.text_proj(text), rearrange(x, "(B T) D h w -> B (T h w) D", B=B)


class LayerNormZero(nn.Module):
    """CogVideoX's expert adaLN: one LayerNorm, six modulation vectors, (shift, scale, gate) for the video tokens
    and (enc_shift, enc_scale, enc_gate) for the text tokens."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 6 * cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(6, dim=1)


class AdaLayerNorm(nn.Module):
    """The final modulation: LayerNorm, then shift and scale from emb (in that order, unlike SD3's and FLUX's)."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 2 * cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(emb)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


# ---- the block ------------------------------------------------------------------------------------------------

class JointAttention(nn.Module):
    """One attention over [text; video]: shared projections, per-head LayerNorm of q and k, RoPE (5b) on the video
    tokens only, one output projection over the whole sequence."""

    def __init__(self, cfg: CogVideoXConfig, layer: str):
        super().__init__()
        dim, head_dim = cfg.hidden_size, cfg.attention_head_dim
        self.layer, self.num_heads = layer, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q = nn.LayerNorm(head_dim, eps=QK_NORM_EPS)
        self.norm_k = nn.LayerNorm(head_dim, eps=QK_NORM_EPS)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint key: to_out.0

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        lt = c.shape[1]
        h = torch.cat([c, x], dim=1)  # (B, Lt + L, D): text first
        q = self.norm_q(split_heads(self.to_q(h), self.num_heads))  # (B, Nh, Lt + L, Dh)
        k = self.norm_k(split_heads(self.to_k(h), self.num_heads))
        v = split_heads(self.to_v(h), self.num_heads)
        if rope is not None:  # 5b: the video tokens rotate, the text tokens do not
            q = torch.cat([q[:, :, :lt], apply_rope(q[:, :, lt:], *rope)], dim=2)
            k = torch.cat([k[:, :, :lt], apply_rope(k[:, :, lt:], *rope)], dim=2)
        streams = (("txt", lt), ("img", x.shape[1]))
        out = attention(q, k, v, layer=self.layer, streams=streams)  # (B, Lt + L, D)
        a = attention_output(self.to_out[0](out), layer=self.layer, streams=streams)
        return a[:, lt:], a[:, :lt]


class CogVideoXBlock(nn.Module):
    def __init__(self, cfg: CogVideoXConfig, index: int):
        super().__init__()
        self.norm1 = LayerNormZero(cfg)
        self.attn1 = JointAttention(cfg, f"transformer_blocks.{index}.attn1")
        self.norm2 = LayerNormZero(cfg)
        self.ff = FeedForward(cfg.hidden_size)

    def forward(self, x, c, emb, rope) -> tuple[torch.Tensor, torch.Tensor]:
        lt = c.shape[1]
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.norm1(emb)  # (B, D) each
        a_x, a_c = self.attn1(modulate(self.norm1.norm(x), shift, scale),
                              modulate(self.norm1.norm(c), enc_shift, enc_scale), rope)
        x = x + gate[:, None] * a_x
        c = c + enc_gate[:, None] * a_c
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.norm2(emb)
        f = self.ff(torch.cat([modulate(self.norm2.norm(c), enc_shift, enc_scale),
                               modulate(self.norm2.norm(x), shift, scale)], dim=1))  # one FFN over [text; video]
        f = feed_forward_output(f, layer=self.attn1.layer, streams=(("txt", lt), ("img", x.shape[1])))
        x = x + gate[:, None] * f[:, lt:]
        c = c + enc_gate[:, None] * f[:, :lt]
        return x, c


# ---- the model --------------------------------------------------------------------------------------------------

class CogVideoXTransformer(nn.Module):
    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = MLPEmbedding(dim, cfg.time_embed_dim)  # input: a sinusoid as wide as the model
        self.transformer_blocks = nn.ModuleList([CogVideoXBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.norm_out = AdaLayerNorm(cfg)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x (B, T, C, H, W) latents, text (B, Lt, 4096) T5 states, timestep (B,) integer DDIM timesteps
        -> v-prediction (B, T, C_out, H, W)."""
        cfg = self.config
        _, T, _, H, W = x.shape
        h, w = H // cfg.patch_size, W // cfg.patch_size
        t_freq = timestep_embedding(timestep, cfg.hidden_size, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                    freq_shift=cfg.freq_shift)
        emb = self.time_embedding(t_freq.to(x.dtype))  # (B, 512)
        c, x = self.patch_embed(text, x)  # (B, Lt, D), (B, L, D)
        rope = None
        if cfg.use_rotary_positional_embeddings:  # 5b: RoPE, applied in every attention
            base = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
            rope = rope_3d(cfg.attention_head_dim, T, (h, w), rope_crop((h, w), base), x.device)
        else:  # 2b: the sin-cos table, added once
            if c.shape[1] != cfg.max_text_seq_length:  # NOTE(official): the reference's table has that many text rows
                raise MiniditError(f"CogVideoX without RoPE (2b) takes exactly {cfg.max_text_seq_length} text tokens, "
                                   f"got {c.shape[1]}")
            table = sincos_3d(cfg.hidden_size, T, h, w, cfg.spatial_interpolation_scale,
                              cfg.temporal_interpolation_scale)
            x = x + table.to(device=x.device, dtype=x.dtype)
        for block in self.transformer_blocks:
            x, c = block(x, c, emb, rope)
        x = self.proj_out(self.norm_out(self.norm_final(x), emb))  # (B, L, C_out p p)
        return rearrange(x, "B (T h w) (C p q) -> B T C (h p) (w q)", T=T, h=h, p=cfg.patch_size, q=cfg.patch_size)

    def attention_layers(self) -> list[AttentionLayer]:
        """The joint attention of every block, in order (42 for 5b, 30 for 2b)."""
        return [AttentionLayer(b.attn1.layer, "joint", streams=("img", "txt"), ffn=in_block(b.attn1.layer, "ff"))
                for b in self.transformer_blocks]


# ---- checkpoints -------------------------------------------------------------------------------------------------

def load_cogvideox(folder: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu") -> CogVideoXTransformer:
    """Load from a Hub-layout `transformer/` folder: 5b's bf16 shards plus index, or 2b's single fp16 file, either
    cast to `dtype` as it is read."""
    folder = Path(folder)
    cfg = CogVideoXConfig.from_hub(weights.read_json(folder / "config.json"))
    sd = weights.load_folder(folder, dtype)
    with torch.device("meta"):
        model = CogVideoXTransformer(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(folder))
    return model.eval()
