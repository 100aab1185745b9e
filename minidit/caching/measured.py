"""A caching plan from a run: reuse the steps (or the (step, layer, component) cells) whose output changes least.

What is measured. A component's output is what a cache would hold: A for attention, F for the feed-forward (the
run needs `--ffn`). Per cell, `change[s, l, c]` is the run's metric (default rel_l1 = sum|X_s - X_{s-1}| /
sum|X_{s-1}|) of transition s, i.e. from step s-1 to step s, averaged over prompts. Before the metric is taken,
the sums are pooled (added, which is exact) over the streams, because a cache reuses a layer's whole output, text
and image tokens alike, and over the guidance branches (the run's "all"), because one reuse serves the whole batch,
[uncond; cond] together, as SmoothCache's calibration also measured it. A run without F plans attention only: its
feed-forward cells are always computed and the plan's source says so (a budget beyond the attention's share is an
error asking for `--ffn`). In a FLUX single-stream block (f_point "block") F is the block's whole contribution,
attention included, so there the two cells are one decision: both reused or neither, scored by F.

How cells are chosen. A reuse at step s returns the output of the last computed step p < s, so the error it
introduces is the change from p to s, which grows along a chain of reuses. A candidate is therefore scored by the
accumulated change sum_{d=p+1..t} change[d] from the last computed step p to the end t of the chain it would join
(t = s, or the last of the reuses already following s): the largest distance between a reused output and its
source once the candidate is added, not the change of its single transition. A sum of transitions bounds the direct
distance from above (the triangle inequality; equal when every element keeps its direction of change). The greedy
step takes the lowest-scoring candidate, re-scores its chain, and repeats until the skipped fraction (plan.py's
accounting) reaches the budget: it ends within one cell's cost above it.

Granularity. "step" (the default) decides whole steps: a chosen step reuses every cell it can (the attention of
every layer, and the feed-forward where the run has F), and the candidates are scored as above on one curve, the
change averaged over layers and components. "cell" (`--method measured-cells`) decides each layer and component
on its own. Whole steps are the default because they won on both embedded models: a step that reuses every layer
hands the blocks a consistent set of outputs, all one step old, and the sample moves as if that step's model output
were the previous one's; reusing some layers and computing others mixes outputs of two steps in one residual
stream, an error no single layer's change measures. On flux-tiny, reusing single cells one at a time cost 0.004 to
0.02 of final-latent error each (rel. L2, 8 prompts), and those errors added up to about the same total for the
cell plan and FORA's whole steps at a budget of 0.2, yet the samples' errors were 0.041 and 0.016: whole steps'
errors largely cancel, mixed ones compound. The measurements: README, "Caching plans".

Defaults, measured on the embedded models (`python tests/measure_plan_defaults.py RUN ...`, rel_l1 of A, pooled as
above, 8 prompts each; flux-tiny: 28 steps, flow-euler; dit-tiny: 50 steps, DDIM, guidance 4):

- keep_first = 2. Step 0 has nothing to reuse. Step 1: flux-tiny's transition 1 is 5.6x the median change (over
  layers and transitions; 4.2x to 6.6x per layer), the largest of any transition in either model.
  dit-tiny's first transitions are quiet (0.3x), so this is the flow model's rule, kept for both.
- keep_last = 1. dit-tiny's last transition is 5.3x the median (2.3x to 17x per layer; flux-tiny's 2.4x), and
  the last step's output is the sample: no later step corrects it. Every transition between these two ends is
  within 2.1x of the median (flux-tiny's steps 2-5: 1.4x-2.1x; dit-tiny's step 48: 2.1x): left to the scores.
- max_reuse = 3. In the middle third of sampling a chain of k reuses accumulates about k median transitions; in the
  worst layer, k = 3 reaches 3.3x (flux-tiny) and 5.1x (dit-tiny) the median, k = 4 4.3x and 6.7x. Three is the
  longest chain that stays below the smallest change the defaults refuse outright (5.3x); it is also SmoothCache's
  calibration lookahead (their schedules' "N-3").
"""

import numpy as np

from minidit.analysis.aggregate import METRICS, POOLED, Run, derive
from minidit.caching.plan import COMPONENTS, Plan, equal_cost, fraction
from minidit.errors import MiniditError

