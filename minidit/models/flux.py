"""FLUX.1 [dev] and [schnell]: a rectified-flow transformer with double- and single-stream blocks (Black Forest Labs).

Official code: black-forest-labs/flux `src/flux/model.py`, `modules/layers.py`. Checkpoints:
`black-forest-labs/FLUX.1-dev` (gated) and `FLUX.1-schnell`, whose `transformer/` folder (three bf16 shards) is
in the diffusers layout (this module's attribute names), and the BFL single files `flux1-dev.safetensors` /
`flux1-schnell.safetensors` (fused qkv and `linear1`), loaded through `ORIGINAL_TO_HUB` below.

The model sees 2x2-packed latent tokens (64 channels each) and T5 tokens:
- 19 double-stream blocks: text and image keep their own modulation, projections, QK RMSNorm and FFN,
  and meet in one attention over [text; image] (text first);
- 38 single-stream blocks on the concatenated [text; image] sequence: one linear gives q, k, v and the
  MLP input in parallel, and one linear maps [attention, GELU(MLP)] back; there is no separate attention
  output projection, so A is taken before it (a_point "pre_proj"), and no separate MLP output either, so F (the
  optional feed-forward capture) is the block's whole update of the residual stream, gate * proj_out([A; GELU(MLP)])
  (f_point "block").
Positions: 3-axis RoPE (16 + 56 + 56 channels per head) from ids (0, row, column) for image tokens and zeros
for text tokens. Conditioning: emb = MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g)) for dev's distilled
guidance] + MLP(pooled CLIP-L).

Shapes: x (B, L, 64) packed latents, L = (H/16)(W/16) at H x W pixels; text (B, Lt, 4096); pooled (B, 768);
D = Nh * Dh = 24 * 128 = 3072.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidit import weights
from minidit.attention import AttentionLayer, attention, attention_output, feed_forward_output, in_block
from minidit.errors import MiniditError
from minidit.layers import FeedForward, MLPEmbedding, modulate, split_heads, timestep_embedding
from minidit.rope import apply_rope, rope_frequencies
from minidit.weights import split, swap_halves, weight_and_bias

FREQ_DIM = 256  # width of the timestep and guidance sinusoids
NORM_EPS = 1e-6
ROPE_THETA = 10000.0
TIME_SCALE = 1000.0  # NOTE(official): the pipeline passes t = sigma in [0, 1]; the model multiplies by 1000


@dataclass(frozen=True)
class FluxConfig:
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 64  # a 2x2 patch of 16 latent channels
    out_channels: int | None = None  # None: in_channels
    patch_size: int = 1
    joint_attention_dim: int = 4096  # T5 width
    pooled_projection_dim: int = 768  # CLIP-L pooled width
    guidance_embeds: bool = True  # dev: distilled guidance input; schnell: none
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_hub(cls, config: dict) -> "FluxConfig":
        """Build from a Hub `transformer/config.json`; absent keys (axes_dims_rope, out_channels) take diffusers'
        defaults."""
        values = {k: v for k, v in config.items() if k in {f.name for f in fields(cls)}}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        cfg = cls(**values)
        if cfg.patch_size != 1 or sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise MiniditError(f"FLUX config with patch_size={cfg.patch_size} and axes_dims_rope={cfg.axes_dims_rope} "
                               f"(must sum to attention_head_dim={cfg.attention_head_dim}) is not supported")
        return cfg


PRESETS = {"FLUX.1-dev": FluxConfig(), "FLUX.1-schnell": FluxConfig(guidance_embeds=False)}


# ---- conditioning --------------------------------------------------------------------------------------

class TimeTextEmbedding(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.guidance_embeds = cfg.guidance_embeds
        self.timestep_embedder = MLPEmbedding(FREQ_DIM, cfg.hidden_size)
        if cfg.guidance_embeds:
            self.guidance_embedder = MLPEmbedding(FREQ_DIM, cfg.hidden_size)
        self.text_embedder = MLPEmbedding(cfg.pooled_projection_dim, cfg.hidden_size)

    def forward(self, t: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        sinusoid = lambda v: timestep_embedding(v, FREQ_DIM).to(pooled.dtype)  # [cos | sin], shift 0
        emb = self.timestep_embedder(sinusoid(t))
        if self.guidance_embeds:
            if guidance is None:
                raise MiniditError("FLUX.1-dev takes a guidance value (the distilled guidance scale)")
            emb = emb + self.guidance_embedder(sinusoid(guidance))
        return emb + self.text_embedder(pooled)  # (B, D)


class AdaLNZero(nn.Module):
    """`n` modulation vectors from emb (6 in the double blocks, 3 in the single blocks), and their norm."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(self.n, dim=1)


