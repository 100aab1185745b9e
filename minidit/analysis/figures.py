"""Figures of a run directory: the study's per-layer grid, layer x transition heatmaps, run comparisons, samples.

    layer_grid(run, "l1", path)        one panel per layer, lines K, V, A (and F, --ffn) against transition d, one
                                       log y-range shared by every panel: the figure of Sun et al. (2024) and its tool
    heatmap(run, "l1", path)           K, V, A (F) side by side: layer (rows, 0 at top) x transition d, log colours
    compare(runs, labels, "l1", path)  runs of one model (step counts, schedulers) on the progress axis u in
                                       [0, 1], averaged over layers, with how alike their per-layer curves are
    sample_grid(images, labels, path)  generated images with their prompts
    write_figures(run, RUN/figures)    the standard set every analysis run writes

Every value drawn is the mean over prompts of a metric of ../design/analysis.md; bands are ±1 std over
prompts (population). Figures are built as `matplotlib.figure.Figure` objects, never through pyplot:
nothing is registered in a global figure list, so nothing stays open, and no GUI backend is needed.
"""

import contextlib
import gc
import math
import re
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator

from minidit.analysis.aggregate import METRICS, POOLED, Run
from minidit.analysis.rundir import atomic_file, make_folder
from minidit.errors import MiniditError

DPI = 120
COLORS = {"K": "tab:blue", "V": "tab:orange", "A": "tab:green", "F": "tab:purple"}
METRIC_LABELS = {
    "l1": "L1 = mean |X_d - X_d-1|",
    "rel_l1": "relative L1 = sum |X_d - X_d-1| / sum |X_d-1|",
    "mse": "MSE = mean (X_d - X_d-1)^2",
    "cos_dist": "cosine distance of X_d and X_d-1",
}
STANDARD_METRICS = ("l1", "rel_l1")  # the paper's metric, and the one caching methods threshold

# The per-layer grid: at most this many columns, each panel this size (inches).
MAX_COLUMNS = 8
PANEL_SIZE = (2.3, 1.55)
GRID_MARGINS = dict(left=0.75, right=0.2, top=1.05, bottom=0.6)  # inches: y label, title + legend, x label
MIN_GRID_WIDTH = 7.5  # inches, so that a grid of few layers still has room for its title
TITLE_SIZE, TITLE_LINE = 10.5, 0.22  # points; inches per extra title line
MISSING_COLOR = "0.85"  # heatmap cells with nothing to draw on a log scale (unrecorded, or zero)
SAMPLE_CELL_PX = 128  # tiny images are upscaled (nearest neighbour) to at least this many pixels a side
LOG_MARGIN = 1.25  # a log y-range reaches this factor beyond the extreme values
MAX_MARKED_POINTS = 30  # compare() marks the samples of curves with at most this many
FEW_TRANSITIONS = 12  # the grid marks the samples of runs with at most this many transitions
MAX_GROUP_ROWS = 3  # layer families that may each start a new row of the grid
HEATMAP_PANEL_WIDTH, COMPARE_PANEL_WIDTH = 14 / 3, 5.0  # inches per tensor panel of a heatmap, of a comparison


def default_branch(run: Run) -> str:
    """The pooled "all" (both CFG halves, as the study's tool measured) when guidance ran two branches."""
    return POOLED if POOLED in run.branches else "cond"


def panel_layers(run: Run, stream: str) -> list[int]:
    """The layers that have tokens of `stream` (a txt stream exists only in joint and cross layers)."""
    n = run.sums[0, :, run.streams.index(stream), 0, :, 0, 0]  # element counts [layer, tensor]
    return [li for li in range(len(run.layers)) if (n[li] > 0).any()]


def select(run: Run, metric: str, branch: str | None = None, stream: str | None = None
           ) -> tuple[str, str, np.ndarray, np.ndarray]:
    """Branch and stream resolved, with mean and std over prompts, each [layer, tensor, d] (NaN where unrecorded)."""
    if metric not in METRICS:
        raise MiniditError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    branch = branch or default_branch(run)
    stream = stream or "img"
    if branch not in run.branches:
        raise MiniditError(f"{run.path} has no branch {branch!r}: it has {', '.join(run.branches)}")
    if stream not in run.streams:
        raise MiniditError(f"{run.path} has no stream {stream!r}: it has {', '.join(run.streams)}")
    mean, std, _ = run.stats(metric)
    si, bi = run.streams.index(stream), run.branches.index(branch)
    return branch, stream, mean[:, si, bi], std[:, si, bi]


