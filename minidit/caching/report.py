"""Does a caching plan pay? Each plan against the uncached sampler, on the same prompts and seeds, in one process.

    report = evaluate(recipe, plans, prompts, seeds, guidance=..., batch_size=...)   # -> list of Row
    write_report(report, out)    # report.json, report.csv, report.md (the table) and quality_vs_speedup.png

What is measured, per plan (and for the uncached sampler, the first row):
- wall time: every batch is sampled uncached and with every plan, one after the other, the order rotated from
  batch to batch; on an accelerator each time ends with a synchronisation. speedup = uncached time / plan time,
  over the whole command. The prompts' text encodings are computed once before (`recipe.prepare`, as the analysis
  does), and a warm-up batch, uncached and with every plan, is sampled first; neither is timed.
- FLOPs skipped: the floating-point operations of one batch counted by torch.utils.flop_counter (matmuls,
  convolutions, attention) with and without the plan: what the skipped calls really saved, the block's norms,
  embeddings and final layer included in the total. `calls skipped` is what the plan's modules counted.
- extra memory: the largest total of the outputs a plan keeps for later reuse, at once (cache.py).
- quality against the uncached sample of the same prompt and seed: the final latents' relative error
  ||x - x_ref|| / ||x_ref|| (mean and worst over samples); where the model decodes, PSNR (of the mean squared
  error over all samples' pixels, on the uint8 images: inf when every image is identical) and SSIM (Wang et al.
  2004: 11 x 11 Gaussian window of sigma 1.5, per channel, mean over samples, frames of a video as images);
  for the embedded models, their accuracy check: flux-tiny's caption accuracy and dit-tiny's class accuracy
  (the shape read by minidit/tiny/accuracy.py's detector is the label's), for the uncached samples and each plan's.
"""

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minidit.caching.cache import PlanCache
from minidit.caching.plan import Plan

UNCACHED = "uncached"


@dataclass
class Row:
    """One plan's results (or the uncached sampler's, method "uncached")."""

    name: str  # the plan file's stem, or "uncached"
    method: str
    budget: float
    skipped_fraction: float  # the plan's own accounting (plan.py)
    flops_skipped: float  # measured: 1 - FLOPs with the plan / FLOPs without, on one batch
    attn_calls_skipped: float  # of the attention modules' calls
    ffn_calls_skipped: float
    seconds: float  # wall time of all samples
    speedup: float
    extra_mb: float
    rel_err_mean: float
    rel_err_max: float
    psnr: float | None
    ssim: float | None
    accuracy: float | None
    samples: int = 0  # (prompt, seed) pairs sampled


