"""flux-tiny: a small text-to-image FLUX.1 in pixel space, trained here on captioned drawings (shapes.py).

    python -m minidit.train_tiny --model flux-tiny [--minutes 28] [--out weights/flux-tiny]

Everything is the real architecture at a tiny size, loaded by minidit's real code: the backbone is minidit's
`FluxTransformer` (double- then single-stream blocks, joint attention over [text; image], 3-axis RoPE), the text
encoders are a CLIP-L-architecture `CLIPText` (pooled vector) and a T5 v1.1-architecture `T5Encoder` (states),
and the tokenizers are built from the captions in the real files (tokenizers.py). The images are 32x32 RGB in
[-1, 1] packed 2x2 as FLUX packs latents: 256 tokens of 12 channels (the recipe's pixel-space path: no VAE).

Training is rectified flow as in FLUX / SD3: x_t = (1 - t) x_0 + t eps, the model predicts the velocity eps - x_0,
MSE; t is logit-normal (sigmoid of a standard normal, SD3's default) then moved by FLUX.1-dev's resolution shift
at 256 tokens (mu = 0.5), so training sees the times the default sampler visits. 10% of the captions are replaced
by the empty one, the negative prompt of true classifier-free guidance. No guidance embedding (a distilled
guidance cannot be trained here), so `guidance_embeds` is false and the model is sampled with true CFG.

The text encoders are frozen at a fixed random initialisation (transformers' initialisation rules, seeded): a
random T5 still gives every token of a caption its own contextual state, which the joint attention learns to
read, and freezing lets every caption be encoded once before training (the step then costs the backbone alone).
The export is the Hub folder layout of black-forest-labs/FLUX.1-dev without vae/ (three transformer shards, two
T5 shards, as there), checked by loading it back with minidit's loaders.
"""

import copy
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from minidit.api import load_backbone
from minidit.models.flux import FluxConfig, FluxTransformer, RMSNorm, load_flux
from minidit.pipelines.flux import TRUE_CFG_SCALE, image_ids, pack
from minidit.text.clip import CLIPText, CLIPTextConfig, load_clip
from minidit.text.clip_tokenizer import MAX_LENGTH as CLIP_LENGTH
from minidit.text.clip_tokenizer import CLIPTokenizer
from minidit.text.t5 import T5Config, T5Encoder, load_t5
from minidit.text.t5_tokenizer import T5Tokenizer
from minidit.tiny import accuracy, shapes, tokenizers
from minidit.tiny.training import Schedule, save_sharded, train_for, write_json

T5_LENGTH = 16  # tokens per caption: the longest caption is 14 pieces + </s>
T5_PIECES = 100  # sentencepiece vocabulary asked for; the trainer keeps fewer on so small a corpus
CLIP = CLIPTextConfig(vocab_size=0, hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu",
                      eos_token_id=2)  # vocab_size: set from the tokenizer; eos_token_id 2: FLUX.1-dev's legacy value
T5 = T5Config(vocab_size=0, d_model=64, d_kv=32, d_ff=128, num_heads=2, num_layers=2)
FLUX = FluxConfig(num_layers=2, num_single_layers=4, num_attention_heads=2, attention_head_dim=32, in_channels=12,
                  joint_attention_dim=T5.d_model, pooled_projection_dim=CLIP.hidden_size, guidance_embeds=False,
                  axes_dims_rope=(4, 14, 14))  # FLUX.1's (16, 56, 56) over 128 channels, scaled to 32
SEED = 0
EVAL_SEED = 1
THREADS = 2
BATCH_SIZE = 16  # as many images per second as 32 on this CPU, twice the optimiser steps
SCHEDULE = Schedule(learning_rate=1e-3, warmup_steps=200, final_fraction=0.05, ema_decay=0.999)
CAPTION_DROPOUT = 0.1
SHIFT_MU = 0.5  # FLUX.1-dev's dynamic shift at 256 image tokens
EVAL_SIZE = 256
INIT_STD = 0.02  # DiT's init for the timestep MLP


# ---- text: tokenizers, frozen random encoders, every caption encoded once ---------------------------------