class AdaLNContinuous(nn.Module):
    """The final layer's modulation. NOTE(official): diffusers stores it as (scale, shift); BFL as (shift, scale)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


class RMSNorm(nn.Module):
    """Per-head RMS norm of q and k, computed in float32; the product with the weight in the weight's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return x.to(self.weight.dtype) * self.weight


# ---- blocks --------------------------------------------------------------------------------------------

class DoubleStreamAttention(nn.Module):
    def __init__(self, cfg: FluxConfig, layer: str):
        super().__init__()
        dim, head_dim = cfg.hidden_size, cfg.attention_head_dim
        self.layer, self.num_heads = layer, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)  # the text stream's
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint key: to_out.0
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        heads = lambda t: split_heads(t, self.num_heads)
        q = torch.cat([self.norm_added_q(heads(self.add_q_proj(c))), self.norm_q(heads(self.to_q(x)))], dim=2)
        k = torch.cat([self.norm_added_k(heads(self.add_k_proj(c))), self.norm_k(heads(self.to_k(x)))], dim=2)
        v = torch.cat([heads(self.add_v_proj(c)), heads(self.to_v(x))], dim=2)  # (B, Nh, Lt + L, Dh)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        streams = (("txt", c.shape[1]), ("img", x.shape[1]))
        out = attention(q, k, v, layer=self.layer, streams=streams)  # (B, Lt + L, D)
        out_c, out_x = out.split([c.shape[1], x.shape[1]], dim=1)
        a_x = attention_output(self.to_out[0](out_x), layer=self.layer, streams="img")
        a_c = attention_output(self.to_add_out(out_c), layer=self.layer, streams="txt")
        return a_x, a_c


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig, index: int):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1, self.norm1_context = AdaLNZero(dim, 6), AdaLNZero(dim, 6)
        self.attn = DoubleStreamAttention(cfg, f"transformer_blocks.{index}.attn")
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.ff_context = FeedForward(dim)

    def forward(self, x, c, emb, rope) -> tuple[torch.Tensor, torch.Tensor]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(emb)  # (B, D) each
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)
        a_x, a_c = self.attn(modulate(self.norm1.norm(x), shift_msa, scale_msa),
                             modulate(self.norm1_context.norm(c), c_shift_msa, c_scale_msa), rope)
        x = x + gate_msa[:, None] * a_x
        f_x = self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + gate_mlp[:, None] * feed_forward_output(f_x, layer=self.attn.layer, streams="img")
        c = c + c_gate_msa[:, None] * a_c
        f_c = self.ff_context(modulate(self.norm2_context(c), c_shift_mlp, c_scale_mlp))
        c = c + c_gate_mlp[:, None] * feed_forward_output(f_c, layer=self.attn.layer, streams="txt")
        if c.dtype == torch.float16:  # NOTE(official): the text stream is clipped to the fp16 range
            c = c.clip(-65504, 65504)
        return x, c


