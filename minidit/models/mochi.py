"""Mochi 1 preview: a text-to-video diffusion transformer with two streams of different widths in one attention.

No paper: the model card https://huggingface.co/genmo/mochi-1-preview, and the official code genmoai/mochi
(`src/genmo/mochi_preview/dit/joint_model/asymm_models_joint.py`, "AsymmDiTJoint"). Checkpoint: `genmo/mochi-1-preview`,
`transformer/` in the diffusers layout (fp32 in five shards plus the index, or the bf16 variant: three shards
`diffusion_pytorch_model.bf16-0000k-of-00003.safetensors` and `diffusion_pytorch_model.safetensors.index.bf16.json`),
which is this module's attribute names: 1071 tensors, 10,027,677,744 parameters, 48 blocks of 24 heads x 128. Also
genmo's single file `dit.safetensors` at the repository's root (fp32, 879 tensors: the names of genmo's AsymmDiTJoint),
through the rename table GENMO_TO_HUB: fused qkv split in three, the SwiGLU halves and the final (shift, scale)
swapped (checkpoints.md §8.5, diffusers' convert_mochi_to_diffusers.py).

The model sees 2x2 patches of every latent frame (no temporal patching) and T5 tokens:
- patch_embed: a 2x2 stride-2 convolution per latent frame, tokens frame-major (T, H/2, W/2);
- conditioning: emb = MLP(sinusoid(t)) + an attention pooling of the T5 tokens (one query, the masked mean of the
  tokens, over the pooled token and the tokens, 8 heads); the text stream is caption_proj(T5), narrower (1536) than
  the visual stream (3072);
- each block ("asymmetric" joint block): per stream, a scale-only modulation (no shift) of an RMSNorm in front of
  the attention and the SwiGLU FFN, and a tanh-gated RMSNorm of their outputs on the residual ("sandwich" norms):
      x = x + RMSNorm(attn(RMSNorm(x) (1 + scale_msa))) tanh(gate_msa)
  one attention over [visual; text] (visual first) with separate projections per stream, per-stream RMS QK-norm,
  and a learned RoPE on the visual tokens; padded text tokens are removed from the keys, and their outputs are 0
  (NOTE(official): diffusers packs the valid text tokens' outputs to the front of the text stream, which equals this
  for T5's right padding, the only mask the pipeline makes; with holes in the mask it misplaces them, genmo does not);
- the last block does not update the text (context_pre_only): its text stream only feeds the attention's K and V;
- output: norm_out (LayerNorm, scale then shift), proj_out to 2x2x12 values per token.
RoPE: each head has its own learned frequencies per axis (`pos_frequencies`, (3, Nh, Dh/2)); a visual token's angle
for channel pair f of head n is sum over axes a of pos_a * freq[a, n, f], with positions t = frame index and (h, w)
the cell centres of a grid rescaled to the area of 192 x 192 cells and centred on 0.

Capture points (one joint layer per block, `transformer_blocks.{i}.attn1`): K and V over [visual; text] after the
projection, head split, RMS QK-norm and (visual) RoPE, all Lt text tokens included (padded ones are masked out of the
attention, not out of the record); A after each stream's output projection (to_out.0, to_add_out; a padded text
token's A is to_add_out's bias); the last block has no text A.

Shapes: x (B, C, T, H, W) latents, as diffusers' pipeline keeps them; L = T (H/2)(W/2) visual tokens of width
D = Nh * Dh; text (B, Lt, 4096), Lt = 256, text mask (B, Lt) 1 = token, 0 = padding; emb (B, D).
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
from minidit.layers import MLPEmbedding, modulate, split_heads, timestep_embedding
from minidit.rope import apply_rope
from minidit.weights import split, swap_halves, weight_and_bias

NORM_EPS = 1e-6  # the blocks' RMSNorms and the final LayerNorm
QK_NORM_EPS = 1e-5  # the per-head RMSNorm of q and k
POOL_HEADS = 8  # the attention pooling of the T5 tokens
ROPE_BASE_AREA = 192 * 192  # RoPE positions are rescaled so that the patch grid covers this many cells


@dataclass(frozen=True)
class MochiConfig:
    # Defaults are those of diffusers' MochiTransformer3DModel, applied to keys a config.json lacks.
    patch_size: int = 2
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 48
    pooled_projection_dim: int = 1536  # the text stream's width
    in_channels: int = 12
    out_channels: int | None = None  # None: in_channels
    text_embed_dim: int = 4096
    time_embed_dim: int = 256
    max_sequence_length: int = 256  # the T5 length the pipeline pads to; the model takes any

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_hub(cls, config: dict) -> "MochiConfig":
        """Build from a Hub `transformer/config.json`; absent keys take diffusers' defaults."""
        for key, supported in {"qk_norm": "rms_norm", "activation_fn": "swiglu"}.items():
            if config.get(key, supported) != supported:
                raise MiniditError(f"Mochi config with {key}={config[key]!r} is not supported by minidit (it "
                                   f"implements Mochi 1 preview, where {key} is {supported!r})")
        return cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})


