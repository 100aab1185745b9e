"""Train dit-tiny, minidit's embedded default model: a small pixel-space DiT on procedurally drawn shapes.

    python -m minidit.train_tiny [--minutes 25] [--out weights/dit-tiny]

The data is drawn on the fly, no download: one coloured shape of `CLASSES` on a plain background, 32x32 RGB
in [-1, 1], anti-aliased through signed distances, a whole batch at a time. Training is DDPM epsilon-prediction
MSE on the DiT/DDIM noise schedule (linear betas 1e-4..0.02, 1000 steps), with 10% of the labels replaced by
the null class so that classifier-free guidance works; AdamW, a cosine learning-rate decay over the wall-clock
budget, and an EMA of the weights, which is what gets exported.

The model is minidit's `DiT` unchanged (pixel space: in_channels = out_channels = 3, epsilon only). As in the
original DiT, one timestep and one class embedder are shared by all blocks; the Hub layout stores a copy per
block (`norm1.emb`), so the export writes the shared tensors under every block's keys. The export is the Hub
folder layout of facebook/DiT-XL-2-256 without the VAE, and is checked by loading it back with `load_dit`.

Shapes: images (B, C, H, W) with C = 3, H = W = 32; labels (B,).
"""

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

# OpenMP threads spin-wait between ops by default; when another process holds a core (a shared 2-core machine),
# that turns a 2-thread run ~25x slower. A short spin keeps the idle speed and loses ~2x, not ~25x, when contended.
# Must be set before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from minidit.models.dit import DiT, DiTConfig, load_dit, save_hub_config  # noqa: E402
from minidit.schedulers.ddim import DDIM, DDIMConfig  # noqa: E402

# ---- data -------------------------------------------------------------------------------------------------

IMAGE_SIZE = 32
CLASSES = ("circle", "square", "triangle", "cross", "ring", "horizontal bar", "vertical bar", "diamond")
SIZE_RANGE = (9.5, 13.0)  # half-extent r in pixels (every shape fits in a (2r)^2 box): 5 to 6.5 patches wide
JITTER = 3.0  # the shape's centre is within this many pixels of the image centre, on each axis
BACKGROUND_MAX = 0.35  # background channels uniform in [0, BACKGROUND_MAX]: a dark, muted colour
SATURATION_RANGE = (0.6, 1.0)  # the shape's colour in HSV: any hue, saturated and bright
VALUE_RANGE = (0.75, 1.0)
BAR_HALF_WIDTH = 0.3  # bars and cross arms: half-thickness as a fraction of r
SQUARE_HALF_SIDE = 0.85  # so a square does not look much bigger than a circle of the same r
RING_INNER = 0.5  # inner radius of the ring as a fraction of r


def _box(dx: torch.Tensor, dy: torch.Tensor, half_w: torch.Tensor, half_h: torch.Tensor) -> torch.Tensor:
    return torch.maximum(dx.abs() - half_w, dy.abs() - half_h)


def _triangle(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Upward isosceles triangle filling its (2r)^2 box: apex at the top centre, base along the bottom."""
    side = math.sqrt(5)  # the slanted edges have outward normals (+-2, -1) / sqrt(5), y pointing down
    return torch.stack([dy - r, (2 * dx - dy - r) / side, (-2 * dx - dy - r) / side]).amax(0)


# Signed distance in pixels (negative inside) of each class, from the offsets (dx, dy) to the centre and r.
SHAPES = {
    "circle": lambda dx, dy, r: torch.hypot(dx, dy) - r,
    "square": lambda dx, dy, r: _box(dx, dy, SQUARE_HALF_SIDE * r, SQUARE_HALF_SIDE * r),
    "triangle": _triangle,
    "cross": lambda dx, dy, r: torch.minimum(_box(dx, dy, r, BAR_HALF_WIDTH * r), _box(dx, dy, BAR_HALF_WIDTH * r, r)),
    "ring": lambda dx, dy, r: (torch.hypot(dx, dy) - (1 + RING_INNER) / 2 * r).abs() - (1 - RING_INNER) / 2 * r,
    "horizontal bar": lambda dx, dy, r: _box(dx, dy, r, BAR_HALF_WIDTH * r),
    "vertical bar": lambda dx, dy, r: _box(dx, dy, BAR_HALF_WIDTH * r, r),
    "diamond": lambda dx, dy, r: (dx.abs() + dy.abs() - r) / math.sqrt(2),
}
assert tuple(SHAPES) == CLASSES


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, generator=generator)


def _colours(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Background and shape colours (n, 3) in [0, 1]: a dark background, a bright shape (so it always stands out).

    A narrow colour distribution leaves the model's small capacity and short training to the shapes.
    """
    background = BACKGROUND_MAX * torch.rand(n, 3, generator=generator)
    hue = torch.rand(n, 1, generator=generator)
    saturation = _uniform(n, *SATURATION_RANGE, generator)
    value = _uniform(n, *VALUE_RANGE, generator)
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * hue) % 6  # HSV -> RGB, the (R, G, B) sectors
    shape = value * (1 - saturation * torch.minimum(k, 4 - k).clamp(0, 1))
    return background, shape