def init_clip(model: CLIPText, cfg: CLIPTextConfig) -> None:
    """transformers' CLIPTextModel initialisation (factor 1): embeddings N(0, 0.02), attention and MLP scaled by
    width and depth, LayerNorms 1 and 0, biases 0."""
    in_std, out_std = cfg.hidden_size**-0.5 * (2 * cfg.num_hidden_layers) ** -0.5, cfg.hidden_size**-0.5
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "layer_norm" in name:
            nn.init.ones_(p)
        elif "embedding" in name:
            nn.init.normal_(p, std=0.02)
        elif "out_proj" in name:
            nn.init.normal_(p, std=out_std)
        elif "fc1" in name:
            nn.init.normal_(p, std=(2 * cfg.hidden_size) ** -0.5)
        else:  # q, k, v projections and fc2
            nn.init.normal_(p, std=in_std)


def init_t5(model: T5Encoder, cfg: T5Config) -> None:
    """transformers' T5 initialisation (factor 1): embedding N(0, 1); q N(0, (D Dk)^-1/2) (T5 folds the score
    scale into it); k, v, relative bias, wi N(0, D^-1/2); o N(0, (Nh Dk)^-1/2); wo N(0, d_ff^-1/2); norms 1."""
    stds = {"q": (cfg.d_model * cfg.d_kv) ** -0.5, "k": cfg.d_model**-0.5, "v": cfg.d_model**-0.5,
            "o": (cfg.num_heads * cfg.d_kv) ** -0.5, "relative_attention_bias": cfg.d_model**-0.5,
            "wi_0": cfg.d_model**-0.5, "wi_1": cfg.d_model**-0.5, "wo": cfg.d_ff**-0.5, "shared": 1.0}
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=stds[name.split(".")[-2]])


def tokenizer_corpus() -> list[str]:
    """The captions, then each of their words on its own line: on the captions alone, sentencepiece's seed search
    keeps only characters and short pieces (a 43-piece vocabulary, 33 pieces per caption)."""
    captions = shapes.all_captions()
    return captions + sorted({w for c in captions for w in c.split()})


def build_text(folder: Path) -> tuple[CLIPText, T5Encoder]:
    """Write tokenizer/ and tokenizer_2/ into `folder`; the two encoders at their seeded initialisation."""
    corpus = tokenizer_corpus()
    clip_vocab = tokenizers.write_clip_tokenizer(corpus, folder / "tokenizer")
    t5_vocab = tokenizers.write_t5_tokenizer(corpus, folder / "tokenizer_2", vocab_size=T5_PIECES, max_length=T5_LENGTH)
    torch.manual_seed(SEED)
    clip_cfg = CLIPTextConfig(**{**asdict(CLIP), "vocab_size": clip_vocab})
    clip = CLIPText(clip_cfg, projection=False)
    init_clip(clip, clip_cfg)
    t5_cfg = T5Config(**{**asdict(T5), "vocab_size": t5_vocab})
    t5 = T5Encoder(t5_cfg)
    init_t5(t5, t5_cfg)
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)


