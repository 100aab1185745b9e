"""Caching plans: which attention and feed-forward computations a sampler may skip, per step and layer.

    plan.py          the Plan (a boolean mask [step, layer, {attn, ffn}] with its provenance), its JSON file
    measured.py      a plan from a run's measured changes, at a budget
    baselines.py     FORA, PAB and SmoothCache at the same budget
    smoothcache_file.py  SmoothCache's schedule JSON, read and written

    analyze.py --plan RUN --budget F --out PLAN.json [--method measured|measured-cells|fora|pab|smoothcache]
"""

import functools
from pathlib import Path

from minidit.analysis.aggregate import Run, read_run
from minidit.caching.baselines import fora, pab, smoothcache
from minidit.caching.measured import from_run
from minidit.caching.plan import COMPONENTS, Plan, load
from minidit.caching.smoothcache_file import from_smoothcache, to_smoothcache, write_smoothcache
from minidit.errors import MiniditError

METHODS = {"measured": from_run, "measured-cells": functools.partial(from_run, granularity="cell"), "fora": fora,
           "pab": pab, "smoothcache": smoothcache}


def plan_command(run_path: str | Path, budget: float, out_path: str | Path, method: str = "measured",
                 **options) -> Plan:
    """What `analyze.py --plan` runs for one plan: read the run, make the plan, write it, return it (print
    `plan.summary()`).

    The flags it expects:
        --plan RUN          a finished run directory (analyze.py --out RUN; with --ffn to plan the feed-forward)
        --budget F          the fraction of block computations to skip, 0 <= F < 1 (plan.py: how it is counted)
        --out PLAN.json     where to write the plan
        --method M          measured (default; whole steps), measured-cells (each layer and component on its own),
                            fora, pab or smoothcache
    `options` go to the method: for measured, granularity, metric, keep_first, keep_last, max_reuse (measured.py: the
    defaults and the measurements behind them); for smoothcache, lookahead; for every method, cost.
    """
    plan = make_plan(read_run(run_path), budget, method, **options)
    plan.save(out_path)
    return plan


def make_plan(run: Run, budget: float, method: str = "measured", **options) -> Plan:
    """The plan of `method` at `budget` from a run read by `read_run` (several plans from one run read once)."""
    if method not in METHODS:
        raise MiniditError(f"unknown plan method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0 <= budget < 1:
        raise MiniditError(f"--budget {budget} must be a fraction, at least 0 and below 1 (step 0 is always computed)")
    return METHODS[method](run, budget, **options)


__all__ = ["COMPONENTS", "METHODS", "Plan", "fora", "from_run", "from_smoothcache", "load", "make_plan", "pab",
           "plan_command", "smoothcache", "to_smoothcache", "write_smoothcache"]
