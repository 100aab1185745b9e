"""The K/V/A recorder: per-step difference sums computed on the device, one host transfer per prompt.

For every (layer, stream, branch, tensor) it holds the previous step's tensor and, when the next step
captures the same tensor, adds up on the device in float32 (see ../design/analysis.md):

    s_abs = sum|X_d - X_{d-1}|    s_prev = sum|X_{d-1}|    s_sq   = sum (X_d - X_{d-1})^2
    s_dot = sum X_d * X_{d-1}     s_cur2 = sum X_d^2       s_prev2 = sum X_{d-1}^2

into a preallocated buffer [layer, stream, branch, tensor, transition, 6]. Nothing is synchronised
with the host inside a step; `finish()` copies the buffer once, checks it, and returns float64 sums
with the element count `n` prepended: [layer, stream, branch, tensor, transition, 7].

Captures are reduced in batches: they wait until the step ends or `FLUSH_BYTES` of them are pending,
then every group of equal size is stacked and reduced with one set of kernels. A small model would
otherwise spend as long launching the recorder's kernels as its own; a large model, whose every capture
exceeds the budget, is reduced capture by capture, so the recorder holds about one step of K, V and A.

Usage, around a sampling loop whose backbone is `model`:

    rec = Recorder(model.attention_layers(), branches=("cond", "uncond"), num_steps=50, device="cuda")
    with rec.attach(model):      # counts backbone calls, routes K/V/A from minidit.attention here
        latents = sample(...)
    sums = rec.finish()
"""

import contextlib
from typing import Iterator

import numpy as np
import torch

from minidit.attention import AttentionLayer, Streams, recording
from minidit.errors import MiniditError

TENSORS = ("K", "V", "A")
SUMS = ("n", "s_abs", "s_prev", "s_sq", "s_dot", "s_cur2", "s_prev2")
STREAM_ORDER = ("img", "txt")
FLUSH_BYTES = 64 * 2**20  # pending captures beyond this are reduced at once