GRANULARITIES = ("step", "cell")
GRANULARITY = "step"  # the default (module docstring: why)
KEEP_FIRST = 2
KEEP_LAST = 1
MAX_REUSE = 3
COMPONENT_TENSOR = {"attn": "A", "ffn": "F"}
FUSED = "block"  # a layer's f_point when its F is the whole block's output (FLUX single-stream)


def provenance(run: Run) -> dict:
    """What a plan made from `run` records about the run: model, steps, scheduler (as analyze.py --scheduler names
    it: a flow-matching sampler by its schedule, "flux", "sd3", "mochi"; the others by name), layer names."""
    scheduler = run.manifest["scheduler"]
    if isinstance(scheduler, dict):
        scheduler = scheduler.get("schedule", scheduler["name"])
    return {"model": run.manifest["model"], "steps": run.manifest["steps"], "scheduler": str(scheduler),
            "layers": [layer["name"] for layer in run.layers]}


def coherent(reuse: np.ndarray, run: Run) -> np.ndarray:
    """`reuse` made what a sampler can skip as counted (cache.py): no feed-forward reuse in a cross-attention layer
    (its block's feed-forward is filed under the block's self-attention), and in a fused layer (FLUX single-stream,
    where the feed-forward cell is the whole block) a reused feed-forward reuses the attention too."""
    reuse = reuse.copy()
    reuse[:, [layer["kind"] == "cross" for layer in run.layers], 1] = False
    fused = [layer.get("f_point") == FUSED for layer in run.layers]
    reuse[:, fused, 0] |= reuse[:, fused, 1]
    return reuse


def branch_measured(run: Run) -> str:
    return POOLED if POOLED in run.branches else run.branches[0]


def component_change(run: Run, metric: str = "rel_l1") -> np.ndarray:
    """change [step, layer, component] (module docstring); step 0 and unmeasured components are NaN."""
    if metric not in METRICS:
        raise MiniditError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    tensors = list(run.manifest.get("tensors", ["K", "V", "A"]))
    bi = run.branches.index(branch_measured(run))
    change = np.full((run.manifest["steps"], len(run.layers), len(COMPONENTS)), np.nan)
    for c, component in enumerate(COMPONENTS):
        if COMPONENT_TENSOR[component] in tensors:
            sums = run.sums[:, :, :, bi, tensors.index(COMPONENT_TENSOR[component])].sum(axis=2)  # [P, L, d, 7]
            change[1:, :, c] = derive(sums)[metric].mean(axis=0).T
    return change


