"""PixArt-α: a text-to-image DiT with adaLN-single and cross-attention to T5 (Chen et al., 2023).

Paper: https://arxiv.org/abs/2310.00426. Official code: PixArt-alpha/PixArt-alpha `diffusion/model/nets/`.
Checkpoints: `PixArt-alpha/PixArt-XL-2-1024-MS` and `PixArt-alpha/PixArt-XL-2-512x512` on the Hub, whose
`transformer/` folder is in the diffusers layout (this module's attribute names), and the original
`PixArt-XL-2-*.pth` files (`{"state_dict": ...}`), loaded through `ORIGINAL_TO_HUB` below.

How it differs from DiT:
- adaLN-single: one MLP turns the timestep (plus, for the 1024 model, the image size and aspect ratio)
  into six modulation vectors shared by all blocks; each block adds its own learned `scale_shift_table`.
- each block has self-attention (modulated), then cross-attention to the projected T5 states
  (unmodulated, no norm, plain residual), then the FFN (modulated);
- the sin-cos position table is scaled by `interpolation_scale` (2 for the 1024 model).

Quirks of the diffusers layout and pipeline, kept:
- the padded text tokens are masked with an additive bias of -10000, not -inf;
- `config.json` lacks `use_additional_conditions` and `interpolation_scale`; both follow from `sample_size`.

Shapes: x (B, C, H*p, W*p) latents -> L = H*W image tokens of width D = Nh*Dh; text (B, Lt, 4096) -> (B, Lt, D).
"""

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minidit import weights
from minidit.attention import AttentionLayer, attention, attention_output, feed_forward_output, in_block
from minidit.errors import MiniditError
from minidit.layers import FeedForward, MLPEmbedding, modulate, sincos_2d, split_heads, timestep_embedding, unpatchify
from minidit.weights import DROP, split, weight_and_bias

FREQ_DIM = 256  # width of the sinusoids of the timestep and of each micro-condition
MASK_BIAS = -10000.0  # NOTE(official): diffusers' additive bias for padded text tokens


