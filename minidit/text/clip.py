"""CLIP text transformer: SD3's `text_encoder` (CLIP ViT-L/14) and `text_encoder_2` (OpenCLIP bigG/14), FLUX's
`text_encoder` (CLIP ViT-L/14).

Papers: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(https://arxiv.org/abs/2103.00020); OpenCLIP bigG/14: Cherti et al., "Reproducible scaling laws for contrastive
language-image learning" (https://arxiv.org/abs/2212.07143). Official code: openai/CLIP `clip/model.py`,
mlfoundations/open_clip. The Hub checkpoints are in the layout of transformers' CLIPTextModel (FLUX) and
CLIPTextModelWithProjection (SD3) as transformers 4.x saved them, and this module's attribute names equal those
keys, so they load with no remapping:

    text_model.embeddings.token_embedding.weight                          [vocab, D]
    text_model.embeddings.position_embedding.weight                       [77, D]
    text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias} [D, D], [D]
    text_model.encoder.layers.{i}.layer_norm1.{weight,bias}               [D]        before attention
    text_model.encoder.layers.{i}.mlp.fc1.{weight,bias}                   [d_ff, D], [d_ff]
    text_model.encoder.layers.{i}.mlp.fc2.{weight,bias}                   [D, d_ff], [D]
    text_model.encoder.layers.{i}.layer_norm2.{weight,bias}               [D]        before the MLP
    text_model.final_layer_norm.{weight,bias}                             [D]
    text_projection.weight                                                [P, D]     WithProjection only, no bias

CLIP-L/14: D 768, 12 layers, 12 heads of 64, d_ff 3072, quick GELU: 196 tensors, 123,060,480 parameters
(197 and 123,650,304 with the projection). OpenCLIP bigG/14: D 1280, 32 layers, 20 heads of 64, d_ff 5120, exact
GELU, with projection: 517 tensors, 694,659,840 parameters. Older files also hold
`text_model.embeddings.position_ids` (an arange buffer); the loader ignores it.

A second layout: transformers 5 saves CLIPTextModel's keys without the `text_model.` prefix
(`embeddings.token_embedding.weight`; CLIPTextModelWithProjection keeps it), so an encoder re-saved with
transformers 5 goes through `PREFIXLESS_TO_HUB` below. The token embedding's name tells the two layouts apart.

The model:
- pre-LN transformer blocks with a causal mask (token i attends to tokens 0..i), scores scaled by 1/sqrt(Dh);
- `hidden_states` = (embeddings, output of layer 1, ..., output of layer N); `last_hidden_state` is the final
  LayerNorm of the last of them. SD3 takes `hidden_states[-2]` (no final LayerNorm); FLUX and SD3 take the pooled
  vector: `last_hidden_state` at the end-of-text token, times `text_projection` when there is one (SD3).

Shapes: input_ids (B, L), L <= 77 -> hidden states (B, L, D), pooled (B, D), text_embeds (B, P).
"""

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidit import weights
from minidit.attention import attention
from minidit.errors import MiniditError
from minidit.layers import split_heads

PROJECTION_KEY = "text_projection.weight"
# transformers 5's CLIPTextModel file -> the Hub layout, by top-level module: the `text_model.` prefix restored
PREFIXLESS_TO_HUB = {
    "embeddings.": "text_model.embeddings.",
    "encoder.": "text_model.encoder.",
    "final_layer_norm.": "text_model.final_layer_norm.",
}
# a tensor every CLIP text file holds, under its name in each layout: it tells the two apart
TOKEN_EMBEDDING = {"hub": "text_model.embeddings.token_embedding.weight",
                   "prefix-less": "embeddings.token_embedding.weight"}
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}  # class name -> has a projection
# NOTE(official): configs written before transformers PR #24773 (all of SD3's and FLUX's) carry eos_token_id 2
# instead of 49407; transformers keeps their original pooling rule for exactly this value (see `eos_positions`).
LEGACY_EOS_TOKEN_ID = 2
QUICK_GELU_SCALE = 1.702  # OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(QUICK_GELU_SCALE * x),  # OpenAI CLIP-L/14
    "gelu": F.gelu,  # exact (erf) GELU: OpenCLIP bigG/14
}


