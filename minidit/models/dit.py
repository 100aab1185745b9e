"""DiT: class-conditional Diffusion Transformer with adaLN-Zero (Peebles & Xie, 2023).

Paper: https://arxiv.org/abs/2212.09748. Official code: facebookresearch/DiT `models.py`.
Checkpoints: `facebook/DiT-XL-2-256` and `facebook/DiT-XL-2-512` on the Hub (diffusers layout, the layout
of this module's attribute names), and the original `DiT-XL-2-{256x256,512x512}.pt` state dicts, loaded
through `ORIGINAL_TO_HUB` below. minidit's own `weights/dit-tiny` uses the Hub layout too.

Quirks of the diffusers layout, kept so that the Hub weights load with no remapping:
- every block carries its own copy of the timestep and class embedders (`norm1.emb`); the final layer
  reads block 0's. In the Hub and original checkpoints all copies are identical.
- the FFN's LayerNorm uses `norm_eps` (1e-5 when absent from config.json), the attention's 1e-6.

Shapes: x (B, C, H*p, W*p) latents -> L = H*W tokens of width D = Nh*Dh -> (B, C_out, H*p, W*p).
"""

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minidit import weights
from minidit.attention import AttentionLayer, attention, attention_output, feed_forward_output, in_block
from minidit.errors import MiniditError
from minidit.layers import FeedForward, MLPEmbedding, modulate, sincos_2d, split_heads, timestep_embedding, unpatchify
from minidit.weights import DROP, shared, split, weight_and_bias

FREQ_DIM = 256  # width of the timestep sinusoid fed to the timestep MLP


@dataclass(frozen=True)
class DiTConfig:
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8  # 2 * in_channels: epsilon, then the learned variance interpolation
    patch_size: int = 2
    sample_size: int = 32  # latent side the sin-cos table is based on
    num_embeds_ada_norm: int = 1000  # number of classes; label `num_embeds_ada_norm` is the null class
    norm_eps: float = 1e-5  # the FFN LayerNorm's eps (diffusers default); the original DiT used 1e-6
    # NOTE(official): diffusers' DiT timestep sinusoid divides by (128 - 1); the original divides by 128.
    freq_shift: float = 1.0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def learned_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @classmethod
    def from_hub(cls, config: dict) -> "DiTConfig":
        """Build from a Hub `transformer/config.json`, applying diffusers' defaults for absent keys."""
        expected = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                    "norm_elementwise_affine": False}
        for key, value in expected.items():
            if config.get(key, value) != value:
                raise MiniditError(f"DiT config has {key}={config[key]!r}; minidit's DiT supports only {value!r}")
        known = {f.name for f in fields(cls)} - {"freq_shift"}
        values = {k: v for k, v in config.items() if k in known}
        if values.get("out_channels") is None:
            values["out_channels"] = config.get("in_channels", cls.in_channels)
        return cls(**values)


PRESETS = {
    "DiT-XL/2-256": DiTConfig(sample_size=32),
    "DiT-XL/2-512": DiTConfig(sample_size=64),
}