@dataclass(frozen=True)
class PixArtConfig:
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8  # epsilon, then the learned variance interpolation (unused at inference)
    patch_size: int = 2
    sample_size: int = 128  # latent side: 128 for the 1024 model, 64 for the 512 one
    caption_channels: int = 4096  # T5 v1.1 XXL width
    norm_eps: float = 1e-6
    use_additional_conditions: bool = True  # resolution and aspect-ratio micro-conditions
    interpolation_scale: float = 2.0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_hub(cls, config: dict) -> "PixArtConfig":
        """Build from a Hub `transformer/config.json`, applying diffusers' defaults for absent keys."""
        expected = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                    "norm_elementwise_affine": False}
        for key, value in expected.items():
            if config.get(key, value) != value:
                raise MiniditError(f"PixArt config has {key}={config[key]!r}; minidit supports only {value!r}")
        values = {k: v for k, v in config.items() if k in {f.name for f in fields(cls)} and v is not None}
        sample_size = values.get("sample_size", cls.sample_size)
        values.setdefault("use_additional_conditions", sample_size == 128)
        values.setdefault("interpolation_scale", max(sample_size // 64, 1))
        cfg = cls(**values)
        if config.get("cross_attention_dim", cfg.hidden_size) != cfg.hidden_size:
            raise MiniditError(f"PixArt config has cross_attention_dim={config['cross_attention_dim']}, "
                               f"expected the inner dim {cfg.hidden_size}")
        return cfg


PRESETS = {
    "PixArt-XL-2-1024-MS": PixArtConfig(),
    "PixArt-XL-2-512x512": PixArtConfig(sample_size=64, use_additional_conditions=False, interpolation_scale=1),
}


# ---- conditioning --------------------------------------------------------------------------------------

class Conditioning(nn.Module):
    """emb = MLP(sinusoid(t)) [+ MLP(sinusoid(h)), MLP(sinusoid(w)), MLP(sinusoid(h / w)) concatenated], (B, D)."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.use_additional_conditions = cfg.use_additional_conditions
        self.timestep_embedder = MLPEmbedding(FREQ_DIM, cfg.hidden_size)
        if cfg.use_additional_conditions:
            micro = cfg.hidden_size // 3  # height, width and ratio embeddings, concatenated, make D
            self.resolution_embedder = MLPEmbedding(FREQ_DIM, micro)
            self.aspect_ratio_embedder = MLPEmbedding(FREQ_DIM, micro)

    def forward(self, t: torch.Tensor, resolution: torch.Tensor | None, aspect_ratio: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        sinusoid = lambda v: timestep_embedding(v.flatten(), FREQ_DIM).to(dtype)  # noqa: E731  [cos | sin], shift 0
        emb = self.timestep_embedder(sinusoid(t))
        if not self.use_additional_conditions:
            return emb
        if resolution is None or aspect_ratio is None:
            raise MiniditError("this PixArt model (the 1024 one) needs the resolution and aspect_ratio "
                               "micro-conditions")
        size = self.resolution_embedder(sinusoid(resolution)).reshape(len(t), -1)  # (B, 2D/3): height then width
        ratio = self.aspect_ratio_embedder(sinusoid(aspect_ratio)).reshape(len(t), -1)  # (B, D/3)
        return emb + torch.cat([size, ratio], dim=1)


class AdaLNSingle(nn.Module):
    """The one conditioning MLP of the whole model: emb (B, D) and its six modulation vectors (B, 6 * D)."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.emb = Conditioning(cfg)
        self.linear = nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size)

    def forward(self, t, resolution, aspect_ratio, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb(t, resolution, aspect_ratio, dtype)
        return self.linear(F.silu(emb)), emb


class CaptionProjection(nn.Module):
    """T5 states (B, Lt, 4096) -> (B, Lt, D): linear -> GELU(tanh) -> linear."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


# ---- blocks --------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Queries from the image tokens; keys and values from the image tokens (self) or the text (cross)."""

    def __init__(self, cfg: PixArtConfig, layer: str, kv_stream: str):
        super().__init__()
        dim = cfg.hidden_size
        self.layer, self.kv_stream, self.num_heads = layer, kv_stream, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint key: to_out.0

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        heads = lambda t: split_heads(t, self.num_heads)  # noqa: E731
        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        out = attention(q, k, v, mask=bias, layer=self.layer, streams=self.kv_stream)  # (B, L, D)
        return attention_output(self.to_out[0](out), layer=self.layer)


class PixArtBlock(nn.Module):
    def __init__(self, cfg: PixArtConfig, index: int):
        super().__init__()
        dim = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn1 = Attention(cfg, f"transformer_blocks.{index}.attn1", kv_stream="img")
        self.attn2 = Attention(cfg, f"transformer_blocks.{index}.attn2", kv_stream="txt")
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)  # before the FFN
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, text: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        mod = self.scale_shift_table[None] + rearrange(t6, "B (six D) -> B six D", six=6)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(dim=1)  # (B, D) each
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * self.attn1(h, h)
        x = x + self.attn2(x, text, bias)
        f = feed_forward_output(self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp)), layer=self.attn1.layer)
        x = x + gate_mlp[:, None] * f
        return x


class PatchEmbed(nn.Module):
    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.patch_size, self.base_size = cfg.patch_size, cfg.sample_size // cfg.patch_size
        self.interpolation_scale = cfg.interpolation_scale
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = rearrange(self.proj(x), "B D H W -> B (H W) D").contiguous()  # token-major, as every later op reads it
        pos = sincos_2d(x.shape[-1], h, w, self.base_size, self.interpolation_scale)  # (L, D), fixed
        return x + pos.to(x.device, x.dtype)