class SingleStreamAttention(nn.Module):
    """q, k, v only: the output projection is fused with the MLP's in the block's proj_out."""

    def __init__(self, cfg: FluxConfig, layer: str):
        super().__init__()
        dim, head_dim = cfg.hidden_size, cfg.attention_head_dim
        self.layer, self.num_heads = layer, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, h: torch.Tensor, rope, streams) -> torch.Tensor:
        q = apply_rope(self.norm_q(split_heads(self.to_q(h), self.num_heads)), *rope)
        k = apply_rope(self.norm_k(split_heads(self.to_k(h), self.num_heads)), *rope)
        v = split_heads(self.to_v(h), self.num_heads)
        out = attention(q, k, v, layer=self.layer, streams=streams)  # (B, Lt + L, D)
        return attention_output(out, layer=self.layer, streams=streams)  # A before the fused projection


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig, index: int):
        super().__init__()
        dim = cfg.hidden_size
        self.norm = AdaLNZero(dim, 3)
        self.attn = SingleStreamAttention(cfg, f"single_transformer_blocks.{index}.attn")
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(5 * dim, dim)  # input: [attention (D), GELU(MLP) (4D)]

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope, streams) -> torch.Tensor:
        """h (B, Lt + L, D), text first -> the block's update of h (its caller adds it): F, at f_point "block"."""
        shift, scale, gate = self.norm(emb)
        h_in = modulate(self.norm.norm(h), shift, scale)
        a = self.attn(h_in, rope, streams=streams)
        mlp = F.gelu(self.proj_mlp(h_in), approximate="tanh")
        update = gate[:, None] * self.proj_out(torch.cat([a, mlp], dim=2))
        return feed_forward_output(update, layer=self.attn.layer, streams=streams)