class LabelEmbedding(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # + the null class used for guidance

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Conditioning(nn.Module):
    """c = MLP(sinusoid(t)) + embed(y), shape (B, D)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.freq_shift = cfg.freq_shift
        self.timestep_embedder = MLPEmbedding(FREQ_DIM, cfg.hidden_size)
        self.class_embedder = LabelEmbedding(cfg.num_embeds_ada_norm, cfg.hidden_size)

    def forward(self, t: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_freq = timestep_embedding(t, FREQ_DIM, flip_sin_to_cos=True, freq_shift=self.freq_shift)
        return self.timestep_embedder(t_freq.to(dtype)) + self.class_embedder(y)


class AdaLNZero(nn.Module):
    """Six modulation vectors from the conditioning, plus the affine-free LayerNorm they modulate."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.emb = Conditioning(cfg)
        self.linear = nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, layer: str):
        super().__init__()
        dim = cfg.hidden_size
        self.layer, self.num_heads = layer, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint key: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = lambda t: split_heads(t, self.num_heads)  # noqa: E731
        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))  # (B, Nh, L, Dh)
        out = attention(q, k, v, layer=self.layer)  # (B, L, D)
        return attention_output(self.to_out[0](out), layer=self.layer)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, index: int):
        super().__init__()
        self.norm1 = AdaLNZero(cfg)
        self.attn1 = SelfAttention(cfg, layer=f"transformer_blocks.{index}.attn1")
        self.norm3 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=cfg.norm_eps)
        self.ff = FeedForward(cfg.hidden_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.norm1.emb(t, y, x.dtype)  # (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(F.silu(c)).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn1(modulate(self.norm1.norm(x), shift_msa, scale_msa))
        f = feed_forward_output(self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp)), layer=self.attn1.layer)
        x = x + gate_mlp[:, None] * f
        return x


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.patch_size, self.base_size = cfg.patch_size, cfg.sample_size // cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = rearrange(self.proj(x), "B D H W -> B (H W) D").contiguous()  # token-major, as every later op reads it
        pos = sincos_2d(x.shape[-1], h, w, self.base_size).to(x.device, x.dtype)  # (L, D), fixed
        return x + pos


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.pos_embed = PatchEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.proj_out_2 = nn.Linear(cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H*p, W*p), t (B,) timesteps in [0, 1000), y (B,) class ids -> (B, C_out, H*p, W*p)."""
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.pos_embed(x)  # (B, L, D)
        for block in self.transformer_blocks:
            x = block(x, t, y)
        # NOTE(official): the final layer is conditioned through block 0's embedders (diffusers layout).
        c = self.transformer_blocks[0].norm1.emb(t, y, x.dtype)
        shift, scale = self.proj_out_1(F.silu(c)).chunk(2, dim=1)
        x = self.proj_out_2(modulate(self.norm_out(x), shift, scale))  # (B, L, p*p*C_out)
        return unpatchify(x, h, w, p)

    def attention_layers(self) -> list[AttentionLayer]:
        return [AttentionLayer(b.attn1.layer, "self", ffn=in_block(b.attn1.layer, "ff"))
                for b in self.transformer_blocks]


# ---- checkpoints -------------------------------------------------------------------------------------

# The original facebookresearch/DiT state dict -> the Hub (diffusers) layout (a table for `weights.rename`). "{i}" is
# a block index; the original keeps one timestep and class embedder, which the Hub layout copies into every block.
ORIGINAL_TO_HUB = {
    **weight_and_bias({
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": shared("transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1"),
        "t_embedder.mlp.2": shared("transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_2"),
        "blocks.{i}.adaLN_modulation.1": "transformer_blocks.{i}.norm1.linear",
        "blocks.{i}.attn.qkv": split("transformer_blocks.{i}.attn1.to_{}", "q", "k", "v"),
        "blocks.{i}.attn.proj": "transformer_blocks.{i}.attn1.to_out.0",
        "blocks.{i}.mlp.fc1": "transformer_blocks.{i}.ff.net.0.proj",
        "blocks.{i}.mlp.fc2": "transformer_blocks.{i}.ff.net.2",
        "final_layer.adaLN_modulation.1": "proj_out_1",
        "final_layer.linear": "proj_out_2",
    }),
    "y_embedder.embedding_table.weight":
        shared("transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"),
    "pos_embed": DROP,  # the fixed sin-cos table, recomputed here (its length tells the preset)
}
ORIGINAL_IGNORED = tuple(key for key, rule in ORIGINAL_TO_HUB.items() if rule is DROP)
ORIGINAL_CONVENTION = {"norm_eps": 1e-6, "freq_shift": 0.0}  # the original code's numerics


def original_to_hub(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """An original DiT state dict in the Hub layout (every key checked: none missing, none unknown)."""
    return weights.rename(sd, ORIGINAL_TO_HUB, blocks={"i": range(num_layers)}, source="the original DiT state dict")


def load_dit(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             convention: str = "diffusers", preset: str | None = None) -> DiT:
    """Load a DiT from a Hub-layout `transformer/` folder, or from an original `.pt` state dict.

    `convention="original"` switches the numerics to the original code's (freq shift 0, FFN eps 1e-6);
    the default follows diffusers' DiTPipeline, which is how the Hub checkpoints are used. An original
    `.pt` file carries no config: `preset` names it (default: guessed from the pos_embed size).
    """
    if convention not in ("diffusers", "original"):
        raise MiniditError(f"unknown DiT convention {convention!r}; use 'diffusers' or 'original'")
    path = Path(path)
    if path.is_file():
        sd = weights.load_file(path)
        n_tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
        preset = preset or {256: "DiT-XL/2-256", 1024: "DiT-XL/2-512"}.get(n_tokens)
        if preset not in PRESETS:
            raise MiniditError(f"cannot tell which DiT {path} is; pass one of the presets {sorted(PRESETS)}")
        cfg = replace(PRESETS[preset], **ORIGINAL_CONVENTION)
        sd = original_to_hub(sd, cfg.num_layers)
    else:
        cfg = DiTConfig.from_hub(weights.read_json(path / "config.json"))
        if convention == "original":
            cfg = replace(cfg, **ORIGINAL_CONVENTION)
        sd = weights.load_folder(path, dtype)
        sd.pop("pos_embed.pos_embed", None)  # a fixed table some exports store; recomputed here
    with torch.device("meta"):
        model = DiT(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(path))
    return model.eval()


def original_keys(num_layers: int) -> list[str]:
    """Every key an original DiT state dict must hold (after dropping the ignored ones)."""
    rows = weights.source_keys(ORIGINAL_TO_HUB, {"i": range(num_layers)})
    return [key for key, (rule, _) in rows.items() if rule is not DROP]


def save_hub_config(cfg: DiTConfig, folder: Path) -> None:
    """Write `config.json` the way the Hub's DiT folders carry it (legacy class name included)."""
    config = {"_class_name": "DiTTransformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False, "norm_type": "ada_norm_zero",
              **{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "freq_shift"}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