class PixArt(nn.Module):
    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg)
        self.adaln_single = AdaLNSingle(cfg)
        self.caption_projection = CaptionProjection(cfg.caption_channels, dim)
        self.transformer_blocks = nn.ModuleList([PixArtBlock(cfg, i) for i in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim))  # the final layer's shift and scale
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                resolution: torch.Tensor | None = None, aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H*p, W*p), t (B,) timesteps in [0, 1000), text (B, Lt, 4096) T5 states, text_mask (B, Lt)
        1 = token, 0 = padding; for the 1024 model resolution (B, 2) = [height, width] in pixels and
        aspect_ratio (B, 1) = height / width. Returns (B, C_out, H*p, W*p)."""
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.pos_embed(x)  # (B, L, D)
        t6, emb = self.adaln_single(t, resolution, aspect_ratio, x.dtype)  # (B, 6D), (B, D)
        text = self.caption_projection(text)  # (B, Lt, D)
        bias = None
        if text_mask is not None:
            bias = ((1 - text_mask.to(x.dtype)) * MASK_BIAS)[:, None, None, :]  # (B, 1, 1, Lt)
        for block in self.transformer_blocks:
            x = block(x, t6, text, bias)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).unbind(dim=1)  # (B, D) each
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, L, p*p*C_out)
        return unpatchify(x, h, w, p)

    def attention_layers(self, cross: bool = False) -> list[AttentionLayer]:
        """The 28 self-attention layers; with `cross`, then the 28 cross-attention layers (kind cross; a block's F
        is filed under its self-attention, none under its cross-attention)."""
        layers = [AttentionLayer(b.attn1.layer, "self", ffn=in_block(b.attn1.layer, "ff"))
                  for b in self.transformer_blocks]
        if cross:
            layers += [AttentionLayer(b.attn2.layer, "cross", streams=("img", "txt"), f_point=None)
                       for b in self.transformer_blocks]
        return layers


# ---- checkpoints -------------------------------------------------------------------------------------

# The original PixArt state dict -> the Hub (diffusers) layout (a table for `weights.rename`). "{i}" is a block index.
ORIGINAL_TO_HUB = {
    **weight_and_bias({
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
        "t_block.1": "adaln_single.linear",
        "y_embedder.y_proj.fc1": "caption_projection.linear_1",
        "y_embedder.y_proj.fc2": "caption_projection.linear_2",
        "blocks.{i}.attn.qkv": split("transformer_blocks.{i}.attn1.to_{}", "q", "k", "v"),
        "blocks.{i}.attn.proj": "transformer_blocks.{i}.attn1.to_out.0",
        "blocks.{i}.cross_attn.q_linear": "transformer_blocks.{i}.attn2.to_q",
        "blocks.{i}.cross_attn.kv_linear": split("transformer_blocks.{i}.attn2.to_{}", "k", "v"),
        "blocks.{i}.cross_attn.proj": "transformer_blocks.{i}.attn2.to_out.0",
        "blocks.{i}.mlp.fc1": "transformer_blocks.{i}.ff.net.0.proj",
        "blocks.{i}.mlp.fc2": "transformer_blocks.{i}.ff.net.2",
        "final_layer.linear": "proj_out",
    }),
    "blocks.{i}.scale_shift_table": "transformer_blocks.{i}.scale_shift_table",
    "final_layer.scale_shift_table": "scale_shift_table",
    # NOTE(official): the learned null caption is dropped; the diffusers pipeline encodes "" with T5 for the
    # unconditional branch instead. pos_embed is the fixed sin-cos table, recomputed here.
    "y_embedder.y_embedding": DROP,
    "pos_embed": DROP,
}
ORIGINAL_MICRO_CONDITIONS = weight_and_bias({  # the 1024 model's (use_additional_conditions)
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
})


def original_to_hub(sd: dict[str, torch.Tensor], cfg: PixArtConfig) -> dict[str, torch.Tensor]:
    """An original PixArt state dict in the Hub layout (every key checked: none missing, none unknown)."""
    table = ORIGINAL_TO_HUB | (ORIGINAL_MICRO_CONDITIONS if cfg.use_additional_conditions else {})
    return weights.rename(sd, table, blocks={"i": range(cfg.num_layers)}, source="the original PixArt state dict")


def load_pixart(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                preset: str | None = None, config: PixArtConfig | None = None) -> PixArt:
    """Load PixArt from a Hub-layout `transformer/` folder, or from an original `.pth` file.

    An original file carries no config: `config`, or the name of a preset, gives it (default: the 1024 model
    when the file has the micro-condition embedders, else the 512 one).
    """
    path = Path(path)
    if path.is_file():
        sd = weights.load_file(path)
        preset = preset or ("PixArt-XL-2-1024-MS" if "csize_embedder.mlp.0.weight" in sd else "PixArt-XL-2-512x512")
        if config is None and preset not in PRESETS:
            raise MiniditError(f"unknown PixArt preset {preset!r}; choose one of {sorted(PRESETS)}")
        cfg = config or PRESETS[preset]
        sd = original_to_hub(sd, cfg)
    else:
        cfg = PixArtConfig.from_hub(weights.read_json(path / "config.json"))
        sd = weights.load_folder(path, dtype)
        sd.pop("pos_embed.pos_embed", None)  # a fixed table some exports store; recomputed here
    with torch.device("meta"):
        model = PixArt(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(path))
    return model.eval()
