"""A caching plan: which block computations a sampler skips, per step, layer and component, and its JSON file.

    reuse[s, l, c]    bool [step, layer, component], component 0 = attention, 1 = feed-forward.
                      True: at step s the sampler does not compute layer l's component c and reuses its output
                      from the last step at which that cell was computed. Step 0 never reuses (nothing to reuse).

The mask says nothing about how it was chosen, so a measured plan, a published baseline or a learned router's
decisions (Learning-to-Cache) are all written the same way; `method`, `budget` and `source` say where it came from.

Budget accounting. A plan skips a fraction of the block computations:

    skipped = sum over (s, l, c) of reuse[s, l, c] * cost[l, c]  /  (steps * sum over (l, c) of cost[l, c])

`cost[l, c]` is the share of layer l's block that component c computes. Attention counts its q/k/v and output
projections with the attention product; the feed-forward counts its projections. The default is equal halves
(0.5, 0.5) for every layer, so `skipped` is the fraction of (step, layer, component) cells reused: a run records
neither widths nor token counts (the `n` of A gives their product only), so FLOPs cannot be derived from it
honestly. Equal halves is a convention, not a measurement: with an FFN of ratio 4, attention is
(8 L D^2 + 4 L^2 D) / (24 L D^2 + 4 L^2 D) of a block, about 36% for DiT-XL/2 at 256 tokens (D = 1152) and about
two thirds for CogVideoX-5b at 17,550 video tokens (D = 3072). Pass `cost` when the FLOPs are known.

The file (JSON, `save` / `load`, written by `to_json`):

    {"format": "minidit-cache-plan", "version": 1, "model": "flux-tiny", "steps": 28, "scheduler": "flow-euler",
     "layers": ["transformer_blocks.0.attn", ...], "components": ["attn", "ffn"], "method": "measured",
     "budget": 0.3, "skipped_fraction": 0.3016, "source": {"run": "runs/flux-tiny", ...},
     "cost": [[0.5, 0.5], ...], "reuse": [[[false, false], ...], ...]}

`skipped_fraction` is informational: it may be left out, and when present must agree with the mask.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minidit.analysis.rundir import atomic_file
from minidit.errors import MiniditError

FORMAT = "minidit-cache-plan"
VERSION = 1
COMPONENTS = ("attn", "ffn")
AXES = ("step", "layer", "component")  # of `reuse`; `cost` has the last two
REQUIRED = ("format", "version", "model", "steps", "scheduler", "layers", "components", "method", "budget",
            "source", "cost", "reuse")
OPTIONAL = ("skipped_fraction",)
FRACTION_TOLERANCE = 1e-6  # a stored skipped_fraction is rounded to this when written


def fraction(reuse: np.ndarray, cost: np.ndarray) -> float:
    """The skipped fraction of a mask [step, layer, component] under `cost` [layer, component] (module docstring)."""
    return float((reuse * cost).sum() / (len(reuse) * cost.sum()))


def equal_cost(layers: int) -> np.ndarray:
    """The default `cost`: every layer's attention and feed-forward count as equal halves of its block."""
    return np.full((layers, len(COMPONENTS)), 0.5)


@dataclass(frozen=True, eq=False)
class Plan:
    reuse: np.ndarray  # bool [step, layer, component]
    model: str
    steps: int
    scheduler: str
    layers: tuple[str, ...]
    method: str  # "measured", "fora", "pab", "smoothcache", ...
    budget: float  # the fraction of block computations asked for; `skipped_fraction()` is what was reached
    source: dict = field(default_factory=dict)  # the run it came from, or the baseline's parameters
    cost: np.ndarray | None = None  # [layer, component]; None: equal halves

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "reuse", np.asarray(self.reuse))
        cost = equal_cost(len(self.layers)) if self.cost is None else np.asarray(self.cost, dtype=float)
        object.__setattr__(self, "cost", cost)
        problem = self.problem()
        if problem:
            raise MiniditError(f"invalid caching plan: {problem}")

    def problem(self) -> str | None:
        """The first thing wrong with this plan, in one line, or None."""
        shape = (self.steps, len(self.layers), len(COMPONENTS))
        if self.reuse.dtype != np.bool_:
            return f"reuse must be boolean, not {self.reuse.dtype}"
        if self.reuse.shape != shape:
            return (f"reuse has shape {self.reuse.shape}; {self.steps} steps x {len(self.layers)} layers x "
                    f"{len(COMPONENTS)} components need {shape}")
        if self.cost.shape != shape[1:] or not np.isfinite(self.cost).all() or (self.cost < 0).any():
            return f"cost must be {shape[1:]} finite non-negative numbers, got shape {self.cost.shape}"
        if self.cost.sum() <= 0:
            return "cost adds up to 0: nothing to skip"
        if self.reuse[0].any():
            layer, c = np.argwhere(self.reuse[0])[0]
            return f"step 0 reuses {self.layers[layer]} {COMPONENTS[c]}, but nothing has been computed yet to reuse"
        if not 0 <= self.budget <= 1:
            return f"budget {self.budget} is not a fraction between 0 and 1"
        return None

    def skipped_fraction(self) -> float:
        """The fraction of block computations the plan skips, each cell weighted by `cost` (module docstring)."""
        return fraction(self.reuse, self.cost)

    def summary(self) -> str:
        reused = self.reuse.sum(axis=(0, 1))
        cells = self.steps * len(self.layers)
        return (f"{self.method} plan for {self.model}, {self.steps} steps ({self.scheduler}), {len(self.layers)} "
                f"layers: skips {self.skipped_fraction():.1%} of the block computations (budget {self.budget:.1%}); "
                f"attention reused in {reused[0]}/{cells} cells, feed-forward in {reused[1]}/{cells}")

    def check_against(self, model: str, layer_names: list[str], steps: int, scheduler: str | None = None) -> None:
        """Refuse to run this plan on another model, layer list, step count or scheduler than it was made for."""
        if model != self.model:
            raise MiniditError(f"this plan is for {self.model}; the run is {model}: make a plan for {model}")
        if steps != self.steps:
            raise MiniditError(f"this plan is for {self.model} with {self.steps} steps; the run has {steps}")
        if scheduler is not None and scheduler != self.scheduler:
            raise MiniditError(f"this plan is for {self.model} sampled with {self.scheduler}; the run uses "
                               f"{scheduler}")
        if list(layer_names) != list(self.layers):
            if len(layer_names) != len(self.layers):
                raise MiniditError(f"this plan is for {len(self.layers)} layers of {self.model}; the run has "
                                   f"{len(layer_names)}")
            i = next(i for i, (a, b) in enumerate(zip(self.layers, layer_names)) if a != b)
            raise MiniditError(f"this plan's layer {i} is {self.layers[i]!r}; the run's is {layer_names[i]!r}")

    def to_json(self) -> str:
        """The file's text: one key a line, and the mask one step a line, so a diff shows which steps changed."""
        head = {"format": FORMAT, "version": VERSION, "model": self.model, "steps": self.steps,
                "scheduler": self.scheduler, "layers": list(self.layers), "components": list(COMPONENTS),
                "method": self.method, "budget": self.budget,
                "skipped_fraction": round(self.skipped_fraction(), 6), "source": self.source,
                "cost": self.cost.tolist()}
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
        steps = [f"    {json.dumps(step.tolist(), separators=(',', ':'))}" for step in self.reuse]
        return "{\n" + "\n".join(lines) + '\n  "reuse": [\n' + ",\n".join(steps) + "\n  ]\n}\n"

    def save(self, path: str | Path) -> None:
        with atomic_file(Path(path), text=True, encoding="utf-8") as f:
            f.write(self.to_json())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (np.array_equal(self.reuse, other.reuse) and np.array_equal(self.cost, other.cost)
                and (self.model, self.steps, self.scheduler, self.layers, self.method, self.budget, self.source)
                == (other.model, other.steps, other.scheduler, other.layers, other.method, other.budget,
                    other.source))


