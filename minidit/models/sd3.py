"""Stable Diffusion 3 medium: the MMDiT, joint attention over image and text tokens (Esser et al., 2024).

Paper: https://arxiv.org/abs/2403.03206. Reference code: Stability-AI/sd3-ref `mmditx.py`.
Checkpoints: `stabilityai/stable-diffusion-3-medium-diffusers` (gated), whose `transformer/` folder is in the
diffusers layout (this module's attribute names), and the single file `sd3_medium.safetensors` of
`stabilityai/stable-diffusion-3-medium` (keys under `model.diffusion_model.`), loaded through
`ORIGINAL_TO_HUB` below.

Each of the 24 blocks keeps two streams, image tokens x and text tokens c, each with its own adaLN-Zero
modulation, projections and FFN, and joins them in one attention: q, k, v = [x; c] (image first). The
last block is "context pre-only": its text stream only feeds that attention (no text output projection,
no text FFN), and its text modulation has two vectors (scale, shift) instead of six.

Conditioning: emb = MLP(sinusoid(t)) + MLP(pooled CLIP vector), t = 1000 * sigma; the text tokens are the
T5 and CLIP states projected from 4096 to the model width. Positions: a stored 192 x 192 sin-cos table,
centre-cropped to the latent's patch grid.

Shapes: x (B, 16, H*p, W*p) latents -> L = H*W image tokens of width D = Nh*Dh (1536); text (B, Lt, 4096)
-> (B, Lt, D); pooled (B, 2048).
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
from minidit.layers import FeedForward, MLPEmbedding, modulate, split_heads, timestep_embedding, unpatchify
from minidit.weights import split, swap_halves, weight_and_bias

FREQ_DIM = 256  # width of the timestep sinusoid
NORM_EPS = 1e-6


@dataclass(frozen=True)
class SD3Config:
    num_layers: int = 24
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    sample_size: int = 128  # latent side of the default 1024x1024 image
    joint_attention_dim: int = 4096  # width of the text tokens (T5, and CLIP zero-padded to it)
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048  # CLIP-L pooled (768) + bigG pooled (1280)
    pos_embed_max_size: int = 192

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_hub(cls, config: dict) -> "SD3Config":
        """Build from a Hub `transformer/config.json`, applying diffusers' defaults for absent keys."""
        for key in ("dual_attention_layers", "qk_norm"):
            if config.get(key):
                raise MiniditError(f"SD3 config sets {key}={config[key]!r}: that is an SD3.5 model; minidit "
                                   f"implements SD3-medium's MMDiT")
        return cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})


PRESETS = {"stable-diffusion-3-medium": SD3Config()}


# ---- conditioning --------------------------------------------------------------------------------------

class TimeTextEmbedding(nn.Module):
    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.timestep_embedder = MLPEmbedding(FREQ_DIM, cfg.hidden_size)
        self.text_embedder = MLPEmbedding(cfg.pooled_projection_dim, cfg.hidden_size)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, FREQ_DIM).to(pooled.dtype)  # [cos | sin], shift 0
        return self.timestep_embedder(t_freq) + self.text_embedder(pooled)  # (B, D)


class AdaLNZero(nn.Module):
    """Six modulation vectors (shift, scale, gate for attention; shift, scale, gate for the FFN)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(6, dim=1)


class AdaLNContinuous(nn.Module):
    """Two modulation vectors. NOTE(official): in the order (scale, shift), unlike the six above."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


# ---- the joint block -----------------------------------------------------------------------------------

class JointAttention(nn.Module):
    """One attention over [image; text] tokens, each stream with its own q, k, v and output projections."""

    def __init__(self, dim: int, num_heads: int, layer: str, context_pre_only: bool):
        super().__init__()
        self.layer, self.num_heads = layer, num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)  # the text stream's
        self.add_v_proj = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint key: to_out.0
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        heads = lambda t: split_heads(t, self.num_heads)
        q = torch.cat([heads(self.to_q(x)), heads(self.add_q_proj(c))], dim=2)  # (B, Nh, L + Lt, Dh)
        k = torch.cat([heads(self.to_k(x)), heads(self.add_k_proj(c))], dim=2)
        v = torch.cat([heads(self.to_v(x)), heads(self.add_v_proj(c))], dim=2)
        streams = (("img", x.shape[1]), ("txt", c.shape[1]))
        out = attention(q, k, v, layer=self.layer, streams=streams)  # (B, L + Lt, D)
        out_x, out_c = out.split([x.shape[1], c.shape[1]], dim=1)
        a_x = attention_output(self.to_out[0](out_x), layer=self.layer, streams="img")
        if self.to_add_out is None:  # the last block: the text result is not used
            return a_x, None
        return a_x, attention_output(self.to_add_out(out_c), layer=self.layer, streams="txt")


class JointBlock(nn.Module):
    def __init__(self, cfg: SD3Config, index: int):
        super().__init__()
        dim = cfg.hidden_size
        self.context_pre_only = index == cfg.num_layers - 1
        self.norm1 = AdaLNZero(dim)
        self.norm1_context = AdaLNContinuous(dim) if self.context_pre_only else AdaLNZero(dim)
        self.attn = JointAttention(dim, cfg.num_attention_heads, f"transformer_blocks.{index}.attn",
                                   self.context_pre_only)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.ff = FeedForward(dim)
        if not self.context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
            self.ff_context = FeedForward(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(emb)  # (B, D) each
        if self.context_pre_only:
            c_in = self.norm1_context(c, emb)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)
            c_in = modulate(self.norm1_context.norm(c), c_shift_msa, c_scale_msa)
        a_x, a_c = self.attn(modulate(self.norm1.norm(x), shift_msa, scale_msa), c_in)

        x = x + gate_msa[:, None] * a_x
        f_x = self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + gate_mlp[:, None] * feed_forward_output(f_x, layer=self.attn.layer, streams="img")
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None] * a_c
        f_c = self.ff_context(modulate(self.norm2_context(c), c_shift_mlp, c_scale_mlp))
        c = c + c_gate_mlp[:, None] * feed_forward_output(f_c, layer=self.attn.layer, streams="txt")
        return x, c