PRESETS = {"mochi-1-preview": MochiConfig()}


# ---- positions ---------------------------------------------------------------------------------------------

def rope_positions(frames: int, h: int, w: int, device=None) -> torch.Tensor:
    """(T*h*w, 3) float32 positions (t, row, column) of the visual tokens in (T, h, w) order: t the frame index,
    row and column the centres of h x w cells spanning a box of area ROPE_BASE_AREA centred on 0."""
    scale = (ROPE_BASE_AREA / (h * w)) ** 0.5

    def centres(n: int) -> torch.Tensor:
        edges = torch.linspace(-n * scale / 2, n * scale / 2, n + 1, dtype=torch.float32, device=device)
        return (edges[:-1] + edges[1:]) / 2

    t = torch.arange(frames, dtype=torch.float32, device=device)
    grid = torch.meshgrid(t, centres(h), centres(w), indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def rope_learned(frequencies: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (Nh, L, Dh) float32, from the learned `frequencies` (3, Nh, Dh/2) and `positions` (L, 3):
    pair f of head n turns by sum_a positions[:, a] * frequencies[a, n, f]; each angle repeated for its pair."""
    angle = torch.einsum("la,anf->lnf", positions.float(), frequencies.float())  # (L, Nh, Dh/2)
    angle = rearrange(angle, "L Nh F -> Nh L F").repeat_interleave(2, dim=-1)
    return angle.cos(), angle.sin()


# ---- norms and embedders -------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """x / RMS(x) over the channels, in float32 (no learned weight)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The input norm: RMSNorm(x) (1 + scale), scale (B, D) per sample; computed in float32."""
    return (rms_norm(x) * (1 + scale[:, None].float())).to(x.dtype)


def gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The output norm on the residual: RMSNorm(x) tanh(gate), gate (B, D) per sample; computed in float32."""
    return (rms_norm(x) * torch.tanh(gate)[:, None]).to(x.dtype)


class RMSNorm(nn.Module):
    """The per-head RMSNorm of q and k, with a learned weight (diffusers' MochiRMSNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_norm(x, QK_NORM_EPS) * self.weight).to(x.dtype)


class ModulationZero(nn.Module):
    """One linear from emb to four vectors of the stream's width: scale_msa, gate_msa, scale_mlp, gate_mlp."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 4 * dim)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(4, dim=1)


class ModulationScale(nn.Module):
    """The last block's text modulation: one scale, nothing else (its text output is not used)."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cond_dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_1(F.silu(emb))


class AdaLayerNorm(nn.Module):
    """The final modulation: LayerNorm, then scale and shift from emb (scale first in the checkpoint)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


class AttentionPool(nn.Module):
    """T5 tokens -> one vector: a single query, made from the masked mean of the tokens, attends over
    [mean; tokens] (padding masked out) with POOL_HEADS heads."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.to_kv = nn.Linear(text_dim, 2 * text_dim)
        self.to_q = nn.Linear(text_dim, text_dim)
        self.to_out = nn.Linear(text_dim, dim)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight = mask[:, :, None].to(text.dtype)
        mean = (text * (weight / weight.sum(dim=1, keepdim=True).clamp(min=1))).sum(dim=1, keepdim=True)  # (B, 1, C)
        tokens = torch.cat([mean, text], dim=1)  # (B, 1 + Lt, C)
        k, v = rearrange(self.to_kv(tokens), "B L (two Nh Dh) -> two B Nh L Dh", two=2, Nh=POOL_HEADS)
        q = rearrange(self.to_q(tokens[:, 0]), "B (Nh Dh) -> B Nh 1 Dh", Nh=POOL_HEADS)
        keep = F.pad(mask.bool(), (1, 0), value=True)[:, None, None, :]  # (B, 1, 1, 1 + Lt): the mean always
        return self.to_out(attention(q, k, v, mask=keep)[:, 0])  # (B, D)


class TimeCaptionEmbedding(nn.Module):
    """emb = MLP(sinusoid(t)) + pool(T5); text tokens = caption_proj(T5)."""

    def __init__(self, cfg: MochiConfig):
        super().__init__()
        self.time_embed_dim = cfg.time_embed_dim
        self.timestep_embedder = MLPEmbedding(cfg.time_embed_dim, cfg.hidden_size)
        self.pooler = AttentionPool(cfg.text_embed_dim, cfg.hidden_size)
        self.caption_proj = nn.Linear(cfg.text_embed_dim, cfg.pooled_projection_dim)

    def forward(self, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype):
        t_freq = timestep_embedding(t, self.time_embed_dim, flip_sin_to_cos=True, freq_shift=0)
        emb = self.timestep_embedder(t_freq.to(dtype)) + self.pooler(text, mask)  # (B, D)
        return emb, self.caption_proj(text)  # (B, D), (B, Lt, D_text)


class PatchEmbed(nn.Module):
    """Video latents -> 2x2 patch tokens, a convolution per frame, frame-major."""

    def __init__(self, cfg: MochiConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = self.proj(rearrange(x, "B C T H W -> (B T) C H W"))  # (B T, D, H/2, W/2)
        return rearrange(x, "(B T) D h w -> B (T h w) D", B=B)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # NOTE(official): diffusers' order; genmo's w1 has the halves swapped
        return h * F.silu(gate)


class FeedForward(nn.Module):
    """SwiGLU FFN without biases, inner width 4D * 2/3 (8192 visual, 4096 text)."""

    def __init__(self, dim: int):
        super().__init__()
        inner = 4 * dim * 2 // 3
        # checkpoint keys: net.0.proj, net.2 (index 1 was a dropout layer in training code)
        self.net = nn.ModuleList([SwiGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ---- the block ------------------------------------------------------------------------------------------------

class JointAttention(nn.Module):
    """One attention over [visual; text]: each stream its own projections (text: from width 1536 to the visual
    inner width) and RMS QK-norm, RoPE on the visual tokens only, and its own output projection back to its width."""

    def __init__(self, cfg: MochiConfig, layer: str, context_pre_only: bool):
        super().__init__()
        dim, text_dim, head_dim = cfg.hidden_size, cfg.pooled_projection_dim, cfg.attention_head_dim
        self.layer, self.num_heads = layer, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(text_dim, dim, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint key: to_out.0
        self.to_add_out = None if context_pre_only else nn.Linear(dim, text_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        heads = lambda t: split_heads(t, self.num_heads)  # noqa: E731
        q = torch.cat([apply_rope(self.norm_q(heads(self.to_q(x))), *rope),
                       self.norm_added_q(heads(self.add_q_proj(c)))], dim=2)  # (B, Nh, L + Lt, Dh)
        k = torch.cat([apply_rope(self.norm_k(heads(self.to_k(x))), *rope),
                       self.norm_added_k(heads(self.add_k_proj(c)))], dim=2)
        v = torch.cat([heads(self.to_v(x)), heads(self.add_v_proj(c))], dim=2)
        # padded text tokens are no keys, and their own outputs are 0 (the official code drops them, then scatters
        # the outputs back into zeros)
        keep = torch.cat([mask.new_ones(x.shape[:2]), mask], dim=1)  # (B, L + Lt)
        streams = (("img", x.shape[1]), ("txt", c.shape[1]))
        out = attention(q, k, v, mask=keep[:, None, None, :], layer=self.layer, streams=streams)  # (B, L + Lt, D)
        out = out.masked_fill(~keep[:, :, None], 0.0)
        # NOTE: the projections read slices of `out`; in bf16 a CPU linear on a strided slice rounds differently from
        # one on a contiguous copy, and diffusers projects slices
        out_x, out_c = out.split([x.shape[1], c.shape[1]], dim=1)
        a_x = attention_output(self.to_out[0](out_x), layer=self.layer, streams="img")
        if self.to_add_out is None:  # the last block: the text result is not used
            return a_x, None
        return a_x, attention_output(self.to_add_out(out_c), layer=self.layer, streams="txt")


class MochiBlock(nn.Module):
    def __init__(self, cfg: MochiConfig, index: int):
        super().__init__()
        dim, text_dim = cfg.hidden_size, cfg.pooled_projection_dim
        self.context_pre_only = index == cfg.num_layers - 1
        self.norm1 = ModulationZero(dim, dim)
        self.norm1_context = ModulationScale(dim, text_dim) if self.context_pre_only else ModulationZero(dim, text_dim)
        self.attn1 = JointAttention(cfg, f"transformer_blocks.{index}.attn1", self.context_pre_only)
        self.ff = FeedForward(dim)
        self.ff_context = None if self.context_pre_only else FeedForward(text_dim)

    def forward(self, x, c, emb, mask, rope) -> tuple[torch.Tensor, torch.Tensor]:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.norm1(emb)  # (B, D) each
        if self.context_pre_only:
            c_in = scaled(c, self.norm1_context(emb))
        else:
            c_scale_msa, c_gate_msa, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)  # (B, D_text) each
            c_in = scaled(c, c_scale_msa)
        a_x, a_c = self.attn1(scaled(x, scale_msa), c_in, mask, rope)

        x = x + gated(a_x, gate_msa)
        f_x = feed_forward_output(self.ff(scaled(x, scale_mlp)), layer=self.attn1.layer, streams="img")
        x = x + gated(f_x, gate_mlp)
        if self.context_pre_only:
            return x, c
        c = c + gated(a_c, c_gate_msa)
        f_c = feed_forward_output(self.ff_context(scaled(c, c_scale_mlp)), layer=self.attn1.layer, streams="txt")
        c = c + gated(f_c, c_gate_mlp)
        return x, c


# ---- the model --------------------------------------------------------------------------------------------------

class MochiTransformer(nn.Module):
    def __init__(self, cfg: MochiConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg)
        self.time_embed = TimeCaptionEmbedding(cfg)
        self.pos_frequencies = nn.Parameter(torch.zeros(3, cfg.num_attention_heads, cfg.attention_head_dim // 2))
        self.transformer_blocks = nn.ModuleList([MochiBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = AdaLayerNorm(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) latents, text (B, Lt, 4096) T5 states, timestep (B,) 1000 (1 - sigma) (NOTE(official):
        0 at pure noise), text_mask (B, Lt) 1 = token, 0 = padding -> the flow velocity (B, C_out, T, H, W)."""
        p = self.config.patch_size
        _, _, T, H, W = x.shape
        h, w = H // p, W // p
        mask = text_mask.bool()
        emb, c = self.time_embed(timestep, text, mask, x.dtype)  # (B, D), (B, Lt, D_text)
        x = self.patch_embed(x)  # (B, L, D)
        rope = rope_learned(self.pos_frequencies, rope_positions(T, h, w, x.device))  # (Nh, L, Dh) each
        for block in self.transformer_blocks:
            x, c = block(x, c, emb, mask, rope)
        x = self.proj_out(self.norm_out(x, emb))  # (B, L, p p C_out)
        return rearrange(x, "B (T h w) (p q C) -> B C T (h p) (w q)", T=T, h=h, p=p, q=p)

    def attention_layers(self) -> list[AttentionLayer]:
        """The joint attention of every block, in order (48). The last block's text tokens enter K and V but have no
        output, so that layer records A for the visual tokens only."""
        return [AttentionLayer(b.attn1.layer, "joint", streams=("img", "txt"),
                               ffn=in_block(b.attn1.layer, "ff", *([] if b.context_pre_only else ["ff_context"])))
                for b in self.transformer_blocks]


# ---- checkpoints -------------------------------------------------------------------------------------------------

# genmo's dit.safetensors -> the Hub (diffusers) layout (a table for `weights.rename`). "{b}" is any block, "{i}" a
# block that updates the text (all but the last), "{last}" the last block (its text: a scale, and K/V only).
GENMO_TO_HUB = {
    **weight_and_bias({
        "x_embedder.proj": "patch_embed.proj",
        "t_embedder.mlp.0": "time_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_embed.timestep_embedder.linear_2",
        "t5_y_embedder.to_kv": "time_embed.pooler.to_kv",
        "t5_y_embedder.to_q": "time_embed.pooler.to_q",
        "t5_y_embedder.to_out": "time_embed.pooler.to_out",
        "t5_yproj": "time_embed.caption_proj",
        "blocks.{b}.mod_x": "transformer_blocks.{b}.norm1.linear",
        "blocks.{i}.mod_y": "transformer_blocks.{i}.norm1_context.linear",
        "blocks.{last}.mod_y": "transformer_blocks.{last}.norm1_context.linear_1",
        "blocks.{b}.attn.proj_x": "transformer_blocks.{b}.attn1.to_out.0",
        "blocks.{i}.attn.proj_y": "transformer_blocks.{i}.attn1.to_add_out",
        "final_layer.mod": swap_halves("norm_out.linear"),  # NOTE(official): genmo (shift, scale), here (scale, shift)
        "final_layer.linear": "proj_out",
    }),
    "pos_frequencies": "pos_frequencies",
    "blocks.{b}.attn.qkv_x.weight": split("transformer_blocks.{b}.attn1.to_{}.weight", "q", "k", "v"),
    "blocks.{b}.attn.qkv_y.weight": split("transformer_blocks.{b}.attn1.add_{}_proj.weight", "q", "k", "v"),
    "blocks.{b}.attn.q_norm_x.weight": "transformer_blocks.{b}.attn1.norm_q.weight",
    "blocks.{b}.attn.k_norm_x.weight": "transformer_blocks.{b}.attn1.norm_k.weight",
    "blocks.{b}.attn.q_norm_y.weight": "transformer_blocks.{b}.attn1.norm_added_q.weight",
    "blocks.{b}.attn.k_norm_y.weight": "transformer_blocks.{b}.attn1.norm_added_k.weight",
    # NOTE(official): genmo's w1 holds [the half through SiLU; the other], diffusers' [the other; the half through
    # SiLU], so the halves swap
    "blocks.{b}.mlp_x.w1.weight": swap_halves("transformer_blocks.{b}.ff.net.0.proj.weight"),
    "blocks.{b}.mlp_x.w2.weight": "transformer_blocks.{b}.ff.net.2.weight",
    "blocks.{i}.mlp_y.w1.weight": swap_halves("transformer_blocks.{i}.ff_context.net.0.proj.weight"),
    "blocks.{i}.mlp_y.w2.weight": "transformer_blocks.{i}.ff_context.net.2.weight",
}
COMFY_PREFIX = "model.diffusion_model."  # ComfyUI-style repacks of the genmo file
GENMO_FILE = "dit.safetensors"  # at the root of genmo/mochi-1-preview
VARIANT = "bf16"  # the Hub's half-size copy of transformer/ (what `--model mochi` downloads)


def genmo_blocks(cfg: MochiConfig) -> dict[str, range]:
    """The block indices of GENMO_TO_HUB's "{b}", "{i}" and "{last}"."""
    last = cfg.num_layers - 1
    return {"b": range(cfg.num_layers), "i": range(last), "last": range(last, last + 1)}


def genmo_to_hub(sd: dict[str, torch.Tensor], cfg: MochiConfig) -> dict[str, torch.Tensor]:
    """A genmo state dict in the Hub layout (every key checked: none missing, none unknown)."""
    sd = {k.removeprefix(COMFY_PREFIX): v for k, v in sd.items()}
    return weights.rename(sd, GENMO_TO_HUB, blocks=genmo_blocks(cfg), source="the genmo Mochi file")


def hub_variant(folder: Path) -> str | None:
    """Which files of a Hub-layout `transformer/` folder to read: the full-precision ones (None) where present, else
    the bf16 variant; a MiniditError when it has neither."""
    if weights.has_weights(folder):
        return None
    if weights.has_weights(folder, VARIANT):
        return VARIANT
    raise MiniditError(f"{folder} holds no Mochi transformer weights: expected the fp32 shards "
                       f"(diffusion_pytorch_model-0000k-of-00005.safetensors and their index) or the bf16 variant "
                       f"(diffusion_pytorch_model.bf16-0000k-of-00003.safetensors and "
                       f"diffusion_pytorch_model.safetensors.index.bf16.json)")


def load_mochi(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               config: MochiConfig | None = None) -> MochiTransformer:
    """Load from a Hub-layout `transformer/` folder (the fp32 shards plus the index, else the bf16 variant; cast to
    `dtype` as they are read), or from genmo's single file `dit.safetensors` (which has no config.json: `config`,
    else the official one)."""
    path = Path(path)
    if path.is_file():
        cfg = config or PRESETS["mochi-1-preview"]
        sd = genmo_to_hub(weights.load_file(path, dtype), cfg)
    else:
        cfg = MochiConfig.from_hub(weights.read_json(path / "config.json"))
        sd = weights.load_folder(path, dtype, variant=hub_variant(path))
    with torch.device("meta"):
        model = MochiTransformer(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(path))
    return model.eval()
