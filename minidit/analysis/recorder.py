"""The K/V/A recorder: per-step difference sums computed on the device, one host transfer per prompt.

It records K, V and A (`TENSORS`), and with `tensors=tensors_to_record(ffn=True)` also F, the blocks' feed-forward
output (analyze.py --ffn); the captures of a tensor it does not record are ignored as they arrive.
For every (prompt, layer, stream, branch, tensor) it holds the previous step's tensor and, when the next step
captures the same tensor, adds up on the device in float32 (see ../design/analysis.md):

    s_abs = sum|X_d - X_{d-1}|    s_prev = sum|X_{d-1}|    s_sq   = sum (X_d - X_{d-1})^2
    s_dot = sum X_d * X_{d-1}     s_cur2 = sum X_d^2       s_prev2 = sum X_{d-1}^2

On the device only four sums are taken: per step sum|X| and sum X^2 of the captured tensor, per
transition s_abs and s_sq of the difference (the squares as 2-norms, squared in float64 by `finish()`,
which saves a kernel per step). The other three follow exactly: s_prev and s_prev2 are the
previous step's sum|X| and sum X^2, s_cur2 is this step's sum X^2, and s_dot = (s_cur2 + s_prev2 - s_sq) / 2
(evaluated in float64). Nothing is synchronised with the host inside a step; `finish()` copies the sums
once, checks them, and returns float64 sums [prompt, layer, stream, branch, tensor, transition, 7], n first.
A batch of P prompts is laid out branch by branch in `branches` order, e.g. [uncond: prompts 1..P; cond: prompts
1..P], and each of its samples is reduced on its own: a prompt's sums do not depend on the batch it ran in.

Small captures (below `GROUP_BELOW_BYTES`) are copied, as they arrive, into their place in a float32
buffer of the recorder's own that holds a group of them, and each group is reduced with one set of kernels
when the step ends: a small model would otherwise spend as long launching the recorder's kernels as its
own. Step 0 finds the groups: its small captures wait (at most `FLUSH_BYTES` of them), then those of equal
size and dtype become one group. Each group has two buffers, used in alternate steps, so the previous
step's values are at hand; they stay on the device (they are small). Larger captures are reduced as they
arrive, and the recorder keeps a reference to the model's tensor (no copy) until the next step's arrives: it
holds one step of K, V and A, plus one float32 work buffer per capture shape. With `prev_on_host` it keeps
them in host memory instead (`HostPrevious`): the accelerator then holds two staging buffers per capture shape.

Usage, around a sampling loop whose backbone is `model`:

    rec = Recorder(model.attention_layers(), branches=("cond", "uncond"), num_steps=50, device="cuda", prompts=4)
    with rec.attach(model):      # counts backbone calls, routes K/V/A from minidit.attention here
        latents = sample(...)    # 4 prompts: the backbone's batch is [cond x 4; uncond x 4]
    sums = rec.finish()          # [prompt, layer, stream, branch, tensor, transition, 7]
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from minidit.attention import AttentionLayer, Streams, recording
from minidit.errors import MiniditError

TENSORS = ("K", "V", "A")  # recorded by default
FFN = "F"  # the blocks' feed-forward output, recorded on request after K, V and A (see minidit/attention.py)
SUMS = ("n", "s_abs", "s_prev", "s_sq", "s_dot", "s_cur2", "s_prev2")
STREAM_ORDER = ("img", "txt")
GROUP_BELOW_BYTES = 2**20  # smaller captures are copied into groups and reduced together; larger ones at once
CPU_CHUNK = 2**18  # on the CPU, large captures are reduced this many elements per branch at a time
FLUSH_BYTES = 16 * 2**20  # at step 0, pending small captures beyond this are grouped without waiting for the end
X_L1, X_NORM, D_ABS, D_NORM = range(4)  # the rows of Group.stats

Key = tuple[int, int, int]  # (layer, stream, tensor) indices


@dataclass
class Group:
    """Captures reduced together, step after step, and their device sums."""

    keys: tuple[Key, ...]
    stats: torch.Tensor  # (steps, 4, G, R) float32, R the batch's samples; rows X_L1 ... D_NORM (D: from step 1 on)
    buffers: list[torch.Tensor] | None  # small captures: two (G, R, n) float32 buffers, one per step parity
    held: torch.Tensor | None = None  # a large capture: the previous step's (1, R, n) tensor
    step: int = -1  # a large capture: the step it was last reduced at


class Recorder:
    def __init__(self, layers: list[AttentionLayer], *, branches: tuple[str, ...], num_steps: int,
                 device: str | torch.device, prev_on_host: bool = False, prompts: int = 1,
                 tensors: tuple[str, ...] = TENSORS):
        if num_steps < 2:
            raise MiniditError(f"the analysis compares consecutive steps: it needs at least 2 steps, got {num_steps}")
        if tuple(tensors) not in (TENSORS, tensors_to_record(ffn=True)):
            raise MiniditError(f"a recorder records {TENSORS} or {tensors_to_record(ffn=True)}, not {tuple(tensors)}")
        self.tensors = tuple(tensors)  # the record's tensor axis
        self.tensor_index = {name: i for i, name in enumerate(self.tensors)}
        self.layers, self.branches, self.num_steps = layers, branches, num_steps
        self.prompts = prompts  # the batch is [branch 0: prompts 0..P-1; branch 1: prompts 0..P-1; ...]
        self.rows = len(branches) * prompts  # the batch's samples, each reduced on its own
        self.device, self.prev_on_host = torch.device(device), prev_on_host
        self.host_bytes = 0  # with prev_on_host: the host memory the previous-step tensors took
        self.layer_index = {layer.name: i for i, layer in enumerate(layers)}
        self.streams = stream_axis(layers)
        self.stream_index = {name: i for i, name in enumerate(self.streams)}
        self.held_bytes = 0  # the most memory the previous-step tensors took, over the run
        self.start_prompt()

    def start_prompt(self) -> None:
        self.n = np.zeros((len(self.layers), len(self.streams), len(self.tensors)), dtype=np.float64)
        self.groups: dict[tuple[Key, ...], Group] = {}
        self.places: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}  # a small capture's views into its buffers
        self.scratch: dict[tuple[int, int], torch.Tensor] = {}  # float32 work space for large captures, by size
        self.pending: list[tuple[Key, torch.Tensor]] = []  # small captures of step 0, not yet grouped
        self.pending_bytes = 0
        self.host = HostPrevious(self.device) if self.prev_on_host else None
        self.step = -1
        self.taken = self.expected = 0  # captures this step, and at step 0

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator["Recorder"]:
        """Count `model`'s forward calls as steps and receive its K, V and A (and F) inside the block."""
        handle = model.register_forward_pre_hook(self._next_step)
        try:
            with recording(self):
                yield self
        finally:
            handle.remove()

    def _next_step(self, *_) -> None:
        self._end_step()
        self.step += 1
        if self.step >= self.num_steps:
            raise MiniditError(f"the backbone was called more than the {self.num_steps} steps the recorder expects")

    def capture(self, layer: str, tensor: str, x: torch.Tensor, token_dim: int, streams: Streams) -> None:
        li, ti = self.layer_index.get(layer), self.tensor_index.get(tensor)
        if li is None or ti is None:  # a layer or tensor the run does not record (cross-attention, F without --ffn)
            return
        if isinstance(streams, str):
            self._take((li, self.stream_index[streams], ti), x.detach())
        else:
            for stream, part in _split(x.detach(), token_dim, streams):
                self._take((li, self.stream_index[stream], ti), part)

    def _take(self, key: Key, x: torch.Tensor) -> None:
        self.taken += 1
        place = self.places.get(key)
        if place is not None:  # a small capture, after step 0: into its place, reduced at the step's end
            place[self.step % 2].copy_(x)
        elif x.numel() * x.element_size() >= GROUP_BELOW_BYTES:  # large: reduce now, hold the model's own tensor
            group = self.groups.get((key,)) or self._new_group((key,), [x], grouped=False)
            self._reduce_large(group, _per_sample(x, self.rows), key)
        else:
            if self.step > 0:
                raise MiniditError(f"step {self.step} captured {self._describe(key)}, which step 0 did not: the "
                                   f"model's attention calls must be the same at every step")
            self.pending.append((key, x))
            self.pending_bytes += x.numel() * x.element_size()
            if self.pending_bytes >= FLUSH_BYTES:
                self._group_pending()

    def _group_pending(self) -> None:
        """Step 0: make one group of the pending captures of each size and dtype, and copy them in."""
        by_size: dict[tuple, list[tuple[Key, torch.Tensor]]] = {}
        for key, x in self.pending:
            by_size.setdefault((x.numel(), x.dtype), []).append((key, x))
        for captures in by_size.values():
            self._new_group(tuple(key for key, _ in captures), [x for _, x in captures], grouped=True)
            for key, x in captures:
                self.places[key][0].copy_(x)
        self.pending, self.pending_bytes = [], 0

    def _end_step(self) -> None:
        if self.step == 0:
            self._group_pending()
            self.expected = self.taken
        elif self.taken != self.expected:
            raise MiniditError(f"step {self.step} captured {self.taken} tensors, step 0 captured {self.expected}: "
                               f"the model's attention calls must be the same at every step")
        self.taken = 0
        for group in self.groups.values():
            if group.buffers is not None:
                self._reduce_group(group)

    def _new_group(self, keys: tuple[Key, ...], xs: list[torch.Tensor], *, grouped: bool) -> Group:
        if self.step > 0:
            raise MiniditError(f"step {self.step} captured {self._describe(keys[0])}, which step 0 did not: the "
                               f"model's attention calls must be the same at every step")
        rows, x = self.rows, xs[0]
        stats = torch.zeros(self.num_steps, 4, len(xs), rows, dtype=torch.float32, device=self.device)
        buffers = None
        if grouped:
            buffers = [torch.empty(len(xs), rows, x.numel() // rows, device=self.device) for _ in range(2)]
        for i, (key, x) in enumerate(zip(keys, xs)):
            if key in self.places or (key,) in self.groups:
                raise MiniditError(f"{self._describe(key)} was captured twice in one step: each attention layer "
                                   f"must run once per backbone call")
            if grouped:
                # the capture's elements in its own logical order, the same at every step
                self.places[key] = (buffers[0][i].view(x.shape), buffers[1][i].view(x.shape))
            self.n[key] = x.numel() // rows
        self.groups[keys] = Group(keys, stats, buffers)
        return self.groups[keys]

    def _reduce_group(self, group: Group) -> None:
        """This step's captures of `group` are in buffers[step % 2]; the previous step's in the other one."""
        cur, other, stats = group.buffers[self.step % 2], group.buffers[1 - self.step % 2], group.stats[self.step]
        torch.linalg.vector_norm(cur, dim=-1, out=stats[X_NORM])
        if self.step > 0:
            d = other.sub_(cur)  # X_{d-1} - X_d: the previous values are not needed after this step
            torch.linalg.vector_norm(d, dim=-1, out=stats[D_NORM])
            torch.sum(d.abs_(), dim=-1, out=stats[D_ABS])
        torch.sum(torch.abs(cur, out=other), dim=-1, out=stats[X_L1])

    def _reduce_large(self, group: Group, cur: torch.Tensor, key: Key) -> None:
        """cur: (R, n), this step's capture in its own dtype, a view of the model's tensor."""
        if group.step == self.step:
            raise MiniditError(f"{self._describe(group.keys[0])} was captured twice in one step: each attention "
                               f"layer must run once per backbone call")
        group.step = self.step
        prev = None
        if self.step > 0:
            prev = (self.host.previous(key) if self.host else group.held)[0]  # (R, n)
        # On the CPU the capture is reduced a cache-sized chunk at a time: x and the previous step are read from
        # memory once, the float32 difference and the absolute values stay in cache (twice as fast as whole passes
        # over a large capture). On an accelerator, one chunk: every extra kernel launch would cost more.
        size = min(cur.shape[1], CPU_CHUNK) if self.device.type == "cpu" else cur.shape[1]
        work = self.scratch.get((len(cur), size))  # float32, the recorder's own: a model's tensor is never written
        if work is None:
            work = self.scratch[(len(cur), size)] = torch.empty(len(cur), size, device=self.device)
        total = group.stats[self.step].zero_()  # (4, 1, R): sums, and sums of squares where norms go
        part = torch.zeros_like(total[:, 0])  # (4, R); the difference rows stay 0 at step 0
        for start in range(0, cur.shape[1], size):
            x, w = cur[:, start:start + size], work[:, :min(size, cur.shape[1] - start)]
            torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32, out=part[X_NORM])
            if prev is not None:
                d = torch.sub(prev[:, start:start + size], _float32(x, w), out=w)  # X_{d-1} - X_d, in float32
                torch.linalg.vector_norm(d, dim=-1, out=part[D_NORM])
                torch.sum(d.abs_(), dim=-1, out=part[D_ABS])
            torch.sum(torch.abs(_float32(x, w), out=w), dim=-1, out=part[X_L1])
            part[X_NORM].square_()
            part[D_NORM].square_()
            total[:, 0] += part
        total[X_NORM].sqrt_()  # norms, as the small captures' rows hold them
        total[D_NORM].sqrt_()
        if self.host:
            if prev is not None:
                self.host.release(prev)
            self.host.store(key, cur[None], step=self.step, last_step=self.step == self.num_steps - 1)
        else:
            group.held = cur[None]

    def _describe(self, key: Key) -> str:
        li, si, ti = key
        return f"{self.tensors[ti]} of layer {self.layers[li].name} ({self.streams[si]})"

    def _first_non_finite(self, energy: np.ndarray) -> str:
        bad = ~np.isfinite(energy).any(axis=0)  # [layer, stream, branch, tensor, step], any prompt of the batch
        step = int(np.argwhere(bad.any(axis=(0, 1, 2, 3)))[0, 0]) if bad.any() else None
        where = "a difference between two steps overflowed"
        if step is not None:
            li, si, bi, ti = np.argwhere(bad[..., step])[0]  # first layer in enumeration order, then K, V, A, F
            where = (f"non-finite {self.tensors[ti]} in layer {self.layers[li].name} ({self.streams[si]}, "
                     f"{self.branches[bi]}) at step {step}")
        return (f"{where}: an overflow, often T5 or attention in fp16; retry with --dtype bf16 or fp32. "
                f"Nothing was recorded for this prompt")

    def _bytes_held(self) -> int:
        """On the device: the small captures' buffers, the large captures' previous steps (or their staging
        buffers when they are on the host) and float32 work buffers."""
        seen, total = set(), 0
        held = [t for g in self.groups.values() for t in g.buffers or [g.held] if t is not None]
        held += list(self.scratch.values())
        if self.host:
            held += [t for slots in self.host.slots.values() for t in slots]
        for t in held:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def finish(self) -> np.ndarray:
        """Float64 sums [prompt, layer, stream, branch, tensor, transition, 7] (n first) of the batch just sampled."""
        self._end_step()
        if self.step != self.num_steps - 1:
            raise MiniditError(f"the backbone ran {self.step + 1} steps, the recorder expected {self.num_steps}")
        self.held_bytes = max(self.held_bytes, self._bytes_held())  # as at every step from the first on
        self.host_bytes = max(self.host_bytes, self.host.host_bytes() if self.host else 0)
        groups = list(self.groups.values())
        stats = torch.cat([g.stats.flatten(2) for g in groups], dim=2).double().cpu().numpy()  # the one host sync
        for g in groups:
            g.held = g.buffers = None
        self.places, self.scratch, self.host = {}, {}, None
        # scatter the groups' columns to [prompt, layer, stream, branch, tensor, step, row]
        branches, prompts = len(self.branches), self.prompts
        per_step = np.zeros((prompts, *self.n.shape[:2], branches, len(self.tensors), self.num_steps, 4))
        start = 0
        for g in groups:
            li, si, ti = (np.array(axis) for axis in zip(*g.keys))
            width = len(g.keys) * self.rows
            cols = stats[:, :, start:start + width].reshape(self.num_steps, 4, len(g.keys), branches, prompts)
            per_step[:, li, si, :, ti] = cols.transpose(2, 4, 3, 0, 1)  # (G, P, Br, steps, 4)
            start += width
        per_step[..., X_NORM] **= 2  # sum X^2
        per_step[..., D_NORM] **= 2  # sum (X_d - X_{d-1})^2
        if not np.isfinite(per_step).all():
            raise MiniditError(self._first_non_finite(per_step[..., X_NORM]))
        cur, prev = per_step[..., 1:, :], per_step[..., :-1, :]
        s_sq = cur[..., D_NORM]
        sums = np.stack([cur[..., D_ABS], prev[..., X_L1], s_sq, (cur[..., X_NORM] + prev[..., X_NORM] - s_sq) / 2,
                         cur[..., X_NORM], prev[..., X_NORM]], axis=-1)
        moved = sums[..., 0].sum(axis=(1, 2, 3, 4))  # total s_abs per prompt and transition
        if (moved == 0).any():
            d = int(np.argwhere(moved == 0)[0, 1])
            raise MiniditError(f"every {', '.join(self.tensors)} of step {d + 1} equals step {d}'s: a captured tensor "
                               f"was modified in place, or the backbone saw the same input twice; the statistics "
                               f"would be wrong")
        n = np.broadcast_to(self.n[None, :, :, None, :, None, None], sums.shape[:-1] + (1,))
        return np.concatenate([n, sums], axis=-1)


class HostPrevious:
    """The previous step of every large capture in host memory (`prev_on_host`), for models whose K, V and A of
    one step do not fit beside the model (CogVideoX-5b at 49 frames: 27.5 GB in bf16).

    Each capture has a host buffer of its own, pinned on CUDA. `store` writes the capture into it from a side
    stream as soon as the recorder has reduced it, and then stages the previous step of the capture expected
    next (captures come in the same order at every step) from the host into one of two device buffers per
    capture shape, from a second side stream: both copies overlap the model's work, and `previous` only waits
    for the staging copy it needs. On the CPU the same steps run as plain copies.
    """

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.device = device
        self.to_host = torch.cuda.Stream(device) if cuda else None  # device -> host copies
        self.to_device = torch.cuda.Stream(device) if cuda else None  # host -> device staging copies
        self.buffers: dict[Key, torch.Tensor] = {}  # the host buffers, one per capture
        self.written: dict[Key, torch.cuda.Event | None] = {}  # when each host buffer's last write is done
        self.order: list[Key] = []  # the captures in the order of the first step
        self.position: dict[Key, int] = {}  # each capture's place in that order
        self.slots: dict[tuple, list[torch.Tensor]] = {}  # (shape, dtype) -> two device staging buffers
        self.slot_free: dict[int, torch.cuda.Event | None] = {}  # staging buffer (data_ptr) -> when its reader ends
        self.turn: dict[tuple, int] = {}  # (shape, dtype) -> the staging buffer to use next
        self.staged: dict[Key, tuple[torch.Tensor, torch.cuda.Event | None]] = {}  # previous steps already staged

    def previous(self, key: Key) -> torch.Tensor:
        """The capture's previous step on the device, in its own dtype."""
        staged = self.staged.pop(key, None)
        self.staged.clear()  # staged for a capture that did not come next: its buffer may be reused, drop it
        slot, ready = staged or self._stage(key)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        return slot

    def release(self, slot: torch.Tensor) -> None:
        """The recorder has queued its last read of `slot`: a later staging copy may overwrite it after that."""
        self.slot_free[slot.data_ptr()] = self._event(torch.cuda.current_stream(self.device) if self.to_host else None)

    def store(self, key: Key, x: torch.Tensor, step: int, last_step: bool) -> None:
        """Copy this step's capture to its host buffer, then stage the previous step of the next capture (from
        step 1 on: the first step sets the order)."""
        host = self.buffers.get(key)
        if host is None:
            host = self.buffers[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.to_host is not None)
            self.position[key] = len(self.order)
            self.order.append(key)
        if self.to_host is not None:  # the copy starts after the work queued so far (x's values, the reduction)
            self.to_host.wait_stream(torch.cuda.current_stream(self.device))
        with self._on(self.to_host):
            host.copy_(x, non_blocking=True)
            self.written[key] = self._event(self.to_host)
        if self.to_host is not None:
            x.record_stream(self.to_host)  # the allocator must not reuse x's memory before the copy is done
        if step == 0:
            return
        following = self.order[(self.position[key] + 1) % len(self.order)]
        if following != key and not (last_step and following == self.order[0]):
            self.staged[following] = self._stage(following, side=True)

    def _stage(self, key: Key, side: bool = False) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        host = self.buffers[key]
        kind = (host.shape, host.dtype)
        if kind not in self.slots:
            self.slots[kind] = [torch.empty(host.shape, dtype=host.dtype, device=self.device) for _ in range(2)]
            self.turn[kind] = 0
        slot = self.slots[kind][self.turn[kind]]
        self.turn[kind] ^= 1
        stream = self.to_device if side else None
        with self._on(stream):
            for event in (self.written.get(key), self.slot_free.get(slot.data_ptr())):
                if event is not None:
                    torch.cuda.current_stream(self.device).wait_event(event)
            slot.copy_(host, non_blocking=True)
            ready = self._event(stream)
        return slot, ready

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    def _on(self, stream: torch.cuda.Stream | None):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _event(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event


def tensors_to_record(ffn: bool = False) -> tuple[str, ...]:
    """The record's tensor axis: K, V, A, and F after them with `ffn`."""
    return (*TENSORS, FFN) if ffn else TENSORS


def stream_axis(layers: list[AttentionLayer]) -> tuple[str, ...]:
    """The streams the layers use, in the record's order (img first)."""
    used = {s for layer in layers for s in layer.streams}
    return tuple(s for s in STREAM_ORDER if s in used)


def _per_sample(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, ...) -> (rows, n), one row per sample of the batch (B may fold samples with frames or tokens: the
    samples stay outermost), elements in memory order: a free view when x is a permutation of a dense tensor
    (K and V after the head split are); the sums do not depend on the order of the elements."""
    if x.is_contiguous():
        return x.view(rows, -1)
    order = sorted(range(1, x.ndim), key=lambda i: -x.stride(i))
    return x.permute(0, *order).reshape(rows, -1)


def _float32(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """x itself when it is float32, else its float32 copy in `work`."""
    return x if x.dtype == torch.float32 else work.copy_(x)


def _split(x: torch.Tensor, token_dim: int, streams: tuple[tuple[str, int], ...]):
    start = 0
    for stream, length in streams:
        yield stream, x.narrow(token_dim, start, length)
        start += length
    assert start == x.shape[token_dim], f"stream lengths {streams} do not cover {x.shape[token_dim]} tokens"