class PatchEmbed(nn.Module):
    """Patches -> tokens, plus the stored sin-cos table centre-cropped to the patch grid."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", torch.empty(1, cfg.pos_embed_max_size**2, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if max(h, w) > self.max_size:
            raise MiniditError(f"a {h}x{w} patch grid exceeds SD3's {self.max_size}x{self.max_size} position table")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = rearrange(self.pos_embed, "1 (H W) D -> H W D", H=self.max_size)
        pos = rearrange(table[top:top + h, left:left + w], "H W D -> (H W) D")
        tokens = rearrange(self.proj(x), "B D H W -> B (H W) D").contiguous()  # token-major, as later ops read it
        return tokens + pos.to(x.dtype)


class SD3Transformer(nn.Module):
    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbedding(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([JointBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = AdaLNContinuous(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """x (B, 16, H*p, W*p), t (B,) timesteps 1000 * sigma (float), text (B, Lt, 4096), pooled (B, 2048)
        -> the flow velocity (B, 16, H*p, W*p)."""
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.pos_embed(x)  # (B, L, D)
        emb = self.time_text_embed(t, pooled)  # (B, D)
        c = self.context_embedder(text)  # (B, Lt, D)
        for block in self.transformer_blocks:
            x, c = block(x, c, emb)
        x = self.proj_out(self.norm_out(x, emb))  # (B, L, p*p*C_out)
        return unpatchify(x, h, w, p)

    def attention_layers(self) -> list[AttentionLayer]:
        return [AttentionLayer(b.attn.layer, "joint", streams=("img", "txt"),
                               ffn=in_block(b.attn.layer, "ff", *([] if b.context_pre_only else ["ff_context"])))
                for b in self.transformer_blocks]


# ---- checkpoints -------------------------------------------------------------------------------------

SINGLE_FILE_PREFIX = "model.diffusion_model."
# The single file's MMDiT (after the prefix) -> the Hub (diffusers) layout (a table for `weights.rename`). "{i}" is
# any block, "{j}" any but the last: the last block has no text output projection or text FFN, and its text
# modulation is stored (shift, scale) where diffusers keeps (scale, shift), as is the final layer's.
ORIGINAL_TO_HUB = {
    **weight_and_bias({
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "joint_blocks.{i}.x_block.adaLN_modulation.1": "transformer_blocks.{i}.norm1.linear",
        "joint_blocks.{j}.context_block.adaLN_modulation.1": "transformer_blocks.{j}.norm1_context.linear",
        "joint_blocks.{last}.context_block.adaLN_modulation.1":
            swap_halves("transformer_blocks.{last}.norm1_context.linear"),
        "joint_blocks.{i}.x_block.attn.qkv": split("transformer_blocks.{i}.attn.to_{}", "q", "k", "v"),
        "joint_blocks.{i}.context_block.attn.qkv": split("transformer_blocks.{i}.attn.add_{}_proj", "q", "k", "v"),
        "joint_blocks.{i}.x_block.attn.proj": "transformer_blocks.{i}.attn.to_out.0",
        "joint_blocks.{j}.context_block.attn.proj": "transformer_blocks.{j}.attn.to_add_out",
        "joint_blocks.{i}.x_block.mlp.fc1": "transformer_blocks.{i}.ff.net.0.proj",
        "joint_blocks.{i}.x_block.mlp.fc2": "transformer_blocks.{i}.ff.net.2",
        "joint_blocks.{j}.context_block.mlp.fc1": "transformer_blocks.{j}.ff_context.net.0.proj",
        "joint_blocks.{j}.context_block.mlp.fc2": "transformer_blocks.{j}.ff_context.net.2",
        "final_layer.adaLN_modulation.1": swap_halves("norm_out.linear"),
        "final_layer.linear": "proj_out",
    }),
    "pos_embed": "pos_embed.pos_embed",
}


def original_to_hub(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The single file's MMDiT tensors (prefix stripped) in the Hub layout (every key checked)."""
    blocks = {"i": range(num_layers), "j": range(num_layers - 1), "last": [num_layers - 1]}
    return weights.rename(sd, ORIGINAL_TO_HUB, blocks=blocks, source="the SD3 single file")


def load_sd3(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             config: SD3Config | None = None) -> SD3Transformer:
    """Load the MMDiT from a Hub-layout `transformer/` folder, or from the single file `sd3_medium*.safetensors`
    (its `model.diffusion_model.` tensors; the VAE and text encoders it may hold are ignored here)."""
    path = Path(path)
    if path.is_file():
        cfg = config or PRESETS["stable-diffusion-3-medium"]
        sd = weights.load_file(path, dtype)
        mmdit = {k[len(SINGLE_FILE_PREFIX):]: v for k, v in sd.items() if k.startswith(SINGLE_FILE_PREFIX)}
        if not mmdit:
            raise MiniditError(f"{path} holds no '{SINGLE_FILE_PREFIX}*' tensors: it is not an SD3 single file")
        sd = original_to_hub(mmdit, cfg.num_layers)
    else:
        cfg = SD3Config.from_hub(weights.read_json(path / "config.json"))
        sd = weights.load_folder(path, dtype)
    with torch.device("meta"):
        model = SD3Transformer(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(path))
    return model.eval()
