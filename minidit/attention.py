"""The one attention function every minidit model calls, and the hook point where K, V and A are recorded.

Each model computes q, k, v on visible lines (projection, head split, QK-norm, RoPE), then calls
`attention(q, k, v, layer=...)`, projects the result and passes it through `attention_output(...)`.
A recorder, when one is active (`recording(recorder)`), receives K and V at the first call and A at
the second. The block's feed-forward output passes through `feed_forward_output(...)`, which hands it
to the recorder as F, filed under the block's attention layer (the analysis records it with --ffn).
With no recorder active each call costs one `is None` test: no copies, no syncs.

`explicit_attention()` switches every call from PyTorch's fused kernel to the written-out
softmax(Q K^T * scale + bias) V, without touching model code; tests prove the two agree.
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

Streams = str | tuple[tuple[str, int], ...]
"""Which stream the tokens of a captured tensor belong to: one name ("img"), or consecutive token
ranges as (name, length) pairs, e.g. (("txt", 512), ("img", 4096)) for FLUX's joint sequence."""


@dataclass(frozen=True)
class AttentionLayer:
    """One recorded attention layer, as the model enumerates it (see ../design/analysis.md)."""

    name: str  # the module path, e.g. "transformer_blocks.3.attn1"
    kind: str  # self | joint | cross | spatial | temporal
    streams: tuple[str, ...] = ("img",)
    a_point: str = "post_proj"  # where A is taken: after the output projection, or "pre_proj"
    # where F is taken: "ffn", the block's FFN output after its last projection, before gate, residual or norm;
    # "block", the block's whole update of the residual stream (FLUX single-stream: attention and MLP share one
    # output projection, so the FFN has no output of its own); None: no F is filed under this layer (cross-attention)
    f_point: str | None = "ffn"
    # the modules whose outputs a caching plan reuses for this layer's feed-forward, by module path (the attention's
    # own module is `name`): the block's FFN, one per stream in joint blocks; for f_point "block", the block itself
    ffn: tuple[str, ...] = ()


def in_block(layer: str, *names: str) -> tuple[str, ...]:
    """The module paths of `names` in the block that holds attention `layer` ("transformer_blocks.3.attn1", "ff"
    -> ("transformer_blocks.3.ff",)): an AttentionLayer's `ffn`."""
    block = layer.rsplit(".", 1)[0]
    return tuple(f"{block}.{name}" for name in names)


class Recorder(Protocol):
    def capture(self, layer: str, tensor: str, x: torch.Tensor, token_dim: int, streams: Streams) -> None: ...


_recorder: Recorder | None = None
_explicit = False


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Route every K, V, A and F of every model to `recorder` inside the block."""
    global _recorder
    previous, _recorder = _recorder, recorder
    try:
        yield
    finally:
        _recorder = previous


@contextlib.contextmanager
def explicit_attention(enabled: bool = True) -> Iterator[None]:
    """Compute attention as written-out matrix products instead of the fused kernel."""
    global _explicit
    previous, _explicit = _explicit, enabled
    try:
        yield
    finally:
        _explicit = previous


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    layer: str | None = None,
    streams: Streams = "img",
) -> torch.Tensor:
    """Multi-head attention with heads merged in the output.

    q: (B, Nh, Lq, Dh); k, v: (B, Nh, Lk, Dh). `mask` is boolean (True = attend) or an additive bias,
    broadcastable to (B, Nh, Lq, Lk). `scale` defaults to 1/sqrt(Dh). `streams` labels the tokens of k
    and v for the recorder. Returns (B, Lq, Nh*Dh).
    """
    if _recorder is not None and layer is not None:
        _recorder.capture(layer, "K", k, 2, streams)
        _recorder.capture(layer, "V", v, 2, streams)
    if _explicit:
        out = _explicit_attention(q, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return rearrange(out, "B Nh L Dh -> B L (Nh Dh)")


def attention_output(a: torch.Tensor, *, layer: str | None = None, streams: Streams = "img") -> torch.Tensor:
    """Hand the layer's output A, shaped (B, L, D), to the recorder; returns it unchanged."""
    if _recorder is not None and layer is not None:
        _recorder.capture(layer, "A", a, 1, streams)
    return a


def feed_forward_output(f: torch.Tensor, *, layer: str | None = None, streams: Streams = "img") -> torch.Tensor:
    """Hand the block's feed-forward output F, shaped (B, L, D), to the recorder, filed under the block's attention
    layer `layer` (its self, joint, spatial or temporal attention, never a cross-attention); returns it unchanged."""
    if _recorder is not None and layer is not None:
        _recorder.capture(layer, "F", f, 1, streams)
    return f


def _explicit_attention(q, k, v, mask, scale) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Nh, Lq, Lk)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return scores.softmax(dim=-1) @ v
