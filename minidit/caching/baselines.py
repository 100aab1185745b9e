"""Published caching schedules as plans at a given budget: FORA, PAB and SmoothCache, written from their papers.

Each reaches the budget as closely as its own family of schedules allows (a uniform period cannot hit every
fraction): what it chose is in the plan's `source`, what it reached is the plan's `skipped_fraction()`. The budget
is counted as in plan.py (equal halves unless `cost` is given). Facts read from the official code are cited where
used; none of it is copied.
"""

import math

import numpy as np

from minidit.analysis.aggregate import Run
from minidit.caching.measured import branch_measured, coherent, component_change, provenance
from minidit.caching.plan import COMPONENTS, Plan, equal_cost, fraction
from minidit.errors import MiniditError


def closest(candidates: list[tuple[np.ndarray, dict]], budget: float, cost: np.ndarray) -> tuple[np.ndarray, dict]:
    """The candidate schedule whose skipped fraction is nearest the budget; ties go to the earlier candidate, so
    list them from the most faithful to the paper (or the least reuse) on."""
    return min(candidates, key=lambda c: abs(fraction(c[0], cost) - budget))


# ---- FORA -------------------------------------------------------------------------------------------------------

def fora(run: Run, budget: float, *, cost: np.ndarray | None = None) -> Plan:
    """FORA (Selvaraju et al. 2024, "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration"): static
    caching with interval N. Every layer's attention and MLP are computed at steps 0, N, 2N, ... and reused from
    the last of those in between; nothing is measured. N is chosen so the skipped fraction, (steps reused) /
    steps, is closest to the budget; an offset o (computing o, o + N, ... and step 0) refines it, the paper's
    o = 0 and the smaller N first on a tie. N = 1 computes everything.

    A uniform period skips about 1 - 1/N of the steps: nothing between 0 and about one half. Those budgets get a
    computed warm-up: steps 0 .. w - 1 always computed, then every N-th from w (FORA-style caches in later work keep
    their first steps too: Delta-DiT, ToCa). These come after the paper's own schedules, so a tie keeps the paper's;
    `source` records w as "warmup"."""
    info = provenance(run)
    cost = equal_cost(len(info["layers"])) if cost is None else np.asarray(cost, dtype=float)
    steps = np.arange(info["steps"])
    schedules = [(((steps - offset) % interval != 0) & (steps > 0), {"interval": interval, "offset": offset})
                 for offset in range(len(steps)) for interval in range(offset + 1, len(steps) + 1)]
    schedules += [(((steps - warmup) % interval != 0) & (steps > warmup), {"interval": interval, "warmup": warmup})
                  for warmup in range(2, len(steps)) for interval in range(2, len(steps) + 1)]
    reused, chosen = min(schedules, key=lambda s: abs(s[0].mean() - budget))  # every cell of a step alike
    reuse = coherent(np.broadcast_to(reused[:, None, None], (len(steps), len(info["layers"]), 2)), run)
    return Plan(reuse, method="fora", budget=budget, cost=cost,
                source={"baseline": "FORA (Selvaraju et al. 2024)", "run": str(run.path), **chosen}, **info)


# ---- PAB --------------------------------------------------------------------------------------------------------

# VideoSys (NUS-HPC-AI-Lab), videosys/pipelines/latte/pipeline_latte.py, LattePABConfig: per attention kind, the
# timestep window (lo, hi) in which it broadcasts, and its "range": it is computed at steps whose index is a multiple
# of the range and reused at the others (videosys/core/pab/pab_mgr.py: broadcast when count % range != 0 and
# lo < timestep < hi). Open-Sora's config uses (450, 930) with ranges 2, 4, 6; CogVideoX's broadcasts spatial
# (its joint attention) only, (100, 850) with range 2.
PAB_LATTE = {"spatial": ((100, 800), 2), "temporal": ((100, 800), 3), "cross": ((100, 800), 6)}
PAB_ROLE = {"spatial": "spatial", "self": "spatial", "joint": "spatial", "temporal": "temporal", "cross": "cross"}
PAB_SCALES = (1, 0.75, 1.5, 0.5, 2, 3, 4, 6, 8)  # interval multipliers tried, the paper's own (1) first


