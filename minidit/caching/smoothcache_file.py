"""SmoothCache's schedule file, read and written, so plans can be exchanged with github.com/Roblox/SmoothCache.

Their format, as their code reads and writes it (SmoothCache/smooth_cache_helper.py, calibration/
calibration_helper.py, the files in smoothcache_schedules/): a JSON object whose keys name a component inside each
hooked block by its attribute name ("attn" and "mlp" in the original DiT's DiTBlock, "attn1" in diffusers'
BasicTransformerBlock) and whose values are lists of 0/1, one per step. 1 computes the component; 0 returns its
output cached at the last step it was computed: a plan's reuse is exactly `value == 0`. A key "<name>-<block>"
(e.g. "attn-0", as in their Learning-to-Cache schedule 50-N-2-l2c.json) is one block's own schedule and takes
precedence over "<name>"; <block> is the number before the component in the module path ("blocks.3.attn" -> 3).
Their helper computes a component that has no key, any step past the end of its list, and step 0 (nothing is
cached yet), whatever the list says; their calibration writes 1 at the first and last steps and one key a line:

    {
        "attn": [1,0,1,0,1,1],
        "mlp": [1,0,1,0,1,1]
    }
"""

import json
from pathlib import Path

import numpy as np

from minidit.caching.plan import COMPONENTS, Plan, equal_cost, fraction, read_json
from minidit.errors import MiniditError

DIT_NAMES = ("attn", "mlp")  # the attribute names of attention and feed-forward in the original DiT's blocks


def block_index(layer_name: str) -> str:
    """The block number SmoothCache reads from a module path: "transformer_blocks.3.attn1" -> "3"."""
    parts = layer_name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def to_smoothcache(plan: Plan, *, names: tuple[str, str] = DIT_NAMES, per_block: bool = False) -> dict:
    """The plan as a SmoothCache schedule: {names[0]: attention's 0/1 list, names[1]: the feed-forward's}.

    One list serves every layer, so each component must reuse the same steps in every layer (plans from
    `baselines.smoothcache` and `baselines.fora` do). per_block=True writes one key per layer and component
    instead ("attn-3"), which their helper also reads, provided the layers' block numbers are distinct."""
    if not per_block:
        for c, name in enumerate(names):
            mask = plan.reuse[:, :, c]
            if not (mask == mask[:, :1]).all():
                layer = int(np.flatnonzero((mask != mask[:, :1]).any(axis=0))[0])
                raise MiniditError(f"a SmoothCache schedule has one {name} list for every layer, but this plan reuses "
                                   f"{plan.layers[layer]}'s {COMPONENTS[c]} at other steps than "
                                   f"{plan.layers[0]}'s: pass per_block=True for one key per layer")
        return {name: [int(not r) for r in plan.reuse[:, 0, c]] for c, name in enumerate(names)}
    blocks = [block_index(layer) for layer in plan.layers]
    if len(set(blocks)) != len(blocks) or "" in blocks:
        raise MiniditError(f"per-block SmoothCache keys need a distinct block number per layer; {plan.model}'s "
                           f"layers give {', '.join(blocks)}")
    return {f"{name}-{block}": [int(not r) for r in plan.reuse[:, layer, c]]
            for layer, block in enumerate(blocks) for c, name in enumerate(names)}


def write_smoothcache(schedule: dict, path: str | Path) -> None:
    """Write a schedule as their calibration does: one key a line, each list compact."""
    lines = [f"    {json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}" for key, value in schedule.items()]
    Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def from_smoothcache(schedule: dict | str | Path, layer_names: list[str], *, model: str, scheduler: str,
                     names: tuple[str, str] = DIT_NAMES) -> Plan:
    """A SmoothCache schedule (a dict, or the path of its JSON file) as a plan for the given layers, read as their
    helper executes it (module docstring). Every list must have the same length, the number of steps."""
    where = "the SmoothCache schedule"
    if not isinstance(schedule, dict):
        where = str(schedule)
        schedule = read_json(schedule, "SmoothCache schedule")
    if not isinstance(schedule, dict) or not schedule:
        raise MiniditError(f"{where}: a SmoothCache schedule is a JSON object of 0/1 lists, one per component")
    blocks = {block_index(layer) for layer in layer_names}
    keys = {name: c for c, name in enumerate(names)}
    keys |= {f"{name}-{block}": c for c, name in enumerate(names) for block in blocks}
    for key, value in schedule.items():
        if key not in keys:
            raise MiniditError(f"{where}: unknown key {key!r}; expected {' or '.join(names)}, or one of them with "
                               f"-<block> for blocks {', '.join(sorted(blocks, key=_as_number))} (pass names= for "
                               f"other module names)")
        if not isinstance(value, list) or not all(v in (0, 1) and not isinstance(v, float) for v in value):
            raise MiniditError(f"{where}: {key} must be a list of 0 and 1, one per step")
    lengths = {len(value) for value in schedule.values()}
    if len(lengths) != 1:
        raise MiniditError(f"{where}: the lists have different lengths ({', '.join(map(str, sorted(lengths)))}); "
                           f"each must have one entry per step")
    steps = lengths.pop()
    reuse = np.zeros((steps, len(layer_names), len(COMPONENTS)), dtype=bool)
    for layer, layer_name in enumerate(layer_names):
        for c, name in enumerate(names):
            value = schedule.get(f"{name}-{block_index(layer_name)}", schedule.get(name))
            if value is not None:
                reuse[:, layer, c] = np.array(value) == 0
    reuse[0] = False  # their helper computes step 0 whatever the list says: nothing is cached yet
    return Plan(reuse, model=model, steps=steps, scheduler=scheduler, layers=list(layer_names), method="smoothcache",
                budget=fraction(reuse, equal_cost(len(layer_names))),
                source={"smoothcache_schedule": where, "names": list(names)})


def _as_number(block: str) -> tuple[int, str]:
    return (int(block), "") if block.isdigit() else (1 << 30, block)