def load(path: str | Path) -> Plan:
    """A plan file, validated: any problem is a MiniditError of one line naming the file."""
    return from_dict(read_json(path, "caching plan"), where=str(path))


def read_json(path: str | Path, what: str) -> object:
    """A JSON file's contents; unreadable or not JSON is one MiniditError line naming the file and `what` it should
    be (the plan files here, SmoothCache's schedules in smoothcache_file.py)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MiniditError(f"cannot read the {what} {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniditError(f"{path} is not a JSON {what} ({e})") from None


def from_dict(data: object, where: str = "the plan") -> Plan:
    def fail(problem: str) -> MiniditError:
        return MiniditError(f"{where}: {problem}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail(f'not a minidit caching plan (no "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise fail(f"format version {data.get('version')!r}; this minidit reads version {VERSION}")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    missing = [k for k in REQUIRED if k not in data]
    if unknown or missing:
        raise fail("; ".join(([f"unknown keys {', '.join(unknown)}"] if unknown else [])
                             + ([f"missing keys {', '.join(missing)}"] if missing else [])))
    for key in ("model", "scheduler", "method"):
        if not isinstance(data[key], str):
            raise fail(f"{key} must be a string, not {data[key]!r}")
    steps, layers = data["steps"], data["layers"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise fail(f"steps must be a positive integer, not {steps!r}")
    if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
        raise fail("layers must be a list of layer names")
    if data["components"] != list(COMPONENTS):
        raise fail(f"components must be {list(COMPONENTS)}, not {data['components']!r}")
    if not _is_number(data["budget"]):
        raise fail(f"budget must be a number, not {data['budget']!r}")
    if not isinstance(data["source"], dict):
        raise fail("source must be an object")
    shape = (steps, len(layers), len(COMPONENTS))
    reuse = _nested(data["reuse"], shape, AXES, "reuse", lambda x: isinstance(x, bool), "true or false", fail)
    cost = _nested(data["cost"], shape[1:], AXES[1:], "cost", lambda x: _is_number(x) and x >= 0, "a number >= 0",
                   fail)
    try:
        plan = Plan(np.array(reuse, dtype=bool).reshape(shape), data["model"], steps, data["scheduler"], layers,
                    data["method"], float(data["budget"]), data["source"], np.array(cost, dtype=float))
    except MiniditError as e:
        raise fail(str(e).removeprefix("invalid caching plan: ")) from None
    stated = data.get("skipped_fraction")
    if stated is not None and not (_is_number(stated) and abs(stated - plan.skipped_fraction()) <= FRACTION_TOLERANCE):
        raise fail(f"skipped_fraction {stated!r} disagrees with the mask ({plan.skipped_fraction():.6f}): the mask "
                   f"was edited; correct the field or delete it")
    return plan


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _nested(value: object, shape: tuple[int, ...], axes: tuple[str, ...], name: str, ok, expected: str,
            fail) -> list:
    """Check that `value` is nested lists of `shape` whose entries pass `ok`; the first problem names its place."""
    if not shape:
        if not ok(value):
            raise fail(f"{name} is {json.dumps(value)}, not {expected}")
        return value
    if not isinstance(value, list) or len(value) != shape[0]:
        found = f"{len(value)} entries" if isinstance(value, list) else "no list"
        raise fail(f"{name} has {found} along the {axes[0]} axis; the plan states {shape[0]} {axes[0]}s")
    return [_nested(v, shape[1:], axes[1:], f"{name}[{i}]", ok, expected, fail) for i, v in enumerate(value)]