def evaluate(recipe, model_name: str, plans: dict[str, Plan], prompts: list[str], seeds: list[int], *,
             scheduler_name: str, guidance: float, batch_size: int = 1, progress: bool = True) -> list[Row]:
    """Sample every (prompt, seed) uncached and with each plan (module docstring); one Row per plan, uncached
    first."""
    steps = next(iter(plans.values())).steps
    layers = recipe.attention_layers()
    caches = {name: PlanCache(recipe.model, layers, plan) for name, plan in plans.items()}
    configs = [UNCACHED, *plans]
    batches = [(prompts[i:i + batch_size], seed) for seed in seeds for i in range(0, len(prompts), batch_size)]

    def run(config: str, batch: list[str], seed: int) -> torch.Tensor:
        scheduler = recipe.make_scheduler(scheduler_name, steps)
        if config == UNCACHED:
            return recipe.generate(batch, seed, scheduler, guidance)
        with caches[config].sampling():
            return recipe.generate(batch, seed, scheduler, guidance)

    recipe.prepare(prompts)  # the prompts' text encodings, once, before any timing (the plans do not change them)
    for config in configs:  # warm-up, not timed
        run(config, *batches[0])
    flops = {config: count_flops(lambda: run(config, *batches[0])) for config in configs}
    for cache in caches.values():  # count the timed samples' calls only
        cache.reset_counts()
    seconds = dict.fromkeys(configs, 0.0)
    latents: dict[str, list[torch.Tensor]] = {config: [] for config in configs}
    for b, (batch, seed) in enumerate(tqdm(batches, desc="sampling", disable=None if progress else True)):
        for config in configs[b % len(configs):] + configs[:b % len(configs)]:
            sync(recipe.device)
            start = time.perf_counter()
            out = run(config, batch, seed)
            sync(recipe.device)
            seconds[config] += time.perf_counter() - start
            latents[config].append(out.float().cpu())
    latents = {config: torch.cat(parts) for config, parts in latents.items()}
    texts = [p for batch, _ in batches for p in batch]
    images = {config: decode_all(recipe, x, batch_size) for config, x in latents.items()} if recipe.decodes else {}
    check = ACCURACY.get(model_name)
    rows = []
    for config in configs:
        plan, cache = plans.get(config), caches.get(config)
        err = rel_errors(latents[config], latents[UNCACHED])
        pictures = images.get(config)
        rows.append(Row(
            name=config, method=plan.method if plan else UNCACHED, budget=plan.budget if plan else 0.0,
            skipped_fraction=plan.skipped_fraction() if plan else 0.0,
            flops_skipped=1 - flops[config] / flops[UNCACHED],
            attn_calls_skipped=cache.skipped_share()["attn"] if cache else 0.0,
            ffn_calls_skipped=cache.skipped_share()["ffn"] if cache else 0.0,
            seconds=seconds[config], speedup=seconds[UNCACHED] / seconds[config],
            extra_mb=cache.peak_kept_bytes / 2**20 if cache else 0.0,
            rel_err_mean=float(err.mean()), rel_err_max=float(err.max()),
            psnr=psnr(pictures, images[UNCACHED]) if pictures is not None else None,
            ssim=ssim(pictures, images[UNCACHED]) if pictures is not None else None,
            accuracy=float(check(recipe, texts, pictures).mean()) if check and pictures is not None else None,
            samples=len(texts)))
    return rows


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def decode_all(recipe, latents: torch.Tensor, batch_size: int) -> np.ndarray:
    """uint8 images (N, H, W, 3), a video's frames as images, decoded `batch_size` at a time."""
    parts = [recipe.decode(latents[i:i + batch_size].to(recipe.device, recipe.dtype))
             for i in range(0, len(latents), batch_size)]
    images = np.concatenate(parts)
    return images.reshape(-1, *images.shape[-3:])