def draw_shapes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images (n, 3, 32, 32) in [-1, 1] and their class labels (n,)."""
    labels = torch.randint(len(CLASSES), (n,), generator=generator)
    r = torch.empty(n, 1, 1).uniform_(*SIZE_RANGE, generator=generator)
    cx = IMAGE_SIZE / 2 + JITTER * (2 * torch.rand(n, 1, 1, generator=generator) - 1)
    cy = IMAGE_SIZE / 2 + JITTER * (2 * torch.rand(n, 1, 1, generator=generator) - 1)
    pixel = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5  # pixel centres
    dx, dy = pixel[None, None, :] - cx, pixel[None, :, None] - cy  # (n, 1, W), (n, H, 1)
    dx, dy = dx.expand(n, IMAGE_SIZE, IMAGE_SIZE), dy.expand(n, IMAGE_SIZE, IMAGE_SIZE)
    sdf = torch.stack([f(dx, dy, r) for f in SHAPES.values()], dim=1)  # (n, classes, H, W)
    sdf = sdf[torch.arange(n), labels]  # (n, H, W)
    coverage = (0.5 - sdf).clamp(0, 1)[:, None]  # (n, 1, H, W): a one-pixel anti-aliased edge
    background, shape = _colours(n, generator)
    image = background[:, :, None, None] * (1 - coverage) + shape[:, :, None, None] * coverage
    return image * 2 - 1, labels


# ---- model and training --------------------------------------------------------------------------------

CONFIG = DiTConfig(num_layers=6, num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
                   patch_size=4, sample_size=IMAGE_SIZE, num_embeds_ada_norm=len(CLASSES))
SEED = 0
EVAL_SEED = 1  # a fixed held-out batch, drawn apart from the training stream
THREADS = 2
BATCH_SIZE = 32  # as many images per second as 64 on this CPU, twice the optimiser steps
LEARNING_RATE = 1e-3
WARMUP_STEPS = 200
FINAL_LR_FRACTION = 0.05  # the cosine decay ends at this fraction of the learning rate
EMA_DECAY = 0.999  # about the last 1000 steps: a few minutes of this run
LABEL_DROPOUT = 0.1
LOSS_SMOOTHING = 0.98  # the printed training loss is an exponential moving average
LOG_EVERY_S = 60.0
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


def learning_rate(step: int, progress: float) -> float:
    """Linear warmup, then a cosine decay over the fraction `progress` of the wall-clock budget."""
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    cosine = FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return LEARNING_RATE * warmup * cosine


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))  # average from the start, not from a random init
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    alphas_cumprod = DDIM(DDIMConfig(), 50).alphas_cumprod
    held_out = draw_shapes(EVAL_SIZE, torch.Generator().manual_seed(EVAL_SEED))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"dit-tiny: {n_params / 1e6:.2f}M trained parameters, {minutes:g} min budget, batch {BATCH_SIZE}", flush=True)

    budget, start, last_log = minutes * 60, time.monotonic(), 0.0
    step, smoothed = 0, None
    while (elapsed := time.monotonic() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, elapsed / budget)
        images, labels = draw_shapes(BATCH_SIZE, data)
        drop = torch.rand(BATCH_SIZE, generator=data) < LABEL_DROPOUT
        labels = labels.masked_fill(drop, CONFIG.num_embeds_ada_norm)  # the null class, for guidance
        loss = diffusion_loss(model, images, labels, alphas_cumprod, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, step)
        step += 1
        smoothed = loss.item() if smoothed is None else LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * loss.item()
        if elapsed - last_log >= LOG_EVERY_S:
            last_log = elapsed
            print(f"step {step:6d}  images {step * BATCH_SIZE:8d}  loss {smoothed:.4f}  "
                  f"ema held-out {evaluate(ema, held_out, alphas_cumprod):.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{elapsed / 60:5.1f} min", flush=True)

    stats = {"steps": step, "images": step * BATCH_SIZE, "minutes": (time.monotonic() - start) / 60,
             "loss": smoothed, "held_out": evaluate(ema, held_out, alphas_cumprod), "params": n_params}
    print(f"done: {stats['steps']} steps, {stats['images']} images, {stats['minutes']:.1f} min, "
          f"loss {stats['loss']:.4f}, EMA held-out loss {stats['held_out']:.4f}", flush=True)
    return ema.eval(), stats


# ---- export ----------------------------------------------------------------------------------------------

DIFFUSERS_VERSION = "0.12.0.dev0"  # what facebook/DiT-XL-2-256 was exported with
SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.02,
                    "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
                    "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}
MODEL_INDEX = {"_class_name": "DiTPipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
               "id2label": {str(i): name for i, name in enumerate(CLASSES)}}


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


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
- AdamW, lr {LEARNING_RATE:g}, no weight decay, {WARMUP_STEPS} warmup steps, cosine decay to
  {FINAL_LR_FRACTION:g}x over the wall-clock budget; EMA {EMA_DECAY} (exported); DiT's adaLN-Zero init\n  except the class table (std {CLASS_INIT_STD:g}); seed {SEED}.
- final training loss (smoothed) {stats['loss']:.4f}; EMA loss on a fixed held-out batch {stats['held_out']:.4f}.

## Limits

- Toy data, 32x32, patch {c.patch_size}: shapes and colours, nothing else; edges can be soft or blocky.
- Its attention statistics are those of a tiny model on trivial images, not those of DiT-XL/2 on ImageNet:
  use it to exercise the pipeline, not to draw conclusions about large DiTs.
- Training stops on wall-clock time, so a rerun on another machine sees a different number of images and
  does not reproduce these weights bit for bit.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train dit-tiny on procedural shapes and export it in the Hub layout.")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget (default 25)")
    parser.add_argument("--out", type=Path, default=Path("weights/dit-tiny"), help="export folder")
    args = parser.parse_args(argv)
    model, stats = train(args.minutes)
    command = "python -m minidit.train_tiny " + shlex.join(sys.argv[1:] if argv is None else argv)
    export(model, args.out, stats, command.strip())


if __name__ == "__main__":
    main()
