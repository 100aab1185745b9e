"""dit-tiny: a small class-conditional DiT in pixel space, trained here on drawn shapes (shapes.py).

    python -m minidit.train_tiny --model dit-tiny [--minutes 25] [--out weights/dit-tiny]

Training is DDPM epsilon-prediction MSE on the DiT/DDIM noise schedule (linear betas 1e-4..0.02, 1000 steps),
with 10% of the labels replaced by the null class so that classifier-free guidance works; AdamW, a cosine
learning-rate decay over the wall-clock budget, and an EMA of the weights, which is what gets exported.

The model is minidit's `DiT` unchanged (pixel space: in_channels = out_channels = 3, epsilon only). As in the
original DiT, one timestep and one class embedder are shared by all blocks; the Hub layout stores a copy per
block (`norm1.emb`), so the export writes the shared tensors under every block's keys. The export is the Hub
folder layout of facebook/DiT-XL-2-256 without the VAE, and is checked by loading it back with `load_dit`.

Shapes: images (B, C, H, W) with C = 3, H = W = 32; labels (B,).
"""

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from minidit.models.dit import DiT, DiTConfig, load_dit, save_hub_config
from minidit.schedulers.ddim import DDIM, DDIMConfig
from minidit.tiny.shapes import (
    BACKGROUND_MAX,
    CLASSES,
    IMAGE_SIZE,
    JITTER,
    SATURATION_RANGE,
    SIZE_RANGE,
    VALUE_RANGE,
    draw_shapes,
)
from minidit.tiny.training import Schedule, train_for, write_json

# ---- model and training --------------------------------------------------------------------------------

CONFIG = DiTConfig(num_layers=6, num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
                   patch_size=4, sample_size=IMAGE_SIZE, num_embeds_ada_norm=len(CLASSES))
SEED = 0
EVAL_SEED = 1  # a fixed held-out batch, drawn apart from the training stream
THREADS = 2
BATCH_SIZE = 32  # as many images per second as 64 on this CPU, twice the optimiser steps
# EMA 0.999: about the last 1000 steps, a few minutes of this run
SCHEDULE = Schedule(learning_rate=1e-3, warmup_steps=200, final_fraction=0.05, ema_decay=0.999)
LABEL_DROPOUT = 0.1
EVAL_SIZE = 512
INIT_STD = 0.02  # DiT's init for the timestep MLP
# DiT initialises the class table at INIT_STD too; in a run this short the label then stays ~1% of the
# conditioning (the timestep embedding grows to norm ~30) and is ignored. nn.Embedding's default std of 1 is used.
CLASS_INIT_STD = 1.0


def build_model(cfg: DiTConfig) -> DiT:
    """A DiT with one timestep and class embedder shared by every block, initialised as the original DiT."""
    model = DiT(cfg)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj  # initialised like a linear layer, as in DiT
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    nn.init.normal_(shared.class_embedder.embedding_table.weight, std=CLASS_INIT_STD)
    nn.init.normal_(shared.timestep_embedder.linear_1.weight, std=INIT_STD)
    nn.init.normal_(shared.timestep_embedder.linear_2.weight, std=INIT_STD)
    # adaLN-Zero: every block starts as the identity and the output as zero
    zeroed = [b.norm1.linear for b in model.transformer_blocks] + [model.proj_out_1, model.proj_out_2]
    for linear in zeroed:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return model


