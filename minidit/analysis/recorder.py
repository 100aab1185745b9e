"""The K/V/A recorder: per-step difference sums computed on the device, one host transfer per prompt.

For every (layer, stream, branch, tensor) it holds the previous step's tensor and, when the next step
captures the same tensor, adds up on the device in float32 (see ../design/analysis.md):

    s_abs = sum|X_d - X_{d-1}|    s_prev = sum|X_{d-1}|    s_sq   = sum (X_d - X_{d-1})^2
    s_dot = sum X_d * X_{d-1}     s_cur2 = sum X_d^2       s_prev2 = sum X_{d-1}^2

On the device only four sums are taken: per step sum|X| and sum X^2 of the captured tensor, per
transition s_abs and s_sq of the difference. The other three follow exactly: s_prev and s_prev2 are the
previous step's sum|X| and sum X^2, s_cur2 is this step's sum X^2, and s_dot = (s_cur2 + s_prev2 - s_sq) / 2
(evaluated in float64). Nothing is synchronised with the host inside a step; `finish()` copies the sums
once, checks them, and returns float64 sums [layer, stream, branch, tensor, transition, 7], n first.

Small captures (below `STACK_BELOW_BYTES`) are reduced in groups: they wait until the step ends or
`FLUSH_BYTES` of them are pending, then the captures of equal size and dtype are stacked into a buffer of
the recorder's own and reduced with one set of kernels; a small model would otherwise spend as long
launching the recorder's kernels as its own. Larger captures are reduced as they arrive, and the recorder
keeps a reference to the model's tensor (no copy) until the next step's arrives: it holds one step of K,
V and A, plus a float32 work copy of one capture while reducing it.

Usage, around a sampling loop whose backbone is `model`:

    rec = Recorder(model.attention_layers(), branches=("cond", "uncond"), num_steps=50, device="cuda")
    with rec.attach(model):      # counts backbone calls, routes K/V/A from minidit.attention here
        latents = sample(...)
    sums = rec.finish()
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from minidit.attention import AttentionLayer, Streams, recording
from minidit.errors import MiniditError

TENSORS = ("K", "V", "A")
TENSOR_INDEX = {name: i for i, name in enumerate(TENSORS)}
SUMS = ("n", "s_abs", "s_prev", "s_sq", "s_dot", "s_cur2", "s_prev2")
STREAM_ORDER = ("img", "txt")
STACK_BELOW_BYTES = 2**20  # smaller captures wait and are stacked with their likes; larger ones are reduced at once
FLUSH_BYTES = 16 * 2**20  # pending small captures beyond this are reduced without waiting for the step's end
X_L1, X_SQ, D_ABS, D_SQ = range(4)  # the rows of Group.stats

Key = tuple[int, int, int]  # (layer, stream, tensor) indices


@dataclass
class Group:
    """Captures reduced together, step after step, and their device sums."""

    keys: tuple[Key, ...]
    stats: torch.Tensor  # (steps, 4, G, Br) float32: sum|X|, sum X^2 per step; s_abs, s_sq at transition rows 1..
    buffers: list[torch.Tensor] | None  # two stack buffers, used alternately; None: a single capture, not copied
    held: torch.Tensor | None = None  # the previous step's (G, Br, n) tensor


class Recorder:
    def __init__(self, layers: list[AttentionLayer], *, branches: tuple[str, ...], num_steps: int,
                 device: str | torch.device, prev_on_host: bool = False):
        if num_steps < 2:
            raise MiniditError(f"the analysis compares consecutive steps: it needs at least 2 steps, got {num_steps}")
        self.layers, self.branches, self.num_steps = layers, branches, num_steps
        self.device, self.prev_on_host = torch.device(device), prev_on_host
        self.layer_index = {layer.name: i for i, layer in enumerate(layers)}
        self.streams = stream_axis(layers)
        self.stream_index = {name: i for i, name in enumerate(self.streams)}
        self.held_bytes = 0  # the most memory the previous-step tensors took, over the run
        self.start_prompt()

    def start_prompt(self) -> None:
        self.n = np.zeros((len(self.layers), len(self.streams), len(TENSORS)), dtype=np.float64)
        self.groups: dict[tuple[Key, ...], Group] = {}
        self.pending: list[tuple[Key, torch.Tensor]] = []  # captured this step, not yet reduced
        self.pending_bytes = 0
        self.step = -1

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator["Recorder"]:
        """Count `model`'s forward calls as steps and receive its K, V and A inside the block."""
        handle = model.register_forward_pre_hook(self._next_step)
        try:
            with recording(self):
                yield self
        finally:
            handle.remove()

    def _next_step(self, *_) -> None:
        self._flush()
        self.step += 1
        if self.step >= self.num_steps:
            raise MiniditError(f"the backbone was called more than the {self.num_steps} steps the recorder expects")
        if self.step == 1:
            self.held_bytes = max(self.held_bytes, self._bytes_held())

    def capture(self, layer: str, tensor: str, x: torch.Tensor, token_dim: int, streams: Streams) -> None:
        li, ti = self.layer_index.get(layer), TENSOR_INDEX[tensor]
        if li is None:  # a layer the run does not record (e.g. PixArt's cross-attention, unless asked for)
            return
        parts = [(streams, x)] if isinstance(streams, str) else _split(x, token_dim, streams)
        for stream, part in parts:
            key, x = (li, self.stream_index[stream], ti), _per_branch(part.detach(), len(self.branches))
            size = x.numel() * x.element_size()
            if size >= STACK_BELOW_BYTES:  # large: reduce now, and hold the model's own tensor, not a copy
                self._reduce(self.groups.get((key,)) or self._new_group((key,), [x]), x[None])
            else:
                self.pending.append((key, x))
                self.pending_bytes += size
        if self.pending_bytes >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Reduce the pending captures, one stacked group per (size, dtype), in capture order."""
        by_size: dict[tuple, list[tuple[Key, torch.Tensor]]] = {}
        for key, x in self.pending:
            by_size.setdefault((x.shape, x.dtype), []).append((key, x))
        for captures in by_size.values():
            keys = tuple(key for key, _ in captures)
            xs = [x for _, x in captures]
            group = self.groups.get(keys) or self._new_group(keys, xs)
            cur = xs[0][None] if group.buffers is None else torch.stack(xs, out=group.buffers[self.step % 2])
            self._reduce(group, cur)
        self.pending, self.pending_bytes = [], 0

    def _new_group(self, keys: tuple[Key, ...], xs: list[torch.Tensor]) -> Group:
        if self.step > 0:
            raise MiniditError(f"step {self.step} captured tensors that step 0 did not ({keys}): the model's "
                               f"attention calls must be the same at every step")
        x = xs[0]
        buffers = None if len(xs) == 1 else [x.new_empty(len(xs), *x.shape) for _ in range(2)]
        stats = torch.zeros(self.num_steps, 4, len(xs), x.shape[0], dtype=torch.float32, device=self.device)
        for key in keys:
            self.n[key] = x.shape[-1]
        self.groups[keys] = Group(keys, stats, buffers)
        return self.groups[keys]

    def _reduce(self, group: Group, cur: torch.Tensor) -> None:
        """cur: (G, Br, n), this step's captures of `group` in their own dtype."""
        x, stats = cur.float(), group.stats[self.step]
        torch.linalg.vector_norm(x, dim=-1, out=stats[X_SQ]).square_()
        if group.held is None:
            work = torch.empty_like(x)
        else:
            # The previous step's values are not needed after this step: when they sit in a tensor of the
            # recorder's own (a stack buffer, a float32 or device copy), it becomes the work buffer. A model's
            # own tensor is never written to.
            p = group.held.to(self.device, non_blocking=True)
            own = group.buffers is not None or p.dtype != torch.float32 or p.data_ptr() != group.held.data_ptr()
            work = p.float() if own else p.clone()
            d = work.sub_(x)  # X_{d-1} - X_d
            torch.linalg.vector_norm(d, dim=-1, out=stats[D_SQ]).square_()
            torch.sum(d.abs_(), dim=-1, out=stats[D_ABS])
        torch.sum(torch.abs(x, out=work), dim=-1, out=stats[X_L1])
        group.held = cur.to("cpu", non_blocking=True) if self.prev_on_host else cur

    def _first_non_finite(self, energy: np.ndarray) -> str:
        bad = ~np.isfinite(energy)  # [layer, stream, branch, tensor, step]
        step = int(np.argwhere(bad.any(axis=(0, 1, 2, 3)))[0, 0]) if bad.any() else None
        where = "a difference between two steps overflowed"
        if step is not None:
            li, si, bi, ti = np.argwhere(bad[..., step])[0]  # first layer in enumeration order, then K, V, A
            where = (f"non-finite {TENSORS[ti]} in layer {self.layers[li].name} ({self.streams[si]}, "
                     f"{self.branches[bi]}) at step {step}")
        return (f"{where}: an overflow, often T5 or attention in fp16; retry with --dtype bf16 or fp32. "
                f"Nothing was recorded for this prompt")

    def _bytes_held(self) -> int:
        seen, total = set(), 0
        for group in self.groups.values():
            if group.held is None:
                continue
            storage = group.held.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def finish(self) -> np.ndarray:
        """Float64 sums [layer, stream, branch, tensor, transition, 7] (n first) of the prompt just sampled."""
        self._flush()
        if self.step != self.num_steps - 1:
            raise MiniditError(f"the backbone ran {self.step + 1} steps, the recorder expected {self.num_steps}")
        groups = list(self.groups.values())
        stats = torch.cat([g.stats.flatten(2) for g in groups], dim=2).double().cpu().numpy()  # the one host sync
        for g in groups:
            g.held = None
        # scatter the groups' columns to [layer, stream, branch, tensor, step, row]
        per_step = np.zeros((*self.n.shape[:2], len(self.branches), len(TENSORS), self.num_steps, 4))
        start = 0
        for g in groups:
            li, si, ti = (np.array(axis) for axis in zip(*g.keys))
            width = len(g.keys) * len(self.branches)
            cols = stats[:, :, start:start + width].reshape(self.num_steps, 4, len(g.keys), len(self.branches))
            per_step[li, si, :, ti] = cols.transpose(2, 3, 0, 1)  # (G, Br, steps, 4)
            start += width
        energy = per_step[..., X_SQ]
        if not np.isfinite(per_step).all():
            raise MiniditError(self._first_non_finite(energy))
        cur, prev = per_step[..., 1:, :], per_step[..., :-1, :]
        s_sq = cur[..., D_SQ]
        sums = np.stack([cur[..., D_ABS], prev[..., X_L1], s_sq, (cur[..., X_SQ] + prev[..., X_SQ] - s_sq) / 2,
                         cur[..., X_SQ], prev[..., X_SQ]], axis=-1)
        moved = sums[..., 0].sum(axis=(0, 1, 2, 3))  # total s_abs per transition
        if (moved == 0).any():
            d = int(np.argmin(moved))
            raise MiniditError(f"every K, V and A of step {d + 1} equals step {d}'s: a captured tensor was modified "
                               f"in place, or the backbone saw the same input twice; the statistics would be wrong")
        n = np.broadcast_to(self.n[:, :, None, :, None, None], sums.shape[:-1] + (1,))
        return np.concatenate([n, sums], axis=-1)


def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares over the last dim: the squared 2-norm, which torch computes without a temporary."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def stream_axis(layers: list[AttentionLayer]) -> tuple[str, ...]:
    """The streams the layers use, in the record's order (img first)."""
    used = {s for layer in layers for s in layer.streams}
    return tuple(s for s in STREAM_ORDER if s in used)


def _per_branch(x: torch.Tensor, branches: int) -> torch.Tensor:
    """(B, ...) -> (branches, n), elements in memory order: a free view when x is a permutation of a dense
    tensor (K and V after the head split are); the sums do not depend on the order of the elements."""
    if x.is_contiguous():
        return x.view(branches, -1)
    order = sorted(range(1, x.ndim), key=lambda i: -x.stride(i))
    return x.permute(0, *order).reshape(branches, -1)


def _split(x: torch.Tensor, token_dim: int, streams: tuple[tuple[str, int], ...]):
    start = 0
    for stream, length in streams:
        yield stream, x.narrow(token_dim, start, length)
        start += length
    assert start == x.shape[token_dim], f"stream lengths {streams} do not cover {x.shape[token_dim]} tokens"