class FluxTransformer(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.time_text_embed = TimeTextEmbedding(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(cfg, i) for i in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(cfg, i) for i in range(cfg.num_single_layers)])
        self.norm_out = AdaLNContinuous(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * (cfg.out_channels or cfg.in_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, 64) packed latents, t (B,) sigma in [0, 1], text (B, Lt, 4096), pooled (B, 768),
        img_ids (L, 3), txt_ids (Lt, 3), guidance (B,) the distilled guidance scale (dev) -> velocity (B, L, 64)."""
        x = self.x_embedder(x)  # (B, L, D)
        t = t.to(x.dtype) * TIME_SCALE
        guidance = None if guidance is None else guidance.to(x.dtype) * TIME_SCALE
        emb = self.time_text_embed(t, guidance, pooled)  # (B, D)
        c = self.context_embedder(text)  # (B, Lt, D)
        rope = rope_frequencies(torch.cat([txt_ids, img_ids]), self.config.axes_dims_rope, ROPE_THETA)
        for block in self.transformer_blocks:
            x, c = block(x, c, emb, rope)
        lt = c.shape[1]
        streams = (("txt", lt), ("img", x.shape[1]))
        h = torch.cat([c, x], dim=1)  # (B, Lt + L, D): the single-stream blocks see one sequence, text first
        for block in self.single_transformer_blocks:
            h = h + block(h, emb, rope, streams)
            if h.dtype == torch.float16:  # NOTE(official): clipped to the fp16 range
                h = h.clip(-65504, 65504)
        x = h[:, lt:]
        return self.proj_out(self.norm_out(x, emb))

    def attention_layers(self) -> list[AttentionLayer]:
        """The 19 double-stream blocks, then the 38 single-stream blocks."""
        double = [AttentionLayer(b.attn.layer, "joint", streams=("img", "txt"),
                                 ffn=in_block(b.attn.layer, "ff", "ff_context")) for b in self.transformer_blocks]
        single = [AttentionLayer(b.attn.layer, "joint", streams=("img", "txt"), a_point="pre_proj", f_point="block",
                                 ffn=(f"single_transformer_blocks.{i}",))  # F is the block's output: the block
                  for i, b in enumerate(self.single_transformer_blocks)]
        return double + single


# ---- checkpoints -------------------------------------------------------------------------------------

# The BFL single file -> the Hub (diffusers) layout (a table for `weights.rename`). "{i}" is a double-stream block,
# "{j}" a single-stream one. RMSNorm scales are `.scale` there, `.weight` here.
ORIGINAL_TO_HUB = {
    **weight_and_bias({
        "img_in": "x_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "txt_in": "context_embedder",
        "double_blocks.{i}.img_mod.lin": "transformer_blocks.{i}.norm1.linear",
        "double_blocks.{i}.txt_mod.lin": "transformer_blocks.{i}.norm1_context.linear",
        "double_blocks.{i}.img_attn.qkv": split("transformer_blocks.{i}.attn.to_{}", "q", "k", "v"),
        "double_blocks.{i}.txt_attn.qkv": split("transformer_blocks.{i}.attn.add_{}_proj", "q", "k", "v"),
        "double_blocks.{i}.img_attn.proj": "transformer_blocks.{i}.attn.to_out.0",
        "double_blocks.{i}.txt_attn.proj": "transformer_blocks.{i}.attn.to_add_out",
        "double_blocks.{i}.img_mlp.0": "transformer_blocks.{i}.ff.net.0.proj",
        "double_blocks.{i}.img_mlp.2": "transformer_blocks.{i}.ff.net.2",
        "double_blocks.{i}.txt_mlp.0": "transformer_blocks.{i}.ff_context.net.0.proj",
        "double_blocks.{i}.txt_mlp.2": "transformer_blocks.{i}.ff_context.net.2",
        "single_blocks.{j}.modulation.lin": "single_transformer_blocks.{j}.norm.linear",
        "single_blocks.{j}.linear1":  # [q, k, v, MLP input] = [D, D, D, 4D]
            split("single_transformer_blocks.{j}.{}", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp",
                  sizes=(1, 1, 1, 4)),
        "single_blocks.{j}.linear2": "single_transformer_blocks.{j}.proj_out",
        "final_layer.adaLN_modulation.1": swap_halves("norm_out.linear"),  # (shift, scale) -> (scale, shift)
        "final_layer.linear": "proj_out",
    }),
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.img_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_k.weight",
    "double_blocks.{i}.txt_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_added_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "single_blocks.{j}.norm.query_norm.scale": "single_transformer_blocks.{j}.attn.norm_q.weight",
    "single_blocks.{j}.norm.key_norm.scale": "single_transformer_blocks.{j}.attn.norm_k.weight",
}
ORIGINAL_GUIDANCE = weight_and_bias({  # FLUX.1-dev's (guidance_embeds)
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
})
COMFY_PREFIX = "model.diffusion_model."  # ComfyUI-style repacks of the BFL file


def original_to_hub(sd: dict[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """A BFL state dict in the Hub layout (every key checked: none missing, none unknown)."""
    sd = {k.removeprefix(COMFY_PREFIX): v for k, v in sd.items()}
    table = ORIGINAL_TO_HUB | (ORIGINAL_GUIDANCE if cfg.guidance_embeds else {})
    blocks = {"i": range(cfg.num_layers), "j": range(cfg.num_single_layers)}
    return weights.rename(sd, table, blocks=blocks, source="the FLUX single file")


def load_flux(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              config: FluxConfig | None = None) -> FluxTransformer:
    """Load FLUX from a Hub-layout `transformer/` folder (shards + index), or from a BFL single file
    (`flux1-dev.safetensors`; dev or schnell told apart by its guidance_in tensors unless `config` is given)."""
    path = Path(path)
    if path.is_file():
        sd = weights.load_file(path, dtype)
        has_guidance = any(k.removeprefix(COMFY_PREFIX).startswith("guidance_in.") for k in sd)
        cfg = config or PRESETS["FLUX.1-dev" if has_guidance else "FLUX.1-schnell"]
        sd = original_to_hub(sd, cfg)
    else:
        cfg = FluxConfig.from_hub(weights.read_json(path / "config.json"))
        sd = weights.load_folder(path, dtype)
    with torch.device("meta"):
        model = FluxTransformer(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(path))
    return model.eval()