def diffusion_loss(model: DiT, images: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """DDPM epsilon MSE at t uniform in [0, 1000): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    n = images.shape[0]
    t = torch.randint(len(alphas_cumprod), (n,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    a = alphas_cumprod[t][:, None, None, None]
    noisy = a.sqrt() * images + (1 - a).sqrt() * noise
    return (model(noisy, t, labels) - noise).pow(2).mean()


@torch.no_grad()
def evaluate(model: DiT, batch: tuple[torch.Tensor, torch.Tensor], alphas_cumprod: torch.Tensor) -> float:
    """The loss on a fixed batch with fixed t and noise, so values are comparable across the run."""
    return diffusion_loss(model, *batch, alphas_cumprod, torch.Generator().manual_seed(EVAL_SEED)).item()


def train(minutes: float) -> tuple[DiT, dict]:
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    data = torch.Generator().manual_seed(SEED)
    model = build_model(CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)  # deepcopy keeps the shared embedder shared
    alphas_cumprod = DDIM(DDIMConfig(), 50).alphas_cumprod
    held_out = draw_shapes(EVAL_SIZE, torch.Generator().manual_seed(EVAL_SEED))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"dit-tiny: {n_params / 1e6:.2f}M trained parameters, {minutes:g} min budget, batch {BATCH_SIZE}", flush=True)

    def batch_loss(m: DiT) -> torch.Tensor:
        images, labels = draw_shapes(BATCH_SIZE, data)
        drop = torch.rand(BATCH_SIZE, generator=data) < LABEL_DROPOUT
        labels = labels.masked_fill(drop, CONFIG.num_embeds_ada_norm)  # the null class, for guidance
        return diffusion_loss(m, images, labels, alphas_cumprod, data)

    stats = train_for(minutes, model, ema, SCHEDULE, batch_loss, lambda m: evaluate(m, held_out, alphas_cumprod),
                      BATCH_SIZE)
    return ema.eval(), stats


# ---- export ----------------------------------------------------------------------------------------------

DIFFUSERS_VERSION = "0.12.0.dev0"  # what facebook/DiT-XL-2-256 was exported with
SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.02,
                    "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
                    "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}
MODEL_INDEX = {"_class_name": "DiTPipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
               "id2label": {str(i): name for i, name in enumerate(CLASSES)}}


def export(model: DiT, out: Path, stats: dict, command: str) -> None:
    """Write the Hub layout of facebook/DiT-XL-2-256 (no VAE), then check that it loads back identically."""
    write_json(out / "model_index.json", MODEL_INDEX)
    write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    save_hub_config(model.config, out / "transformer")
    # clone: the shared embedder becomes one copy per block, as the Hub layout stores it
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    weights_path = out / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file(sd, weights_path)

    loaded = load_dit(out / "transformer")
    x, t, y = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([999, 10]), torch.tensor([0, len(CLASSES)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
    stats = {**stats, "megabytes": weights_path.stat().st_size / 1e6}
    (out / "README.md").write_text(model_card(stats, command))
    print(f"exported {out} ({stats['megabytes']:.1f} MB of weights), reloaded with load_dit: identical", flush=True)


def model_card(stats: dict, command: str) -> str:
    c = CONFIG
    classes = "\n".join(f"| {i} | {name} |" for i, name in enumerate(CLASSES))
    return f"""# dit-tiny

minidit's embedded default model: a small class-conditional DiT (minidit's `DiT` class, the diffusers / Hub
layout of `facebook/DiT-XL-2-256`) that works directly on 32x32 RGB pixels in [-1, 1], trained in minutes on a
CPU on procedurally drawn shapes. It exists so that `analyze.py` and the tests have a real, trained DiT to record
K, V and A from without a download; it is not a generative model of anything beyond its toy data.

## Classes (`id2label`; the null class for guidance is {len(CLASSES)})

| id | shape |
|---|---|
{classes}

Each training image is one shape of a bright colour (any hue, HSV saturation {SATURATION_RANGE[0]:g}-{SATURATION_RANGE[1]:g},
value {VALUE_RANGE[0]:g}-{VALUE_RANGE[1]:g}) on a plain dark background (RGB channels in [0, {BACKGROUND_MAX:g}]), half-extent {SIZE_RANGE[0]:g} to {SIZE_RANGE[1]:g} px, centred within {JITTER:g} px
of the image centre, axis-aligned, anti-aliased (a shape may touch the border).

## Config

| | |
|---|---|
| layers / heads / head dim / width | {c.num_layers} / {c.num_attention_heads} / {c.attention_head_dim} / {c.hidden_size} |
| patch size, tokens | {c.patch_size}, {(IMAGE_SIZE // c.patch_size) ** 2} |
| in / out channels | {c.in_channels} / {c.out_channels} (RGB pixels; epsilon only, no learned sigma) |
| parameters | {stats['params'] / 1e6:.2f}M trained; the file holds a copy of the shared timestep and class embedders per block |
| weights | `transformer/diffusion_pytorch_model.safetensors`, fp32, {stats['megabytes']:.1f} MB |
| scheduler | DDIM, DiT's schedule: linear betas 1e-4..0.02, 1000 steps, epsilon |

## Training

    {command}

- {stats['minutes']:.1f} min wall time on {os.cpu_count()} CPU threads, torch {torch.__version__};
  {stats['steps']} steps of batch {BATCH_SIZE} = {stats['images']} images, each freshly drawn.
- DDPM epsilon MSE, t uniform in [0, 1000); labels replaced by the null class with probability {LABEL_DROPOUT}.
- AdamW, lr {SCHEDULE.learning_rate:g}, no weight decay, {SCHEDULE.warmup_steps} warmup steps, cosine decay to
  {SCHEDULE.final_fraction:g}x over the wall-clock budget; EMA {SCHEDULE.ema_decay} (exported); DiT's adaLN-Zero init\n  except the class table (std {CLASS_INIT_STD:g}); seed {SEED}.
- final training loss (smoothed) {stats['loss']:.4f}; EMA loss on a fixed held-out batch {stats['held_out']:.4f}.

## Limits

- Toy data, 32x32, patch {c.patch_size}: shapes and colours, nothing else; edges can be soft or blocky.
- Its attention statistics are those of a tiny model on trivial images, not those of DiT-XL/2 on ImageNet:
  use it to exercise the pipeline, not to draw conclusions about large DiTs.
- Training stops on wall-clock time, so a rerun on another machine sees a different number of images and
  does not reproduce these weights bit for bit.
"""