@dataclass(frozen=True)
class CLIPTextConfig:
    # Defaults are transformers' CLIPTextConfig defaults, applied to keys a config.json lacks.
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512  # the width of text_projection's output, when the checkpoint has one
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # decides the pooling rule; the Hub's SD3 and FLUX configs have the legacy 2

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise MiniditError(f"CLIP config has hidden_act={self.hidden_act!r}; minidit implements "
                               f"{' and '.join(map(repr, ACTIVATIONS))} (CLIP-L/14 and OpenCLIP bigG/14)")
        if self.hidden_size % self.num_attention_heads:
            raise MiniditError(f"CLIP config has hidden_size {self.hidden_size}, not a multiple of "
                               f"num_attention_heads {self.num_attention_heads}: the file is damaged or not CLIP's")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise MiniditError(f"CLIP config has eos_token_id={self.eos_token_id!r}; the pooling needs one integer "
                               f"token id (the Hub's files have 2 or 49407)")

    @classmethod
    def from_hub(cls, config: dict) -> "CLIPTextConfig":
        """Build from a Hub `text_encoder/config.json` (transformers 4.x form), with transformers' defaults."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


PRESETS = {
    # the values of SD3-medium's text_encoder / text_encoder_2 and FLUX.1's text_encoder config.json
    "clip-vit-large-patch14": CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768,
                                             num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
                                             eos_token_id=LEGACY_EOS_TOKEN_ID),
    "clip-vit-bigG-14": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                                       num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
                                       eos_token_id=LEGACY_EOS_TOKEN_ID),
}


@dataclass
class CLIPOutput:
    hidden_states: tuple[torch.Tensor, ...]  # embeddings, then each layer's output: N + 1 tensors (B, L, D)
    last_hidden_state: torch.Tensor  # (B, L, D): final LayerNorm of hidden_states[-1]
    pooled: torch.Tensor  # (B, D): last_hidden_state at the end-of-text token (transformers' pooler_output)
    text_embeds: torch.Tensor | None = None  # (B, P): text_projection(pooled), with a projection only

    @property
    def penultimate(self) -> torch.Tensor:
        """(B, L, D): the output of the second-to-last layer, no final LayerNorm (what SD3 conditions on)."""
        return self.hidden_states[-2]


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, L) ids -> (B,) index of the token whose final state is the pooled vector."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        # NOTE(official): the legacy rule (OpenAI CLIP's): the position of the largest id of each row, which is the
        # first <|endoftext|> (49407, the last id of the vocabulary) whichever padding follows it. argmax returns
        # the first of equal maxima, so padding with <|endoftext|> itself (SD3's tokenizer, FLUX's) is fine too.
        return input_ids.argmax(dim=-1)
    # NOTE(official): otherwise the first occurrence of eos_token_id; a row without it pools position 0.
    return (input_ids == eos_token_id).int().argmax(dim=-1)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); causal (L, L) boolean, True where a query may attend to a key."""
        heads = lambda t: split_heads(t, self.num_heads)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))  # (B, Nh, L, Dh)
        return self.out_proj(attention(q, k, v, mask=causal))  # scale 1/sqrt(Dh); (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)  # learned, absolute

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)


class CLIPEncoder(nn.Module):
    """The `encoder.layers` container; CLIPTextTransformer runs the loop, keeping every layer's output."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    """The `text_model.` part of the checkpoint: embeddings, encoder layers, final LayerNorm, pooling."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> CLIPOutput:
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()  # (L, L)
        hidden_states = [self.embeddings(input_ids)]  # (B, L, D) each
        for layer in self.encoder.layers:
            hidden_states.append(layer(hidden_states[-1], causal))
        last_hidden_state = self.final_layer_norm(hidden_states[-1])
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = last_hidden_state[rows, eos_positions(input_ids, self.config.eos_token_id)]  # (B, D)
        return CLIPOutput(tuple(hidden_states), last_hidden_state, pooled)