def layer_groups(run: Run, layers: list[int]) -> list[list[int]]:
    """Consecutive layers of one family: same kind, same capture of A, same module path up to block numbers
    (FLUX's 19 double-stream then 38 single-stream blocks; Latte's 28 spatial then 28 temporal)."""
    def key(li: int) -> tuple:
        layer = run.layers[li]
        return layer["kind"], layer.get("a_point"), re.sub(r"\d+", "#", layer["name"])

    groups: list[list[int]] = []
    for li in layers:
        if groups and key(groups[-1][-1]) == key(li):
            groups[-1].append(li)
        else:
            groups.append([li])
    return groups


def grid_layout(group_sizes: list[int]) -> tuple[int, int, list[tuple[int, int]]]:
    """(rows, columns, (row, column) of each panel): a landscape grid of at most MAX_COLUMNS columns.

    Alone: 6 -> 2 x 3, 24 -> 4 x 6, 28 -> 4 x 7, 30 -> 5 x 6, 42 -> 6 x 7, 48 -> 6 x 8, 57 -> 9 x 7.
    A few large groups each start a row when that costs at most one row: FLUX [19, 38] -> 9 x 7,
    Latte [28, 28] -> 8 x 7.
    """
    n = sum(group_sizes)
    target = min(MAX_COLUMNS, n, math.ceil(math.sqrt(1.6 * n)))
    cols = min((c for c in (target, target - 1) if c >= 1), key=lambda c: (-n % c, -c))
    rows = math.ceil(n / cols)
    if 1 < len(group_sizes) <= MAX_GROUP_ROWS:
        def cost(c: int) -> tuple[int, int]:
            r = sum(math.ceil(g / c) for g in group_sizes)
            return r, r * c - n

        grouped = min((c for c in (cols, cols - 1) if c >= 1), key=cost)
        if cost(grouped)[0] <= rows + 1:
            cells = [(sum(math.ceil(g / grouped) for g in group_sizes[:k]) + i // grouped, i % grouped)
                     for k, g in enumerate(group_sizes) for i in range(g)]
            return cost(grouped)[0], grouped, cells
    return rows, cols, [divmod(i, cols) for i in range(n)]


def title_lines(parts: list[str], width_in: float, fontsize: float) -> str:
    """Join title parts with " · ", breaking lines so the text fits `width_in` inches."""
    chars = int(width_in * 72 / (0.58 * fontsize))  # an average character is ~0.58 em wide
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 3 + len(part) <= chars:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return "\n".join(lines)


def step_ticks(first: int, last: int) -> np.ndarray:
    """Round transitions to label, plus the first one: sampling starts at the left edge."""
    ticks = MaxNLocator(nbins=4, steps=[1, 2, 5, 10], integer=True).tick_values(first, last)
    ticks = ticks[(ticks > first + 0.15 * (last - first)) & (ticks <= last)]
    return np.concatenate([[first], ticks])


def positive_extent(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of the positive finite values: all a log scale can show. (0.1, 10) when there are none."""
    v = values[np.isfinite(values) & (values > 0)]
    return (float(v.min()), float(v.max())) if v.size else (0.1, 10.0)


def log_range(values: np.ndarray) -> tuple[float, float]:
    """A log-axis range covering every positive finite value, with a margin."""
    lo, hi = positive_extent(values)
    return lo / LOG_MARGIN, hi * LOG_MARGIN


def log_ticks(lo: float, hi: float) -> np.ndarray:
    """Decades inside [lo, hi]; 1-2-5 steps when the range holds fewer than two decades."""
    for subs in ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0)):
        ticks = LogLocator(subs=subs, numticks=8).tick_values(lo, hi)
        ticks = ticks[(ticks >= lo) & (ticks <= hi)]
        if len(ticks) >= 2:
            return ticks
    return np.array([lo, hi])


def power_of_ten(value: float, _=None) -> str:
    """10^k, or m×10^k, in mathtext."""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10 ** exponent
    if abs(mantissa - 1) < 1e-6:
        return f"$10^{{{exponent}}}$"
    return f"${mantissa:.2g}{{\\times}}10^{{{exponent}}}$"


def describe(run: Run, metric: str, branch: str, stream: str) -> list[str]:
    """The parts of a figure title: what was run, and what is drawn."""
    m = run.manifest
    return [m["model"], f"{m['scheduler']['name']}, {m['steps']} steps", f"{len(run.prompt_indices)} prompts",
            f"branch {branch_label(branch)}", f"stream {stream}", METRIC_LABELS[metric]]


def kind_label(layer: dict) -> str:
    """"self", "joint", ..., marked where A is taken before the output projection (FLUX single-stream blocks)."""
    return layer["kind"] + (" (A pre-proj)" if layer.get("a_point") == "pre_proj" else "")


def branch_label(branch: str) -> str:
    return "all (cond + uncond pooled)" if branch == POOLED else branch


# ---------------------------------------------------------------------------------------------------------------
# The study's figure: one panel per layer


def layer_grid_figure(run: Run, metric: str, branch: str | None = None, stream: str | None = None) -> Figure:
    """The per-layer grid as a Figure. Every panel has the same y-limits (`ax.get_ylim()`), set from the means."""
    branch, stream, mean, std = select(run, metric, branch, stream)
    layers = panel_layers(run, stream)
    if not layers:
        raise MiniditError(f"{run.path} recorded no {stream} tokens in any layer")
    d = run.transitions
    ylim = log_range(mean[layers])
    groups = layer_groups(run, layers)
    rows, cols, cells = grid_layout([len(g) for g in groups])
    m = GRID_MARGINS
    width = max(cols * PANEL_SIZE[0] + m["left"] + m["right"], MIN_GRID_WIDTH)
    title = title_lines(describe(run, metric, branch, stream), width - 0.4, TITLE_SIZE)
    top = m["top"] + TITLE_LINE * title.count("\n")
    height = rows * PANEL_SIZE[1] + top + m["bottom"]
    fig = Figure(figsize=(width, height), dpi=DPI)
    grid = fig.add_gridspec(rows, cols, left=m["left"] / width, right=1 - m["right"] / width,
                            bottom=m["bottom"] / height, top=1 - top / height, wspace=0.08, hspace=0.32)
    # Limits and ticks are set on every panel rather than through shared axes: the same range, at a
    # fraction of matplotlib's cost for 57 panels (tick objects dominate the drawing time).
    yticks, xticks = log_ticks(*ylim), step_ticks(d[0], d[-1])
    few = len(d) <= FEW_TRANSITIONS  # then mark the samples, and keep the markers off the frame
    xlim = (d[0] - 0.5, d[-1] + 0.5) if few else (d[0], d[-1])
    bottom_of_column = {c: max(r for r, c2 in cells if c2 == c) for c in range(cols)}
    for i, li in enumerate(layers):
        r, c = cells[i]
        ax = fig.add_subplot(grid[r, c])
        missing, zero = [], []  # tensors this layer does not record in this stream, or that never change
        for ti, tensor in enumerate(run.tensors):
            y, s = mean[li, ti], std[li, ti]
            if not np.isfinite(y).any():
                missing.append(tensor)
                continue
            if not (y > 0).any():
                zero.append(tensor)
                continue
            ax.fill_between(d, np.maximum(y - s, ylim[0]), y + s, color=COLORS[tensor], alpha=0.15, lw=0)
            ax.plot(d, np.where(y > 0, y, np.nan), color=COLORS[tensor], lw=1.2,
                    marker="o" if few else None, ms=2.5)
        ax.set_yscale("log")
        ax.set_ylim(*ylim)
        ax.set_xlim(*xlim)
        ax.yaxis.set_major_locator(FixedLocator(yticks))
        ax.yaxis.set_major_formatter(FuncFormatter(power_of_ten))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(FixedLocator(xticks))
        ax.tick_params(labelsize=7.5, pad=1.5, labelleft=c == 0, labelbottom=r == bottom_of_column[c])
        ax.grid(True, which="major", color="0.9", lw=0.6)
        # A fixed title y skips matplotlib's automatic title placement, which is slow for many panels.
        ax.set_title(f"{li} {kind_label(run.layers[li])}", fontsize=8.5, pad=2.5, y=1)
        notes = ([f"{', '.join(zero)} = 0"] if zero else []) + ([f"no {', '.join(missing)}"] if missing else [])
        if notes:
            ax.text(0.03, 0.05, "; ".join(notes), transform=ax.transAxes, fontsize=7, color="0.35")
    fig.supxlabel("transition d (step d-1 -> d; sampling starts at the left)", fontsize=10,
                  y=0.25 * m["bottom"] / height)
    fig.supylabel(f"{metric} (log)", fontsize=10, x=0.2 * m["left"] / width)
    fig.suptitle(title, fontsize=TITLE_SIZE, y=1 - 0.12 / height, va="top")
    handles = [Line2D([], [], color=COLORS[t], lw=1.6, label=t) for t in run.tensors]
    handles.append(Patch(color="0.5", alpha=0.3, label="±1 std over prompts"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 1 - (0.2 + TITLE_LINE * (title.count("\n") + 1)) / height))
    return fig


def layer_grid(run: Run, metric: str, out_path: str | Path, branch: str | None = None,
               stream: str | None = None) -> list[Path]:
    """Write the per-layer grid of one stream (default "img"; call again with "txt" for joint models)."""
    with _collector_paused():
        return [_save(layer_grid_figure(run, metric, branch, stream), out_path)]


# ---------------------------------------------------------------------------------------------------------------
# Layer x transition heatmaps


def heatmap_figure(run: Run, metric: str, branch: str | None = None, stream: str | None = None) -> Figure:
    """K, V, A (and F) panels of the mean metric, layer 0 at the top; grey cells are unrecorded or zero.

    Each panel has its own colour range (K, V, A and F differ in scale); white lines separate layer families.
    """
    branch, stream, mean, _ = select(run, metric, branch, stream)
    n_layers, d = len(run.layers), run.transitions
    groups = layer_groups(run, list(range(n_layers)))
    height = max(3.4, 0.11 * n_layers + 1.8)
    width = HEATMAP_PANEL_WIDTH * len(run.tensors)
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(run.tensors), sharey=True)
    extent = (d[0] - 0.5, d[-1] + 0.5, n_layers - 0.5, -0.5)  # layer 0 at the top
    for ax, (ti, tensor) in zip(axes, enumerate(run.tensors)):
        values = mean[:, ti]
        image = np.ma.masked_where(~(np.isfinite(values) & (values > 0)), values)
        cmap = colormaps["viridis"].with_extremes(bad=MISSING_COLOR)
        im = ax.imshow(image, aspect="auto", interpolation="nearest", extent=extent, cmap=cmap,
                       norm=LogNorm(*positive_extent(values)))
        for group in groups[1:]:
            ax.axhline(group[0] - 0.5, color="white", lw=1.5)
        ax.set_title(tensor, fontsize=11)
        ax.set_xlabel("transition d (step d-1 -> d)", fontsize=9)
        ax.xaxis.set_major_locator(FixedLocator(step_ticks(d[0], d[-1])))
        ax.tick_params(labelsize=8)
        fig.colorbar(im, ax=ax, shrink=0.95, pad=0.01, aspect=30).ax.tick_params(labelsize=8)
    axes[0].set_ylabel("layer", fontsize=9)
    axes[0].yaxis.set_major_locator(MaxNLocator(nbins=12, steps=[1, 2, 5, 10], integer=True))
    families = " · ".join((f"{g[0]}" if len(g) == 1 else f"{g[0]}-{g[-1]}") + " " + kind_label(run.layers[g[0]])
                          for g in groups)
    fig.suptitle(title_lines(describe(run, metric, branch, stream) + [f"layers {families}"], width - 0.5, TITLE_SIZE)
                 + "\n(log colour scale; grey: not recorded, or zero)", fontsize=TITLE_SIZE)
    return fig


def heatmap(run: Run, metric: str, out_path: str | Path, branch: str | None = None,
            stream: str | None = None) -> list[Path]:
    with _collector_paused():
        return [_save(heatmap_figure(run, metric, branch, stream), out_path)]


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs of one model on the progress axis u


def curve_similarity(u_ref: np.ndarray, ref: np.ndarray, u_other: np.ndarray, other: np.ndarray
                     ) -> tuple[float, float, int]:
    """How alike two runs' per-layer curves are, as functions of u.

    ref [layer, d_ref] and other [layer, d_other] are sampled at u_ref and u_other. Each layer's log10
    curve is interpolated linearly onto the union of both sample sets inside the overlapping u range.
    Returns (pearson_log, mean_abs_log10_ratio, n_layers): the Pearson correlation of the two log curves
    averaged over layers (the shape; blind to a constant factor, such as the larger per-transition change
    of a run with fewer steps), the mean |log10(other / ref)| over layers and grid points (the level), and
    the number of layers used. A layer with a non-positive value, or a flat curve whose correlation is
    undefined, is left out.
    """
    lo, hi = max(u_ref[0], u_other[0]), min(u_ref[-1], u_other[-1])
    grid = np.union1d(u_ref, u_other)
    grid = grid[(grid >= lo - 1e-12) & (grid <= hi + 1e-12)]
    pearsons, ratios = [], []
    for a, b in zip(ref, other):
        if grid.size < 3 or not (np.all(a > 0) and np.all(b > 0)):  # NaN fails `> 0` too
            continue
        x, y = np.interp(grid, u_ref, np.log10(a)), np.interp(grid, u_other, np.log10(b))
        dx, dy = x - x.mean(), y - y.mean()
        norm = math.sqrt(float(dx @ dx) * float(dy @ dy))
        if norm == 0:
            continue
        pearsons.append(float(dx @ dy) / norm)
        ratios.append(float(np.abs(y - x).mean()))
    if not pearsons:
        return float("nan"), float("nan"), 0
    return float(np.mean(pearsons)), float(np.mean(ratios)), len(pearsons)


def layer_average(curves: np.ndarray) -> np.ndarray:
    """Mean over layers [layer, d] -> [d] of the recorded (finite) values; NaN where no layer has one."""
    finite = np.isfinite(curves)
    with np.errstate(invalid="ignore"):
        return np.where(finite, curves, 0).sum(axis=0) / finite.sum(axis=0)


def compare(runs: list[Run], labels: list[str], metric: str, out_path: str | Path, branch: str | None = None,
            stream: str = "img") -> list[dict]:
    """Overlay runs of one model on u = d / (N-1) and measure how alike their curves are.

    For step-count and scheduler ablations (FLUX at 14/28/56 steps, DDIM against DPM-Solver, ...). The
    figure has one panel per tensor every run recorded (K, V and A; F too when all have it) with one line per
    run: the metric averaged over layers against u. The numbers (legend, and the returned rows) compare every
    run with the first, per tensor and layer by layer (see `curve_similarity`): {"reference", "run", "tensor",
    "metric", "pearson_log", "mean_abs_log10_ratio", "n_layers"}.

    Runs must have the same layers. Runs of different models are refused even for the layer-averaged
    curves: K, V and A have each model's own scale and capture points, so an overlay of two models'
    averages would invite reading a difference of models as a difference of redundancy; draw each
    model's `layer_grid` instead.
    """
    if len(runs) < 2 or len(runs) != len(labels):
        raise MiniditError(f"compare needs two or more runs and one label per run; got {len(runs)} runs and "
                           f"{len(labels)} labels")
    ref_layers = [(layer["name"], layer["kind"]) for layer in runs[0].layers]
    for run, label in zip(runs[1:], labels[1:]):
        layers = [(layer["name"], layer["kind"]) for layer in run.layers]
        if layers != ref_layers:
            raise MiniditError(
                f"cannot compare {labels[0]!r} ({runs[0].manifest['model']}, {len(ref_layers)} layers) with "
                f"{label!r} ({run.manifest['model']}, {len(layers)} layers): their attention layers differ, and "
                f"comparing different models layer by layer is meaningless. Compare runs of one model (step "
                f"counts, schedulers, guidance), and draw each model's layer_grid separately")
    branch = branch or (POOLED if all(POOLED in run.branches for run in runs) else "cond")
    picked = [select(run, metric, branch, stream) for run in runs]
    layers = panel_layers(runs[0], stream)
    if not layers:
        raise MiniditError(f"{runs[0].path} recorded no {stream} tokens in any layer")
    tensors = [t for t in runs[0].tensors if all(t in run.tensors for run in runs)]
    rows = []
    fig = Figure(figsize=(COMPARE_PANEL_WIDTH * len(tensors), 5.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(tensors), sharey=True)
    for ax, tensor in zip(axes, tensors):
        ref_curves = picked[0][2][layers, runs[0].tensors.index(tensor)]
        for k, (run, label, (_, _, mean, _)) in enumerate(zip(runs, labels, picked)):
            curves = mean[layers, run.tensors.index(tensor)]
            text = f"{label}: {run.manifest['scheduler']['name']}, {run.manifest['steps']} steps"
            if k == 0:
                text += " (reference)"
            else:
                r, ratio, n = curve_similarity(runs[0].u, ref_curves, run.u, curves)
                rows.append({"reference": labels[0], "run": label, "tensor": tensor, "metric": metric,
                             "pearson_log": r, "mean_abs_log10_ratio": ratio, "n_layers": n})
                text += f": r_log {r:.4f}, |log10 ratio| {ratio:.3f}"
            average = layer_average(curves)
            ax.plot(run.u, np.where(average > 0, average, np.nan), marker="o" if run.u.size <= MAX_MARKED_POINTS
                    else None, ms=3, lw=1.4, label=text)
        ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.set_title(tensor, fontsize=11)
        ax.set_xlabel("progress u = d / (N-1)", fontsize=9)
        ax.grid(True, which="major", color="0.9", lw=0.6)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    axes[0].set_ylabel(f"{metric}, mean over {len(layers)} layers (log)", fontsize=9)
    models = " / ".join(dict.fromkeys(run.manifest["model"] for run in runs))
    fig.suptitle(f"{models} · {METRIC_LABELS[metric]} · branch {branch_label(branch)} · stream {stream}\n"
                 f"against the reference, per layer on the shared u range, then averaged over layers: r_log = Pearson "
                 f"correlation of the log10 curves (shape), |log10 ratio| = mean |log10(run / reference)| (level)",
                 fontsize=10)
    _save(fig, out_path)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Generated images


def sample_grid(images: list[np.ndarray], labels: list[str], out_path: str | Path,
                columns: int | None = None) -> list[Path]:
    """uint8 (H, W, 3) images in a grid (`columns` wide, or as the layer grids are laid out), each label under its
    image; small images upscaled by an integer factor.

    The pixels are placed 1:1 (`figimage`), so upscaled 32 x 32 samples show their exact pixels.
    """
    if not images or len(images) != len(labels):
        raise MiniditError(f"sample_grid needs one label per image; got {len(images)} images, {len(labels)} labels")
    for i, im in enumerate(images):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise MiniditError(f"image {i} is {im.dtype} {im.shape}: expected uint8 (H, W, 3)")
    scaled = [np.repeat(np.repeat(im, f, 0), f, 1)
              for im in images for f in [max(1, math.ceil(SAMPLE_CELL_PX / min(im.shape[:2])))]]
    cell_h, cell_w = max(im.shape[0] for im in scaled), max(im.shape[1] for im in scaled)
    if columns is None:
        rows, cols, _ = grid_layout([len(images)])
    else:
        cols = min(columns, len(images))
        rows = math.ceil(len(images) / cols)
    pad, label_h = 8, 40  # pixels
    width, height = cols * (cell_w + pad) + pad, rows * (cell_h + label_h + pad) + pad
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    chars = max(8, int(cell_w / 6.5))  # about 6.5 px per character at 8 pt
    for i, (im, label) in enumerate(zip(scaled, labels)):
        r, c = divmod(i, cols)
        x0 = pad + c * (cell_w + pad)
        top = height - pad - r * (cell_h + label_h + pad)  # figimage counts pixels from the bottom
        fig.figimage(im, xo=x0 + (cell_w - im.shape[1]) // 2, yo=top - im.shape[0], origin="upper")
        text = "\n".join(textwrap.wrap(label, chars, max_lines=2, placeholder="...")) or " "
        fig.text((x0 + cell_w / 2) / width, (top - im.shape[0] - 4) / height, text, ha="center", va="top", fontsize=8)
    return [_save(fig, out_path)]


# ---------------------------------------------------------------------------------------------------------------
# The standard set


def write_figures(run: Run, out_dir: str | Path) -> list[Path]:
    """Grid and heatmap of "l1" and "rel_l1" per stream with tokens, for the default branch, into RUN/figures/.

    Other branches and metrics: call `layer_grid` and `heatmap` with `branch=` ("cond", "uncond") and a metric.
    """
    out_dir = Path(out_dir)
    make_folder(out_dir)
    branch = default_branch(run)
    written = []
    for metric in STANDARD_METRICS:
        for stream in run.streams:
            if not panel_layers(run, stream):
                continue
            name = f"{metric}_{stream}_{branch}.png"
            written += layer_grid(run, metric, out_dir / f"grid_{name}", branch, stream)
            written += heatmap(run, metric, out_dir / f"heatmap_{name}", branch, stream)
    return written


@contextlib.contextmanager
def _collector_paused():
    """Build and draw without the cyclic garbage collector: a 57-panel figure allocates some 10^5 objects,
    and the collector would scan the whole heap (torch included) many times over; this halves the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _save(fig: Figure, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    make_folder(out_path.parent)
    with atomic_file(out_path) as f:  # a failed write leaves no half-written image
        fig.savefig(f, format=out_path.suffix.lstrip(".") or None, dpi=DPI, facecolor="white")
    return out_path