def pab(run: Run, budget: float, *, config: dict | None = None, cost: np.ndarray | None = None) -> Plan:
    """PAB (Zhao et al. 2024, "Real-Time Video Generation with Pyramid Attention Broadcast"): attention outputs
    are broadcast (reused) in the middle of sampling, where they change little, each attention kind with its own
    window and interval: spatial attention, which changes most, every 2 steps; temporal every 3; cross-attention,
    the most stable, every 6 (the pyramid). The feed-forward is always computed here (VideoSys's optional MLP
    broadcast, a few blocks at a few listed timesteps of one model, is left out).

    Kinds: a run's `self` and `joint` layers count as spatial, since they attend among the tokens of one image as
    spatial attention does; VideoSys's CogVideoX config likewise treats its joint attention as spatial. The windows
    are compared with the run's timesteps (its manifest's, on the 0-1000 training scale), as VideoSys compares
    them. To reach the budget, the intervals are scaled by one factor (PAB_SCALES, rounded, pyramid order kept)
    and each window widened or narrowed by the same number of steps at both ends; the candidate nearest the budget
    wins, the paper's own settings first on a tie."""
    info = provenance(run)
    config = config or PAB_LATTE
    cost = equal_cost(len(info["layers"])) if cost is None else np.asarray(cost, dtype=float)
    timesteps = np.asarray(run.manifest["timesteps"], dtype=float)
    roles = [PAB_ROLE.get(layer["kind"]) for layer in run.layers]
    unknown = {layer["kind"] for layer, role in zip(run.layers, roles) if role is None}
    if unknown:
        raise MiniditError(f"PAB knows the attention kinds {', '.join(PAB_ROLE)}; this run has {', '.join(unknown)}")
    steps = len(timesteps)
    candidates = []
    for scale in PAB_SCALES:
        for widen in sorted(range(-steps, steps + 1), key=abs):
            reuse = np.zeros((steps, len(roles), 2), dtype=bool)
            chosen = {"scale": scale, "widen_steps": widen}
            for role, ((lo, hi), interval) in config.items():
                window = pab_window(timesteps, lo, hi, widen)
                every = max(1, math.floor(interval * scale + 0.5))
                chosen[role] = {"timesteps": [lo, hi], "steps": window, "interval": every}
                if window is None:
                    continue
                reused = np.zeros(steps, dtype=bool)
                reused[window[0]:window[1] + 1] = True
                reused &= np.arange(steps) % every != 0
                reuse[:, [r == role for r in roles], 0] = reused[:, None]
            candidates.append((reuse, chosen))
    reuse, chosen = closest(candidates, budget, cost)
    return Plan(reuse, method="pab", budget=budget, cost=cost,
                source={"baseline": "PAB (Zhao et al. 2024)", "run": str(run.path), **chosen}, **info)


def pab_window(timesteps: np.ndarray, lo: float, hi: float, widen: int) -> list[int] | None:
    """The first and last step with lo < timestep < hi, each moved out by `widen` steps (in by -widen), never
    including step 0; None when empty."""
    inside = np.flatnonzero((timesteps > lo) & (timesteps < hi))
    if len(inside) == 0:
        return None
    first, last = max(1, inside[0] - widen), min(len(timesteps) - 1, inside[-1] + widen)
    return [int(first), int(last)] if first <= last else None


# ---- SmoothCache ------------------------------------------------------------------------------------------------

SMOOTHCACHE_LOOKAHEAD = 3  # examples/run_calibration.py's calibration_lookahead (their schedules' "N-3")


def smoothcache(run: Run, budget: float, *, lookahead: int = SMOOTHCACHE_LOOKAHEAD,
                cost: np.ndarray | None = None) -> Plan:
    """SmoothCache (Liu et al. 2024, "SmoothCache: A Universal Inference Acceleration Technique for Diffusion
    Transformers", github.com/Roblox/SmoothCache): per component type (the module they hook in every block: attn,
    mlp), the relative L1 error between a component's output at step i and at step i+k (k = 1..lookahead), averaged
    over the layers, from a calibration pass; one threshold alpha for all types. Their scan
    (calibration/calibration_helper.py): from step i, take the largest k whose error is <= alpha, compute step i and
    reuse it for steps i+1..i+k, continue at i+k+1; compute step i alone if none is; then compute the first and
    last steps in any case. The schedule is the same for every layer.

    From a run: the error from step i to i+k is the sum of the k transitions between them (measured.py; an upper
    bound of the direct distance they measured), the layer average of the run's change, pooled over branches as
    their calibration pooled the batch. Their denominator is the later step's |X|, ours the earlier one's: the same
    to within a step's change. A run without F schedules attention only, as their diffusers DiT example (attn1)
    does. alpha is the candidate value whose schedule is nearest the budget (the smaller alpha on a tie)."""
    info = provenance(run)
    cost = equal_cost(len(info["layers"])) if cost is None else np.asarray(cost, dtype=float)
    curves = component_change(run).mean(axis=1)  # [step, component], NaN at step 0 and for an unmeasured F
    errors = [lookahead_errors(curves[:, c], lookahead) for c in range(len(COMPONENTS))]
    values = sorted({float(v) for e in errors for v in e[np.isfinite(e)]})
    candidates = []
    for alpha in [-math.inf, *values]:
        computed = [smoothcache_scan(e, alpha) for e in errors]
        reuse = np.broadcast_to(~np.stack(computed, axis=1)[:, None, :], (info["steps"], len(info["layers"]), 2))
        candidates.append((coherent(reuse, run), {"alpha": alpha if math.isfinite(alpha) else None}))
    reuse, chosen = closest(candidates, budget, cost)
    return Plan(reuse, method="smoothcache", budget=budget, cost=cost,
                source={"baseline": "SmoothCache (Liu et al. 2024)", "run": str(run.path), "metric": "rel_l1",
                        "branch": branch_measured(run), "lookahead": lookahead, **chosen}, **info)


def lookahead_errors(curve: np.ndarray, lookahead: int) -> np.ndarray:
    """errors [k - 1, i]: the accumulated change from step i to step i + k (NaN past the end or unmeasured)."""
    steps = len(curve)
    errors = np.full((lookahead, steps), np.nan)
    for k in range(1, lookahead + 1):
        for i in range(steps - k):
            errors[k - 1, i] = curve[i + 1:i + k + 1].sum()
    return errors


def smoothcache_scan(errors: np.ndarray, alpha: float) -> np.ndarray:
    """computed [step]: SmoothCache's scan of its lookahead errors against alpha (see `smoothcache`)."""
    steps = errors.shape[1]
    computed = np.ones(steps, dtype=bool)
    i = 0
    while i < steps:
        k = next((k for k in range(len(errors), 0, -1) if errors[k - 1, i] <= alpha), 0)  # NaN never passes
        computed[i + 1:i + k + 1] = False
        i += k + 1
    computed[0] = computed[-1] = True
    return computed
