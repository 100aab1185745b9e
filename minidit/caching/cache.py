"""Sampling with a caching plan: at the cells the plan reuses, the module does not run and its last output is used.

    cache = PlanCache(model, layers, plan)     # checks the plan against the model's attention layers
    with cache.sampling():                     # one sampling loop: wraps the modules, counts the backbone's calls
        latents = recipe.generate(...)
    cache.skipped, cache.computed              # module calls per component, {"attn": ..., "ffn": ...}

Where. Every model computes a layer's attention in one module (its path is the layer's name) and the block's
feed-forward in one module per stream (`AttentionLayer.ffn`); the blocks call them. While `sampling()` is open,
each of those modules is replaced in its parent by a `Reusable` around it, so the plan is applied at the call
sites the blocks already have and the model files carry no caching code:

- a computed cell calls the module, and keeps its output when the next step reuses the cell;
- a reused cell returns the kept output without calling the module: a reused attention runs none of its q/k/v
  projections, QK-norm, RoPE, attention or output projection; a reused feed-forward none of its matmuls.
  The block's norms, modulation, gates and residual additions still run on the current step's values.

A reused output is the whole batch's ([branch: prompts], as computed), so one plan serves every branch and prompt
of the batch. FLUX's single-stream blocks fuse attention and MLP into one output projection; there the
feed-forward module is the whole block (F, f_point "block"), so reusing it skips the block's attention too, and
a plan must reuse both cells or neither there (measured.py plans them that way).

Memory: the kept outputs, at most one per module, are the extra memory of a plan (`peak_kept_bytes`).
"""

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from minidit.attention import AttentionLayer
from minidit.caching.measured import FUSED
from minidit.caching.plan import COMPONENTS, Plan
from minidit.errors import MiniditError

ATTN, FFN = range(len(COMPONENTS))


class Reusable(nn.Module):
    """A module of one plan cell's layer and component: computes, or returns what it computed last."""

    def __init__(self, inner: nn.Module, cache: "PlanCache", layer: int, component: int):
        super().__init__()
        self.inner, self.layer, self.component = inner, layer, component
        self._cache = cache  # an attribute, not a submodule
        self.kept = None  # the last computed output, while a later step will reuse it

    def forward(self, *args, **kwargs):
        cache, step = self._cache, self._cache.step
        if cache.plan.reuse[step, self.layer, self.component]:
            for part in self.modules():  # itself, and a fused block's attention inside it
                if isinstance(part, Reusable):
                    cache.skipped[part.component] += 1
            return self.kept
        out = self.inner(*args, **kwargs)
        cache.computed[self.component] += 1
        keep = step + 1 < cache.plan.steps and cache.plan.reuse[step + 1, self.layer, self.component]
        cache.keep(self, out if keep else None)
        return out


class PlanCache:
    def __init__(self, model: nn.Module, layers: list[AttentionLayer], plan: Plan):
        self.model, self.plan = model, plan
        check_plan(plan, layers)
        self.targets = []  # (module path, layer index, component), deepest first: a block is wrapped after its parts
        for i, layer in enumerate(layers):
            self.targets.append((layer.name, i, ATTN))
            self.targets += [(path, i, FFN) for path in layer.ffn]
        self.targets.sort(key=lambda t: -t[0].count("."))
        for path, _, _ in self.targets:
            try:
                model.get_submodule(path)
            except AttributeError:
                raise MiniditError(f"the model has no module {path!r} to cache") from None
        self.step = -1
        self.reset_counts()
        self.kept_bytes = self.peak_kept_bytes = 0

    def reset_counts(self) -> None:
        self.skipped, self.computed = [0, 0], [0, 0]  # module calls, per component

    def keep(self, module: Reusable, out) -> None:
        self.kept_bytes += nbytes(out) - nbytes(module.kept)
        self.peak_kept_bytes = max(self.peak_kept_bytes, self.kept_bytes)
        module.kept = out

    def _next_step(self, *_) -> None:
        self.step += 1
        if self.step >= self.plan.steps:
            raise MiniditError(f"the backbone was called more than the {self.plan.steps} steps of the caching plan")

    @contextlib.contextmanager
    def sampling(self) -> Iterator["PlanCache"]:
        """One sampling loop under the plan: its modules wrapped, each backbone call a step; unwrapped after."""
        self.step, self.kept_bytes = -1, 0
        wrapped = []
        handle = self.model.register_forward_pre_hook(self._next_step)
        try:
            for path, layer, component in self.targets:
                parent, _, name = path.rpartition(".")
                owner = self.model.get_submodule(parent)
                wrapper = Reusable(getattr(owner, name), self, layer, component)
                setattr(owner, name, wrapper)
                wrapped.append((owner, name, wrapper))
            yield self
        finally:
            handle.remove()
            for owner, name, wrapper in reversed(wrapped):
                setattr(owner, name, wrapper.inner)
            self.kept_bytes = 0
        if self.step + 1 != self.plan.steps:
            raise MiniditError(f"the sampler called the backbone {self.step + 1} times; the caching plan has "
                               f"{self.plan.steps} steps")

    def skipped_share(self) -> dict[str, float]:
        """Per component, the fraction of its module calls that were skipped."""
        return {c: self.skipped[i] / max(1, self.skipped[i] + self.computed[i]) for i, c in enumerate(COMPONENTS)}


def check_plan(plan: Plan, layers: list[AttentionLayer]) -> None:
    """Refuse a plan that reuses a cell the model cannot skip as the plan counts it (names and counts are checked
    by Plan.check_against)."""
    if len(layers) != len(plan.layers):
        raise MiniditError(f"this plan is for {len(plan.layers)} layers of {plan.model}; the model has {len(layers)}")
    for i, layer in enumerate(layers):
        steps = np.flatnonzero(plan.reuse[:, i, FFN])
        if len(steps) and not layer.ffn:
            raise MiniditError(f"the plan reuses the feed-forward of {layer.name} at step {steps[0]}, but that "
                               f"layer ({layer.kind}) has no feed-forward of its own: its ffn cells must be false")
        alone = np.flatnonzero(plan.reuse[:, i, FFN] & ~plan.reuse[:, i, ATTN])
        if layer.f_point == FUSED and len(alone):
            raise MiniditError(f"the plan reuses the feed-forward of {layer.name} without its attention at step "
                               f"{alone[0]}, but there the feed-forward is the whole block (FLUX single-stream): "
                               f"reuse both cells or neither")


def nbytes(out) -> int:
    """The bytes of a module output: a tensor, or a tuple of tensors and Nones."""
    if out is None:
        return 0
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    return sum(nbytes(x) for x in out)