class Recorder:
    def __init__(self, layers: list[AttentionLayer], *, branches: tuple[str, ...], num_steps: int,
                 device: str | torch.device, prev_on_host: bool = False):
        if num_steps < 2:
            raise MiniditError(f"the analysis compares consecutive steps: it needs at least 2 steps, got {num_steps}")
        self.layers, self.branches, self.num_steps = layers, branches, num_steps
        self.device, self.prev_on_host = torch.device(device), prev_on_host
        self.layer_index = {layer.name: i for i, layer in enumerate(layers)}
        self.streams = stream_axis(layers)
        self.held_bytes = 0  # the most memory the previous-step tensors took, over the run
        self.start_prompt()

    def start_prompt(self) -> None:
        shape = (len(self.layers), len(self.streams), len(self.branches), len(TENSORS), self.num_steps - 1)
        self.sums = torch.zeros(*shape, len(SUMS) - 1, dtype=torch.float32, device=self.device)
        self.energy = torch.zeros(*shape[:-1], self.num_steps, dtype=torch.float32, device=self.device)  # sum X^2
        self.n = np.zeros((len(self.layers), len(self.streams), len(TENSORS)), dtype=np.float64)
        self.indices: dict[tuple[tuple[int, int, int], ...], tuple[torch.Tensor, ...]] = {}
        self.pending: list[tuple[tuple[int, int, int], torch.Tensor]] = []  # captured this step, not yet reduced
        self.pending_bytes = 0
        # per group of keys reduced together: the previous step's stacked tensors, their L1 and squared norms
        self.prev: dict[tuple[tuple[int, int, int], ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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
        li, ti = self.layer_index[layer], TENSORS.index(tensor)
        parts = [(streams, x)] if isinstance(streams, str) else _split(x, token_dim, streams)
        for stream, part in parts:
            self.pending.append(((li, self.streams.index(stream), ti), _per_branch(part.detach(), len(self.branches))))
            self.pending_bytes += part.numel() * part.element_size()
        if self.pending_bytes >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Reduce the pending captures, one stacked batch per (size, dtype), in capture order."""
        groups: dict[tuple, list] = {}
        for key, x in self.pending:
            groups.setdefault((x.shape, x.dtype), []).append((key, x))
        for group in groups.values():
            keys = tuple(key for key, _ in group)
            xs = [x for _, x in group]
            self._reduce(keys, xs[0][None] if len(xs) == 1 else torch.stack(xs))
        self.pending, self.pending_bytes = [], 0

    def _reduce(self, keys: tuple[tuple[int, int, int], ...], cur: torch.Tensor) -> None:
        """cur: (G, Br, n), captures `keys` of this step in their own dtype."""
        li, si, ti = self._index(keys)
        x = cur.float()
        x_l1, x_sq = x.abs().sum(-1), torch.linalg.vecdot(x, x)  # (G, Br)
        self.energy[li, si, :, ti, self.step] = x_sq  # non-finite iff x has a non-finite element
        if self.step == 0:
            for key in keys:
                self.n[key] = x.shape[-1]
        else:
            held, p_l1, p_sq = self.prev[keys]
            p = held.to(self.device, non_blocking=True).float()
            d = x - p
            self.sums[li, si, :, ti, self.step - 1] = torch.stack(
                [d.abs().sum(-1), p_l1, torch.linalg.vecdot(d, d), torch.linalg.vecdot(x, p), x_sq, p_sq], dim=-1)
        held = cur.to("cpu", non_blocking=True) if self.prev_on_host else cur
        self.prev[keys] = (held, x_l1, x_sq)

    def _index(self, keys: tuple[tuple[int, int, int], ...]) -> tuple[torch.Tensor, ...]:
        """Device index tensors (layer, stream, tensor) for a group, made once per prompt."""
        if keys not in self.indices:
            self.indices[keys] = tuple(torch.tensor(axis, device=self.device) for axis in zip(*keys))
        return self.indices[keys]

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
        for held, _, _ in self.prev.values():
            ptr = held.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += held.untyped_storage().nbytes()
        return total

    def finish(self) -> np.ndarray:
        """Float64 sums [layer, stream, branch, tensor, transition, 7] (n first) of the prompt just sampled."""
        self._flush()
        if self.step != self.num_steps - 1:
            raise MiniditError(f"the backbone ran {self.step + 1} steps, the recorder expected {self.num_steps}")
        sums, energy = self.sums.double().cpu().numpy(), self.energy.cpu().numpy()  # the one host sync
        self.prev.clear()
        if not np.isfinite(energy).all() or not np.isfinite(sums).all():
            raise MiniditError(self._first_non_finite(energy))
        moved = sums[..., 0].sum(axis=(0, 1, 2, 3))  # total s_abs per transition
        if (moved == 0).any():
            d = int(np.argmin(moved))
            raise MiniditError(f"every K, V and A of step {d + 1} equals step {d}'s: a captured tensor was modified "
                               f"in place, or the backbone saw the same input twice; the statistics would be wrong")
        n = np.broadcast_to(self.n[:, :, None, :, None, None], sums.shape[:-1] + (1,))
        return np.concatenate([n, sums], axis=-1)


def stream_axis(layers: list[AttentionLayer]) -> tuple[str, ...]:
    """The streams the layers use, in the record's order (img first)."""
    used = {s for layer in layers for s in layer.streams}
    return tuple(s for s in STREAM_ORDER if s in used)


def _per_branch(x: torch.Tensor, branches: int) -> torch.Tensor:
    """(B, ...) -> (branches, n), elements in memory order: a free view when x is a permutation of a dense
    tensor (K and V after the head split are); the sums do not depend on the order of the elements."""
    order = sorted(range(1, x.ndim), key=lambda i: -x.stride(i))
    return x.permute(0, *order).reshape(branches, -1)


def _split(x: torch.Tensor, token_dim: int, streams: tuple[tuple[str, int], ...]):
    start = 0
    for stream, length in streams:
        yield stream, x.narrow(token_dim, start, length)
        start += length
    assert start == x.shape[token_dim], f"stream lengths {streams} do not cover {x.shape[token_dim]} tokens"
