"""From per-prompt sums to metrics, across-prompt statistics, `summary.csv` and `cv.csv`.

Per prompt and cell (layer, stream, branch, tensor, transition) the four metrics come from the sums:

    l1 = s_abs / n      rel_l1 = s_abs / s_prev      mse = s_sq / n      cos_dist = 1 - s_dot / sqrt(s_cur2 s_prev2)

Across prompts, per cell and metric: mean, population std (ddof 0) and cv = std / mean. Every prompt
counts. When the run used guidance, a pooled branch "all" (both halves' sums added, as the study's
tool measured) is derived exactly beside "cond" and "uncond".
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minidit.analysis.recorder import TENSORS
from minidit.analysis.rundir import RunDir, atomic_file

METRICS = ("l1", "rel_l1", "mse", "cos_dist")
POOLED = "all"


def derive(sums: np.ndarray) -> dict[str, np.ndarray]:
    """The four metrics of sums [..., 7]; cells with no elements (n = 0) give NaN."""
    n, s_abs, s_prev, s_sq, s_dot, s_cur2, s_prev2 = np.moveaxis(sums, -1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "l1": np.where(n > 0, s_abs / n, np.nan),
            "rel_l1": np.where(n > 0, s_abs / s_prev, np.nan),
            "mse": np.where(n > 0, s_sq / n, np.nan),
            "cos_dist": np.where(n > 0, 1 - s_dot / np.sqrt(s_cur2 * s_prev2), np.nan),
        }


@dataclass
class Run:
    """A run directory read back as arrays. Axes of `sums`: [prompt, layer, stream, branch, tensor, d, 7]."""

    path: Path
    manifest: dict
    prompt_indices: list[int]
    sums: np.ndarray
    branches: tuple[str, ...]  # the recorded branches, plus "all" when there are two

    @property
    def layers(self) -> list[dict]:
        return self.manifest["layers"]

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(self.manifest["streams"])

    @property
    def tensors(self) -> tuple[str, ...]:
        """The record's tensor axis: K, V, A, and F when the run recorded it (--ffn)."""
        return tuple(self.manifest.get("tensors", TENSORS))

    @property
    def transitions(self) -> np.ndarray:
        """d = 1 .. N-1"""
        return np.arange(1, self.manifest["steps"])

    @property
    def u(self) -> np.ndarray:
        """Normalised progress d / (N - 1): 0 is the start of sampling, 1 its end."""
        return self.transitions / (self.manifest["steps"] - 1)

    @property
    def t(self) -> np.ndarray:
        return np.asarray(self.manifest["timesteps"], dtype=float)[1:]

    @property
    def sigma(self) -> np.ndarray:
        return np.asarray(self.manifest["sigmas"], dtype=float)[1:]

    @property
    def present(self) -> np.ndarray:
        """Which cells were recorded (n > 0), [layer, stream, branch, tensor]."""
        return self.sums[0, ..., 0, 0] > 0

    def metric(self, name: str) -> np.ndarray:
        """Per-prompt metric [prompt, layer, stream, branch, tensor, d]."""
        return derive(self.sums)[name]

    def stats(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Across prompts: mean, std (ddof 0), cv, each [layer, stream, branch, tensor, d]."""
        values = self.metric(name)
        mean, std = values.mean(axis=0), values.std(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = np.where(mean != 0, std / mean, np.nan)
        return mean, std, cv


def read_run(path: str | Path) -> Run:
    run_dir = RunDir(path)
    manifest = run_dir.manifest()
    indices, sums, _ = run_dir.read_records()
    branches = tuple(manifest["branches"])
    if len(branches) > 1:
        sums = np.concatenate([sums, sums.sum(axis=3, keepdims=True)], axis=3)
        branches += (POOLED,)
    return Run(Path(path), manifest, indices, sums, branches)


def write_summary(run: Run, path: Path) -> int:
    """The tidy long table: one row per (layer, stream, branch, tensor, transition, metric)."""
    cells = np.argwhere(run.present)
    rows = 0
    with atomic_file(path, text=True, newline="") as f:
        out = csv.writer(f)
        out.writerow(["layer", "layer_name", "kind", "stream", "branch", "tensor", "transition", "t", "sigma", "u",
                      "metric", "mean", "std", "cv", "n_prompts"])
        n_prompts = len(run.prompt_indices)
        for metric in METRICS:
            mean, std, cv = run.stats(metric)
            for li, si, bi, ti in cells:
                layer = run.layers[li]
                for j, d in enumerate(run.transitions):
                    out.writerow([li, layer["name"], layer["kind"], run.streams[si], run.branches[bi], run.tensors[ti],
                                  d, _num(run.t[j]), _num(run.sigma[j]), _num(run.u[j]), metric,
                                  _num(mean[li, si, bi, ti, j]), _num(std[li, si, bi, ti, j]),
                                  _num(cv[li, si, bi, ti, j]), n_prompts])
                    rows += 1
    return rows


def cv_table(run: Run) -> list[dict]:
    """Model-level prompt sensitivity: the mean per-cell cv over all layers, streams and transitions."""
    table = []
    for metric in METRICS:
        cv = run.stats(metric)[2]  # [layer, stream, branch, tensor, d]
        for bi, branch in enumerate(run.branches):
            for ti, tensor in enumerate(run.tensors):
                cells = cv[:, :, bi, ti, :]
                finite = np.isfinite(cells)
                table.append({"metric": metric, "branch": branch, "tensor": tensor,
                              "mean_cv": float(cells[finite].mean()) if finite.any() else float("nan"),
                              "n_cells": int(finite.sum()), "n_prompts": len(run.prompt_indices)})
    return table


def write_cv(run: Run, path: Path) -> list[dict]:
    table = cv_table(run)
    with atomic_file(path, text=True, newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(table[0]))
        out.writeheader()
        out.writerows({**row, "mean_cv": _num(row["mean_cv"])} for row in table)
    return table


def aggregate(path: str | Path) -> Run:
    """Read every finished record of a run directory and write summary.csv and cv.csv beside them."""
    run = read_run(path)
    write_summary(run, run.path / "summary.csv")
    write_cv(run, run.path / "cv.csv")
    return run


def _num(x: float) -> str:
    return format(float(x), ".10g")