class CLIPText(nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection with `projection=True`."""

    def __init__(self, cfg: CLIPTextConfig, projection: bool):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False) if projection else None

    def forward(self, input_ids: torch.Tensor) -> CLIPOutput:
        """input_ids (B, L) int, L <= max_position_embeddings, each row holding its end-of-text token.

        No attention mask: the pipelines pad to 77 and rely on the causal mask, so tokens before the end of
        text never see the padding.
        """
        check_dtype(self.text_model.final_layer_norm.weight.dtype)
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise MiniditError(f"CLIP takes token ids shaped (batch, length <= {self.config.max_position_embeddings}),"
                               f" got {tuple(input_ids.shape)}: tokenize with truncation to 77 tokens")
        out = self.text_model(input_ids)
        if self.text_projection is None:
            return out
        return replace(out, text_embeds=self.text_projection(out.pooled))  # (B, P)


# ---- checkpoints -------------------------------------------------------------------------------------

def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MiniditError(f"CLIP cannot run in {dtype}: use torch.float32, torch.bfloat16 or torch.float16")


def has_projection(config: dict, sd: dict[str, torch.Tensor], source: str) -> bool:
    """Which class the checkpoint is, from config.json's `architectures`; from the file when that entry is absent."""
    named = [a for a in config.get("architectures") or [] if a in ARCHITECTURES]
    if not named:
        if config.get("architectures"):
            raise MiniditError(f"{source}/config.json names {config['architectures']}; minidit loads the CLIP text "
                               f"encoders {' and '.join(ARCHITECTURES)} only")
        return PROJECTION_KEY in sd
    projection = ARCHITECTURES[named[0]]
    if projection and PROJECTION_KEY not in sd:
        raise MiniditError(f"{source} has no {PROJECTION_KEY} though its config.json says {named[0]}: the file is "
                           f"incomplete or belongs to another model; download it again")
    if not projection and PROJECTION_KEY in sd:
        raise MiniditError(f"{source} holds {PROJECTION_KEY} though its config.json says {named[0]} (no projection): "
                           f"the config and the weights do not belong together; download them again")
    return projection


def prefixless_to_hub(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers 5's CLIPTextModel keys into the Hub layout; keys of no listed module stay as they are
    (the strict load then reports them)."""
    out = {}
    for key, tensor in sd.items():
        module = next((m for m in PREFIXLESS_TO_HUB if key.startswith(m)), None)
        out[PREFIXLESS_TO_HUB[module] + key.removeprefix(module) if module else key] = tensor
    return out


def hub_layout(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The state dict in the Hub layout: as it is, or renamed from transformers 5's prefix-less layout."""
    if TOKEN_EMBEDDING["hub"] in sd:
        return sd
    if TOKEN_EMBEDDING["prefix-less"] in sd:
        return prefixless_to_hub(sd)
    raise MiniditError(f"{source} is not a CLIP text encoder in a layout minidit reads: it has neither "
                       f"{TOKEN_EMBEDDING['hub']} (the Hub's files) nor {TOKEN_EMBEDDING['prefix-less']} "
                       f"(CLIPTextModel saved by transformers 5); found {', '.join(sorted(sd)[:3]) or 'no tensors'}")


def load_clip(folder: str | Path, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> CLIPText:
    """Load a CLIP text encoder from a Hub-layout `text_encoder/` folder (config.json, model.safetensors), its
    weights in the Hub's key layout or in transformers 5's prefix-less one."""
    check_dtype(dtype)
    folder = Path(folder)
    config = weights.read_json(folder / "config.json")
    cfg = CLIPTextConfig.from_hub(config)
    sd = hub_layout(weights.load_folder(folder, dtype), str(folder))
    sd = {k: v for k, v in sd.items() if not k.endswith(".position_ids")}
    with torch.device("meta"):
        model = CLIPText(cfg, projection=has_projection(config, sd, str(folder)))
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(folder))
    return model.eval()
