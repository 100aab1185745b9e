"""T5 v1.1 encoder: the text encoder of PixArt-α, Latte, SD3, FLUX, CogVideoX, Mochi and Open-Sora.

Papers: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
(https://arxiv.org/abs/1910.10683); v1.1 changes the FFN to gated GELU (Shazeer, https://arxiv.org/abs/2002.05202)
and unties the embeddings. Official code: google-research/text-to-text-transfer-transformer (Mesh TensorFlow).
The Hub checkpoints (`text_encoder/` of the pipeline repos, `google/t5-v1_1-xxl`) are in the layout of
transformers' T5EncoderModel, and this module's attribute names equal those keys, so they load with no remapping:

    shared.weight                                                         [vocab, D]   the token embedding
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight              [D, D]       no biases anywhere
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight  [32, Nh]     block 0 only
    encoder.block.{i}.layer.0.layer_norm.weight                           [D]
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1}.weight           [d_ff, D]
    encoder.block.{i}.layer.1.DenseReluDense.wo.weight                    [D, d_ff]
    encoder.block.{i}.layer.1.layer_norm.weight                           [D]
    encoder.final_layer_norm.weight                                       [D]

219 tensors for XXL (D 4096, 24 blocks, 64 heads of 64, d_ff 10240): 4,762,310,656 parameters, one file or
shards plus `model.safetensors.index.json`. Some older files also hold `encoder.embed_tokens.weight`, a copy of
`shared.weight` (the two are tied); the loader accepts it and checks that it is the same tensor.

Quirks, all kept:
- attention scores are not scaled by 1/sqrt(Dh) (the scale is folded into the initialisation of q);
- one relative position bias, owned by block 0, is added to the scores of every block;
- the layer norm is an RMS norm (no mean subtraction, no bias) computed in fp32;
- fp16 overflows (inf/NaN in the FFN output), so only fp32 and bf16 are accepted.

Shapes: input_ids (B, L), attention_mask (B, L) -> last_hidden_state (B, L, D); D = Nh * Dh.
"""

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from minidit import weights
from minidit.attention import attention
from minidit.errors import MiniditError
from minidit.layers import split_heads

TIED_KEY = "encoder.embed_tokens.weight"  # an optional copy of shared.weight in some files


@dataclass(frozen=True)
class T5Config:
    # Defaults are transformers' T5Config defaults, applied to keys a config.json lacks.
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 8
    num_layers: int = 6  # encoder blocks
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # transformers' default is "relu" (the original T5); minidit implements v1.1's gated GELU only.
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise MiniditError(f"T5 config has feed_forward_proj={self.feed_forward_proj!r}; minidit implements the "
                               f"T5 v1.1 encoder ('gated-gelu') used by the diffusion pipelines only")

    @classmethod
    def from_hub(cls, config: dict) -> "T5Config":
        """Build from a Hub `text_encoder/config.json`, applying transformers' defaults for absent keys."""
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        values.setdefault("feed_forward_proj", "relu")  # absent means the original T5, refused above
        return cls(**values)


PRESETS = {
    "google/t5-v1_1-xxl": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24),
}


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets for `relative_position` = key position - query position.

    Half the buckets for each sign; within a half, distances below a quarter of `num_buckets` get a bucket each,
    longer ones share log-spaced buckets up to `max_distance`, beyond which they all fall in the last bucket.
    """
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    # NOTE(official): the same float32 op order as Mesh TF / transformers, so that boundary cases round alike
    log_bucket = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, log_bucket)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (transformers' "gelu_new").

    NOTE(official): written out op by op in the activation dtype, as Mesh TF and transformers compute it.
    F.gelu(x, approximate="tanh") is the same function evaluated in fp32, which rounds differently in bf16.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5LayerNorm(nn.Module):
    """RMS norm: x / rms(x) * weight, with the mean of squares taken in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); bias (B or 1, Nh, L, L), added to the scores: position bias plus padding mask."""
        heads = lambda t: split_heads(t, self.num_heads)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))  # (B, Nh, L, Dh)
        # NOTE(official): T5 does not scale the scores by 1/sqrt(Dh).
        return self.o(attention(q, k, v, mask=bias, scale=1.0))  # (B, L, D)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """v1.1's gated-GELU FFN: wo(gelu_tanh(wi_0 x) * wi_1 x). The key name is the original T5's ReLU FFN's."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(gelu_tanh(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, index: int):
        super().__init__()
        # checkpoint keys: layer.0 (self-attention), layer.1 (FFN)
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias=index == 0), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.block = nn.ModuleList([T5Block(cfg, i) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def position_bias(self, length: int) -> torch.Tensor:
        """(1, Nh, L, L) from block 0's table; every block adds the same bias."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        position = torch.arange(length, device=table.weight.device)
        cfg = self.config
        buckets = relative_position_bucket(position[None, :] - position[:, None],  # key - query, (L, L)
                                           cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        return rearrange(table(buckets), "Lq Lk Nh -> 1 Nh Lq Lk")

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        bias = self.position_bias(x.shape[1])  # (1, Nh, L, L)
        if attention_mask is not None:  # padded keys get the most negative value of the dtype
            padding = torch.finfo(x.dtype).min * (attention_mask[:, None, None, :] == 0).to(x.dtype)  # (B, 1, 1, L)
            bias = bias + padding  # (B, Nh, L, L)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """The encoder half of T5 v1.1 (transformers' T5EncoderModel), returning last_hidden_state."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        # `encoder.embed_tokens` of the reference is this same table (tied); it is not stored twice.
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int, attention_mask (B, L) with 1 for tokens and 0 for padding -> (B, L, D).

        Without a mask every position attends to every other, padding included (SD3, FLUX, CogVideoX do this).
        """
        check_dtype(self.shared.weight.dtype)
        return self.encoder(self.shared(input_ids), attention_mask)  # (B, L, D)


# ---- checkpoints -------------------------------------------------------------------------------------

def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16):
        raise MiniditError(f"T5 cannot run in {dtype}: T5 v1.1's activations overflow float16 (inf/NaN in the FFN "
                           f"output), so its encoder runs in bf16 or fp32; pass dtype=torch.bfloat16 or torch.float32")


def tie_embeddings(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Accept files holding `shared.weight`, `encoder.embed_tokens.weight`, or both (then they must be equal)."""
    if TIED_KEY not in sd:
        return sd
    sd = dict(sd)
    embed_tokens = sd.pop(TIED_KEY)
    if "shared.weight" not in sd:
        sd["shared.weight"] = embed_tokens
    elif not torch.equal(sd["shared.weight"], embed_tokens):
        raise MiniditError(f"{source} holds {TIED_KEY} different from shared.weight; T5 ties the two, so this is not a "
                           f"T5 encoder checkpoint as published: download it again")
    return sd


def load_t5(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> T5Encoder:
    """Load a T5 v1.1 encoder from a Hub-layout `text_encoder/` folder (config.json, one file or shards + index)."""
    check_dtype(dtype)
    folder = Path(folder)
    cfg = T5Config.from_hub(weights.read_json(folder / "config.json"))
    sd = tie_embeddings(weights.load_folder(folder, dtype), str(folder))
    with torch.device("meta"):
        model = T5Encoder(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(folder))
    return model.eval()