def rel_errors(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Per sample, ||x - ref|| / ||ref|| in float64."""
    x, ref = x.double().flatten(1), ref.double().flatten(1)
    return ((x - ref).norm(dim=1) / ref.norm(dim=1)).numpy()


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 images against the reference, from the mean squared error over all pixels."""
    mse = float(((images.astype(np.float64) - reference.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def ssim(images: np.ndarray, reference: np.ndarray) -> float:
    """The mean SSIM of uint8 images (N, H, W, 3) against the reference (Wang et al. 2004, on the 0-255 scale)."""
    x = torch.from_numpy(images).double().permute(0, 3, 1, 2)
    y = torch.from_numpy(reference).double().permute(0, 3, 1, 2)
    channels = x.shape[1]
    g = torch.exp(-((torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2) ** 2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:  # the window's weighted mean at every valid position
        return F.conv2d(t, window, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean(dim=(1, 2, 3)).mean())


# ---- the embedded models' accuracy checks ------------------------------------------------------------------------

def caption_correct(recipe, prompts: list[str], images: np.ndarray) -> np.ndarray:
    """flux-tiny: colour, shape and background all read as the caption says (minidit/tiny/accuracy.py)."""
    from minidit.tiny.accuracy import detect
    from minidit.tiny.shapes import parse_caption

    expected = torch.tensor([parse_caption(p) for p in prompts])
    return (detect(images).parts == expected).all(1).numpy()


def class_correct(recipe, prompts: list[str], images: np.ndarray) -> np.ndarray:
    """dit-tiny: the shape read by the detector is the class's (its colours and backgrounds are not named)."""
    from minidit.tiny.accuracy import detect

    labels = torch.tensor([recipe.parse_prompt(p) for p in prompts])
    return (detect(images).parts[:, 1] == labels).numpy()


ACCURACY = {"flux-tiny": caption_correct, "dit-tiny": class_correct}


# ---- writing it ----------------------------------------------------------------------------------------------

def markdown(rows: list[Row]) -> str:
    """The table as the README shows it: a row per plan in the order given, the lowest mean latent error of each
    budget in bold."""
    def number(value, fmt: str) -> str:
        return "–" if value is None else ("identical" if value == math.inf else format(value, fmt))

    head = ("| plan | budget | skipped (plan) | FLOPs skipped | speed-up | extra MB | latent rel. error (mean / max) "
            "| PSNR dB | SSIM | accuracy |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    best = {}  # per budget, the lowest mean latent error among the plans: in bold
    for r in rows[1:]:
        best[r.budget] = min(best.get(r.budget, math.inf), r.rel_err_mean)
    for r in rows:
        err = f"{r.rel_err_mean:.4f}"
        err = f"**{err}**" if r.method != UNCACHED and r.rel_err_mean == best[r.budget] and r.budget > 0 else err
        lines.append(f"| {r.name} | {r.budget:.2f} | {r.skipped_fraction:.1%} | {r.flops_skipped:.1%} | "
                     f"{r.speedup:.2f}x | {r.extra_mb:.1f} | {err} / {r.rel_err_max:.4f} | "
                     f"{number(r.psnr, '.1f')} | {number(r.ssim, '.4f')} | {number(r.accuracy, '.1%')} |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[Row], out: Path, context: dict) -> list[Path]:
    """report.json (the rows and what was sampled), report.csv, report.md and quality_vs_speedup.png in `out`."""
    from minidit.analysis.rundir import atomic_file, make_folder

    make_folder(out)
    with atomic_file(out / "report.json", text=True, encoding="utf-8") as f:
        json.dump({**context, "rows": [asdict(r) for r in rows]}, f, indent=1, default=str)
    with atomic_file(out / "report.csv", text=True, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    with atomic_file(out / "report.md", text=True, encoding="utf-8") as f:
        f.write(markdown(rows))
    figure(rows, out / "quality_vs_speedup.png", title=context.get("title", ""))
    return [out / name for name in ("report.json", "report.csv", "report.md", "quality_vs_speedup.png")]


METHOD_STYLE = {"measured": ("C3", "o"), "measured-cells": ("C4", "v"), "fora": ("C0", "s"), "pab": ("C2", "^"),
                "smoothcache": ("C1", "D")}


def figure(rows: list[Row], path: Path, title: str = "") -> Path:
    """Quality against measured speed-up: the latent error, and the accuracy check (or PSNR) where there is one;
    one line per method through its budgets, each point labelled with the plan's skipped fraction."""
    from matplotlib.figure import Figure

    second = "accuracy" if any(r.accuracy is not None for r in rows) else "psnr"
    has_second = any(getattr(r, second) is not None for r in rows)
    fig = Figure(figsize=(11 if has_second else 6, 4.5), dpi=120)
    axes = fig.subplots(1, 2 if has_second else 1, squeeze=False)[0]
    base = rows[0]
    panels = [("rel_err_mean", "final-latent relative error (mean over samples)", True)]
    if has_second:
        panels.append((second, "accuracy check" if second == "accuracy" else "PSNR (dB)", False))
    methods = list(dict.fromkeys(r.method for r in rows[1:]))
    for ax, (field, label, log) in zip(axes, panels):
        for method in methods:
            points = sorted((r for r in rows[1:] if r.method == method), key=lambda r: r.skipped_fraction)
            points = [r for r in points if getattr(r, field) is not None and math.isfinite(getattr(r, field))
                      and (not log or getattr(r, field) > 0)]
            if not points:
                continue
            colour, marker = METHOD_STYLE.get(method, ("C7", "x"))
            ax.plot([r.speedup for r in points], [getattr(r, field) for r in points], color=colour, marker=marker,
                    label=method)
            for r in points:
                ax.annotate(f"{r.skipped_fraction:.2f}", (r.speedup, getattr(r, field)), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=colour)
        if getattr(base, field) is not None and not log:
            ax.axhline(getattr(base, field), color="k", lw=0.8, ls="--", label="uncached")
            if field == "accuracy" and base.samples:  # how far an accuracy moves by chance over this many samples
                se = math.sqrt(base.accuracy * (1 - base.accuracy) / base.samples)
                ax.axhspan(base.accuracy - 2 * se, base.accuracy + 2 * se, color="0.85", zorder=0,
                           label=f"uncached ± 2 s.e. ({base.samples} samples)")
        ax.axvline(1.0, color="0.6", lw=0.6)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("speed-up (wall time, uncached / plan)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "caching plans: quality against speed-up (labels: skipped fraction of block computations)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


__all__ = ["Row", "evaluate", "figure", "markdown", "psnr", "ssim", "write_report"]