@torch.no_grad()
def encode_captions(folder: Path, clip: CLIPText, t5: T5Encoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 states (N, T5_LENGTH, 64) and pooled CLIP (N, 64) of `texts`, through the tokenizers written in `folder`,
    as FluxRecipe encodes a prompt (CLIP padded to 77, T5 to T5_LENGTH without a mask)."""
    clip_ids, _ = CLIPTokenizer(folder / "tokenizer")(texts, CLIP_LENGTH)
    t5_ids, _ = T5Tokenizer(folder / "tokenizer_2")(texts, T5_LENGTH)
    return t5(t5_ids), clip(clip_ids).pooled


# ---- the backbone and its loss ----------------------------------------------------------------------------

def build_model(cfg: FluxConfig) -> FluxTransformer:
    """A FluxTransformer initialised as DiT initialises its blocks: xavier linears, the timestep MLP N(0, 0.02),
    adaLN-Zero (every modulation and the output projection zero, so each block starts as the identity)."""
    model = FluxTransformer(cfg)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
    embedder = model.time_text_embed.timestep_embedder
    nn.init.normal_(embedder.linear_1.weight, std=INIT_STD)
    nn.init.normal_(embedder.linear_2.weight, std=INIT_STD)
    zeroed = [b.norm1.linear for b in model.transformer_blocks] + [b.norm1_context.linear
                                                                   for b in model.transformer_blocks]
    zeroed += [b.norm.linear for b in model.single_transformer_blocks] + [model.norm_out.linear, model.proj_out]
    for linear in zeroed:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return model


def sample_times(n: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal t, then FLUX's time shift e^mu / (e^mu + 1/t - 1) at mu = SHIFT_MU."""
    t = torch.sigmoid(torch.randn(n, generator=generator))
    return torch.exp(torch.tensor(SHIFT_MU)) / (torch.exp(torch.tensor(SHIFT_MU)) + 1 / t - 1)


class FlowLoss:
    """Rectified-flow MSE of the velocity eps - x_0 on freshly drawn captioned images."""

    def __init__(self, states: torch.Tensor, pooled: torch.Tensor, generator: torch.Generator):
        self.states, self.pooled, self.generator = states, pooled, generator  # the last row: the empty caption
        self.img_ids = image_ids(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        self.txt_ids = torch.zeros(T5_LENGTH, 3)

    def batch(self, n: int, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        parts = shapes.random_parts(n, self.generator)
        images = shapes.draw_captions(parts, self.generator)
        index = shapes.caption_index(parts)  # the row of states and pooled
        drop = torch.rand(n, generator=self.generator) < dropout
        return images, index.masked_fill(drop, len(self.pooled) - 1)

    def __call__(self, model: FluxTransformer, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x0 = pack(images)  # (n, 256, 12)
        noise = torch.randn(x0.shape, generator=self.generator)
        t = sample_times(len(x0), self.generator)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = model(xt, t, self.states[index], self.pooled[index], self.img_ids, self.txt_ids)
        return (v - (noise - x0)).pow(2).mean()


def train(minutes: float, folder: Path) -> tuple[FluxTransformer, CLIPText, T5Encoder, dict]:
    torch.set_num_threads(THREADS)
    clip, t5 = build_text(folder)
    captions = shapes.all_captions()
    states, pooled = encode_captions(folder, clip, t5, captions + [""])
    torch.manual_seed(SEED)
    model = build_model(FLUX)
    ema = copy.deepcopy(model).requires_grad_(False)
    loss = FlowLoss(states, pooled, torch.Generator().manual_seed(SEED))
    held_out = FlowLoss(states, pooled, torch.Generator().manual_seed(EVAL_SEED)).batch(EVAL_SIZE, 0.0)

    def held_out_loss(m: FluxTransformer) -> float:
        fixed = FlowLoss(states, pooled, torch.Generator().manual_seed(EVAL_SEED))  # the same t and noise each time
        with torch.no_grad():
            return fixed(m, *held_out).item()

    n_params = sum(p.numel() for p in model.parameters())
    print(f"flux-tiny: {n_params / 1e6:.2f}M trained parameters (text encoders frozen), {minutes:g} min budget, "
          f"batch {BATCH_SIZE}", flush=True)
    stats = train_for(minutes, model, ema, SCHEDULE, lambda m: loss(m, *loss.batch(BATCH_SIZE, CAPTION_DROPOUT)),
                      held_out_loss, BATCH_SIZE)
    return ema.eval(), clip, t5, stats


# ---- export -----------------------------------------------------------------------------------------------

DIFFUSERS_VERSION = "0.30.0.dev0"  # what FLUX.1-dev's JSON files were written with
TRANSFORMERS_VERSION = "4.43.3"
MODEL_INDEX = {  # FLUX.1-dev's, without the vae: flux-tiny works in pixel space
    "_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"]}
SCHEDULER_CONFIG = {  # FLUX.1-dev's scheduler/scheduler_config.json (checkpoints.md §4.3)
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION, "base_image_seq_len": 256,
    "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True}
TRANSFORMER_SHARDS, T5_SHARDS = 3, 2  # as FLUX.1-dev's transformer/ and text_encoder_2/


def transformer_config(cfg: FluxConfig) -> dict:
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "out_channels"}
    return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION, **fields}


def clip_config(cfg: CLIPTextConfig) -> dict:
    """CLIPTextModel's config.json in FLUX.1-dev's form (its keys; the tiny sizes)."""
    return {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "clip_text_model", "pad_token_id": 1,
            "torch_dtype": "float32", "transformers_version": TRANSFORMERS_VERSION, **asdict(cfg)}


def t5_config(cfg: T5Config) -> dict:
    """T5EncoderModel's config.json in FLUX.1-dev's form (its keys; the tiny sizes)."""
    return {"architectures": ["T5EncoderModel"], "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
            "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0, "is_encoder_decoder": True,
            "is_gated_act": True, "model_type": "t5", "num_decoder_layers": cfg.num_layers, "output_past": True,
            "pad_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float32",
            "transformers_version": TRANSFORMERS_VERSION, "use_cache": True, **asdict(cfg)}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def export(model: FluxTransformer, clip: CLIPText, t5: T5Encoder, out: Path) -> None:
    """Write the rest of the FLUX.1-dev layout (the tokenizers are there already), then load every component back
    with minidit's loaders and check that it computes exactly what was trained."""
    write_json(out / "model_index.json", MODEL_INDEX)
    write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(out / "transformer" / "config.json", transformer_config(model.config))
    save_sharded(state(model), out / "transformer", "diffusion_pytorch_model", TRANSFORMER_SHARDS)
    write_json(out / "text_encoder" / "config.json", clip_config(clip.config))
    save_file(state(clip), out / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    write_json(out / "text_encoder_2" / "config.json", t5_config(t5.config))
    save_sharded(state(t5), out / "text_encoder_2", "model", T5_SHARDS)

    texts = shapes.all_captions()[:3] + [""]
    expected = encode_captions(out, clip, t5, texts)
    loaded = encode_captions(out, load_clip(out / "text_encoder"), load_t5(out / "text_encoder_2"), texts)
    x, t = torch.randn(2, 256, FLUX.in_channels), torch.tensor([1.0, 0.3])
    args = (expected[0][:2], expected[1][:2], image_ids(32, 32), torch.zeros(T5_LENGTH, 3))
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(expected, loaded))
        same &= torch.equal(load_flux(out / "transformer", dtype=torch.float32)(x, t, *args), model(x, t, *args))
    if not same:
        raise RuntimeError(f"{out} does not load back to the trained model")
    print(f"exported {out}; reloaded with minidit's loaders: identical", flush=True)


def folder_megabytes(out: Path) -> float:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6


def machine() -> str:
    return f"{os.cpu_count()} CPU threads ({platform.processor() or platform.machine()}), torch {torch.__version__}"


# ---- the whole run and its model card -----------------------------------------------------------------------

def train_and_export(minutes: float, out: Path, command: str) -> None:
    """Train, export into `out`, measure the caption accuracy of the export, write the model card."""
    out.mkdir(parents=True, exist_ok=True)
    model, clip, t5, stats = train(minutes, out)
    export(model, clip, t5, out)
    stats = {**stats, "machine": machine()}
    print(f"training record: {json.dumps(stats)}", flush=True)  # write_card(out, record, command) redoes the card
    write_card(out, stats, command)


def write_card(out: Path, stats: dict, command: str) -> None:
    """Measure the caption accuracy of the model in `out` at its defaults, then write its README.md."""
    report = accuracy.measure(load_backbone("flux-tiny", weights_dir=out))
    stats = {**stats, "megabytes": folder_megabytes(out)}
    (out / "README.md").write_text(model_card(stats, report.summary(), command))
    print(f"{out}: {stats['megabytes']:.1f} MB; caption accuracy {report.accuracy:.3f}", flush=True)


def model_card(stats: dict, caption_accuracy: str, command: str) -> str:
    c, clip, t5 = FLUX, CLIP, T5
    colours, backgrounds = ", ".join(shapes.COLOURS), ", ".join(shapes.BACKGROUNDS)
    return f"""# flux-tiny

minidit's embedded default model: a small text-to-image FLUX.1 (minidit's `FluxTransformer`, the diffusers / Hub
layout of `black-forest-labs/FLUX.1-dev`) that draws 32x32 RGB pixels from a caption, trained in minutes on a CPU
on procedurally drawn shapes. It exists so that `analyze.py` and the tests have a real, trained FLUX — double- and
single-stream blocks, joint attention over text and image tokens, RoPE, flow matching, two text encoders — to
record K, V and A from without a download. It is not a generative model of anything beyond its toy data.

## Captions

"a {{colour}} {{shape}} on a {{background}} background": {len(shapes.COLOURS)} colours ({colours}) x
{len(shapes.SHAPES)} shapes ({", ".join(shapes.SHAPES)}) x {len(shapes.BACKGROUNDS)} backgrounds ({backgrounds}) =
{len(shapes.all_captions())} captions. The caption determines the image up to the shape's size (half-extent
{shapes.SIZE_RANGE[0]:g} to {shapes.SIZE_RANGE[1]:g} px), position (centre within {shapes.JITTER:g} px of the image centre) and a
colour jitter of +-{shapes.COLOUR_JITTER:g} per channel. Other text reaches the model as unknown or unseen tokens: expect noise.

## Sampling

FluxPipeline-style flow-matching Euler, 28 steps, FLUX.1-dev's scheduler config (dynamic shift: mu = 0.5 at 256
tokens), **true** classifier-free guidance {TRUE_CFG_SCALE:g} with the empty negative prompt (diffusers' `true_cfg_scale`;
minidit's `--guidance`), T5 length {T5_LENGTH} (`tokenizer_2`'s `model_max_length`).
Pixel space: the transformer's 12 input channels are 2x2 patches of RGB, so there is no `vae/`.

## Folder

| | |
|---|---|
| transformer | `FluxTransformer2DModel`: {c.num_layers} double + {c.num_single_layers} single blocks, {c.num_attention_heads} heads x {c.attention_head_dim}, width {c.hidden_size}, RoPE axes {list(c.axes_dims_rope)}, in_channels {c.in_channels}, no guidance embedding; {stats['params'] / 1e6:.2f}M parameters, fp32, {TRANSFORMER_SHARDS} shards + index |
| text_encoder | `CLIPTextModel` (CLIP-L's architecture): {clip.num_hidden_layers} layers, width {clip.hidden_size}, {clip.num_attention_heads} heads, quick GELU, legacy argmax pooling (eos_token_id 2); frozen at its seeded initialisation |
| text_encoder_2 | `T5EncoderModel` (T5 v1.1's architecture): {t5.num_layers} blocks, width {t5.d_model}, {t5.num_heads} heads x {t5.d_kv}, gated GELU d_ff {t5.d_ff}; frozen at its seeded initialisation, {T5_SHARDS} shards + index |
| tokenizer | CLIP byte-level BPE: 512 byte symbols, merges learned on the captions' words, `<|startoftext|>`, `<|endoftext|>` |
| tokenizer_2 | T5 sentencepiece unigram trained on the captions and their words (`<pad>` 0, `</s>` 1, `<unk>` 2) + 100 sentinels; no tokenizer.json (transformers derives it from spiece.model) |
| total | {stats['megabytes']:.1f} MB |

## Training

    {command}

- {stats['minutes']:.1f} min wall time on {stats['machine']};
  {stats['steps']} steps of batch {BATCH_SIZE} = {stats['images']} images, each freshly drawn.
- Rectified flow: x_t = (1 - t) x_0 + t eps, velocity eps - x_0, MSE; t logit-normal then shifted with mu = {SHIFT_MU}
  (FLUX.1-dev's shift at 256 tokens); captions replaced by the empty one with probability {CAPTION_DROPOUT}.
- Text encoders frozen (every caption encoded once before training): the step costs the backbone alone. Whether
  training them too would help was not measured.
- AdamW, lr {SCHEDULE.learning_rate:g}, no weight decay, {SCHEDULE.warmup_steps} warmup steps, cosine decay to
  {SCHEDULE.final_fraction:g}x over the wall-clock budget; EMA {SCHEDULE.ema_decay} (exported); adaLN-Zero init; seed {SEED}.
- final training loss (smoothed) {stats['loss']:.4f}; EMA loss on a fixed held-out batch {stats['held_out']:.4f}.

## Caption accuracy

At the defaults above, over the grid of `minidit.tiny.accuracy.default_grid()` (48 captions, every colour x shape
once, x seeds 0-3), read by the exact detector of minidit/tiny/accuracy.py (`python -m minidit.tiny.accuracy`):

    {caption_accuracy.replace(chr(10), chr(10) + "    ")}

A sample matches when its colour, shape and background are all named as the caption says (the shape: the nearest
of the eight, at IoU >= 0.8); it is clean when its shape also reaches IoU 0.92, closer to the shape than any
drawing of another shape ever is.

## Limits

- Toy data, 32x32 pixels, 2x2 patches: shapes and colours, nothing else. The shapes with thin parts (rings,
  crosses, bars) are the hardest for it: see the confusions above; edges are often ragged, with stray lines.
- Its attention statistics are those of a tiny model on trivial images, not those of FLUX.1 on photographs:
  use it to exercise the pipeline and the analysis, not to draw conclusions about FLUX.1.
- Training stops on wall-clock time, so a rerun on another machine (or on a busy one) sees a different number
  of images and does not reproduce these weights bit for bit.
"""