def from_run(run: Run, budget: float, *, granularity: str = GRANULARITY, metric: str = "rel_l1",
             keep_first: int = KEEP_FIRST, keep_last: int = KEEP_LAST, max_reuse: int = MAX_REUSE,
             cost: np.ndarray | None = None) -> Plan:
    """The measured plan: the lowest-change steps (granularity "step") or cells ("cell") reused until `budget` of
    the block computations is skipped."""
    steps = run.manifest["steps"]
    if granularity not in GRANULARITIES:
        raise MiniditError(f"unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    if keep_first < 1 or keep_last < 0 or max_reuse < 1:
        raise MiniditError(f"keep_first must be >= 1 (step 0 has nothing to reuse), keep_last >= 0 and max_reuse "
                           f">= 1; got {keep_first}, {keep_last}, {max_reuse}")
    change = component_change(run, metric)
    measured = ~np.isnan(change[1:]).all(axis=(0, 1))  # per component: does the run have its tensor?
    allowed = np.zeros(change.shape, dtype=bool)
    allowed[keep_first:steps - keep_last] = True
    allowed &= ~np.isnan(change)
    cost = equal_cost(len(run.layers)) if cost is None else np.asarray(cost, dtype=float)
    if granularity == "step":
        reusable = coherent(np.broadcast_to(measured, change.shape), run)[0]  # [layer, component]
        reuse = whole_steps(change, cost, budget, allowed.any(axis=(1, 2)), max_reuse, reusable)
    else:
        fused = np.array([measured[1] and layer.get("f_point") == FUSED for layer in run.layers])
        reuse = greedy(change, cost, budget, allowed, max_reuse, fused)
    reached = fraction(reuse, cost)
    if reached < budget * (1 - 1e-12):
        only = "" if measured[1] else " (attention only: the run has no F; rerun analyze.py with --ffn)"
        raise MiniditError(f"budget {budget:g} is out of reach: with keep_first={keep_first}, keep_last={keep_last} "
                           f"and max_reuse={max_reuse} the greedy choice skips only {reached:.3f} of this run's "
                           f"block computations{only}")
    source = {"run": str(run.path), "metric": metric, "branch": branch_measured(run), "prompts": len(run.sums),
              "tensors": {c: COMPONENT_TENSOR[c] if measured[i] else None for i, c in enumerate(COMPONENTS)},
              "granularity": granularity, "keep_first": keep_first, "keep_last": keep_last, "max_reuse": max_reuse}
    if not measured[1]:
        source["note"] = "the run has no F: feed-forward always computed (rerun analyze.py with --ffn to plan it)"
    method = "measured" if granularity == GRANULARITY else f"measured-{granularity}s"
    return Plan(reuse, method=method, budget=budget, source=source, cost=cost, **provenance(run))


def whole_steps(change: np.ndarray, cost: np.ndarray, budget: float, allowed: np.ndarray, max_reuse: int,
                reusable: np.ndarray) -> np.ndarray:
    """reuse [step, layer, component]: whole steps, every `reusable` [layer, component] cell of a chosen step,
    chosen by `greedy` on one curve, the change averaged over layers and measured components (`allowed`: [step])."""
    steps = len(change)
    curve = np.full((steps, 1, 2), np.nan)  # greedy's layout: one "layer", its second component never chosen
    curve[1:, 0, 0] = np.nanmean(change[1:], axis=(1, 2))
    share = (cost * reusable).sum() / cost.sum()  # of the block computations, what one reused step skips
    one = np.zeros((steps, 1, 2), dtype=bool)
    one[:, 0, 0] = allowed
    chosen = greedy(curve, np.array([[share, 1 - share]]), budget, one, max_reuse, np.array([False]))[:, 0, 0]
    return chosen[:, None, None] & reusable[None]


def greedy(change: np.ndarray, cost: np.ndarray, budget: float, allowed: np.ndarray, max_reuse: int,
           fused: np.ndarray) -> np.ndarray:
    """reuse [step, layer, component]: the lowest-scoring allowed cells until `budget` is skipped, or until no cell
    can be added. A fused layer is decided by its feed-forward cell, which then carries both cells' cost."""
    steps, layers, _ = change.shape
    reuse = np.zeros(change.shape, dtype=bool)
    allowed = allowed.copy()
    allowed[:, fused, 0] = False  # a fused layer's attention follows its feed-forward cell
    pair_cost = cost.copy()
    pair_cost[fused, 1] = cost[fused].sum(axis=1)
    scores = np.full(change.shape, np.inf)
    for layer in range(layers):
        for c in range(len(COMPONENTS)):
            scores[:, layer, c] = chain_scores(change[:, layer, c], reuse[:, layer, c], allowed[:, layer, c],
                                               max_reuse)
    target, skipped = budget * steps * cost.sum(), 0.0
    while skipped < target * (1 - 1e-12):
        s, layer, c = np.unravel_index(np.argmin(scores), scores.shape)
        if not np.isfinite(scores[s, layer, c]):
            break  # nothing more can be reused
        reuse[s, layer, c] = True
        if fused[layer]:
            reuse[s, layer, 0] = True
        skipped += pair_cost[layer, c]
        scores[:, layer, c] = chain_scores(change[:, layer, c], reuse[:, layer, c], allowed[:, layer, c], max_reuse)
    return reuse


def chain_scores(change: np.ndarray, reuse: np.ndarray, allowed: np.ndarray, max_reuse: int) -> np.ndarray:
    """One cell's row over steps: each allowed, still computed step's score if it were reused next (the change
    accumulated from the last computed step before it to the end of the chain it joins); inf where it cannot be."""
    steps = len(change)
    scores = np.full(steps, np.inf)
    for s in np.flatnonzero(allowed & ~reuse):
        first = s  # the chain would run from `first` to `last`, reusing the output of step first - 1
        while reuse[first - 1]:
            first -= 1
        last = s
        while last + 1 < steps and reuse[last + 1]:
            last += 1
        if last - first + 1 <= max_reuse:
            scores[s] = change[first:last + 1].sum()
    return scores
