"""The shared attention function: explicit path == fused path (== a float64 hand computation), head merging,
and the recorder hook point (what it receives, and that it receives nothing when inactive)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minidit import attention as attention_module
from minidit.attention import attention, attention_output, explicit_attention, recording

FIXTURES = Path(__file__).parent / "fixtures" / "dit"
B, NH, DH = 2, 3, 8


def qkv(lq: int, lk: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, NH, lq, DH, generator=g), torch.randn(B, NH, lk, DH, generator=g),
            torch.randn(B, NH, lk, DH, generator=g))


def bool_mask(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """Random True/False, with the last key always attendable so that no row is fully masked."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[..., -1] = True
    return mask


def float_bias(shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    """An additive bias: random values, some -inf entries (never a whole row)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(shape, generator=g) * 2
    bias[..., 0] = float("-inf")
    return bias


def hand_attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) V in float64, heads merged as (B, Lq, Nh*Dh)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q.double() @ k.double().transpose(-2, -1) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    out = scores.softmax(-1) @ v.double()  # (B, Nh, Lq, Dh)
    return out.permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


CASES = {
    "no-mask": dict(lq=7, lk=7),
    "bool-mask-full": dict(lq=7, lk=7, mask=lambda lq, lk: bool_mask((B, NH, lq, lk))),
    "bool-mask-key-padding": dict(lq=7, lk=7, mask=lambda lq, lk: bool_mask((B, 1, 1, lk))),
    "float-mask": dict(lq=7, lk=7, mask=lambda lq, lk: float_bias((B, NH, lq, lk))),
    "float-mask-broadcast": dict(lq=7, lk=7, mask=lambda lq, lk: float_bias((lq, lk))),
    "custom-scale": dict(lq=7, lk=7, scale=0.3),
    "unscaled": dict(lq=7, lk=7, scale=1.0),  # T5's attention
    "cross-lq<lk": dict(lq=3, lk=11),
    "cross-lq>lk-bool-mask": dict(lq=9, lk=4, mask=lambda lq, lk: bool_mask((B, 1, lq, lk))),
    "cross-float-mask-scale": dict(lq=5, lk=6, scale=0.2, mask=lambda lq, lk: float_bias((B, NH, lq, lk))),
}


@pytest.mark.parametrize("case", CASES)
def test_explicit_equals_fused(case):
    spec = CASES[case]
    q, k, v = qkv(spec["lq"], spec["lk"])
    mask = spec["mask"](spec["lq"], spec["lk"]) if "mask" in spec else None
    scale = spec.get("scale")
    fused = attention(q, k, v, mask=mask, scale=scale)
    with explicit_attention():
        explicit = attention(q, k, v, mask=mask, scale=scale)
    expected = hand_attention(q, k, v, mask, scale)
    assert fused.shape == explicit.shape == (B, spec["lq"], NH * DH)
    assert torch.isfinite(fused).all() and torch.isfinite(explicit).all()
    assert (explicit - fused).abs().max() < 1e-6
    assert (fused.double() - expected).abs().max() < 1e-5
    assert (explicit.double() - expected).abs().max() < 1e-5


def test_fused_path_is_pytorch_sdpa_with_heads_merged_in_order():
    q, k, v = qkv(5, 6)
    out = attention(q, k, v)
    reference = F.scaled_dot_product_attention(q, k, v)  # (B, Nh, Lq, Dh)
    for h in range(NH):
        assert torch.equal(out[:, :, h * DH:(h + 1) * DH], reference[:, h])


def test_explicit_attention_switches_kernels_and_restores(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting_sdpa)
    q, k, v = qkv(4, 4)
    with explicit_attention():
        attention(q, k, v)
        assert calls == []
        with explicit_attention(False):  # a nested switch back to the fused kernel
            attention(q, k, v)
        assert calls == [1]
        attention(q, k, v)
        assert calls == [1]
    attention(q, k, v)
    assert calls == [1, 1]
    with pytest.raises(RuntimeError), explicit_attention():
        raise RuntimeError("leaves the block")
    attention(q, k, v)
    assert calls == [1, 1, 1]


class FakeRecorder:
    def __init__(self):
        self.calls = []

    def capture(self, layer, tensor, x, token_dim, streams):
        self.calls.append(dict(layer=layer, tensor=tensor, x=x, token_dim=token_dim, streams=streams))


def test_recorder_receives_k_v_then_a():
    q, k, v = qkv(5, 9)
    rec = FakeRecorder()
    streams = (("txt", 4), ("img", 5))
    with recording(rec):
        out = attention(q, k, v, layer="blocks.0.attn", streams=streams)
        a = out * 2  # stands for the output projection
        returned = attention_output(a, layer="blocks.0.attn", streams=streams)
    assert returned is a
    assert [(c["layer"], c["tensor"], c["token_dim"]) for c in rec.calls] == [
        ("blocks.0.attn", "K", 2), ("blocks.0.attn", "V", 2), ("blocks.0.attn", "A", 1)]
    assert all(c["streams"] == streams for c in rec.calls)
    captured_k, captured_v, captured_a = (c["x"] for c in rec.calls)
    assert captured_k.shape == (B, NH, 9, DH) and captured_v.shape == (B, NH, 9, DH)
    assert captured_a.shape == (B, 5, NH * DH)
    # the recorder sees the tensors themselves (same storage), not copies
    assert captured_k.data_ptr() == k.data_ptr() and captured_v.data_ptr() == v.data_ptr()
    assert captured_a.data_ptr() == a.data_ptr()
    assert torch.equal(captured_k, k) and torch.equal(captured_v, v)
    assert rec.calls[0]["streams"] == streams  # the default "img" would be wrong here


def test_recorder_default_stream_is_img():
    q, k, v = qkv(3, 3)
    rec = FakeRecorder()
    with recording(rec):
        attention_output(attention(q, k, v, layer="L"), layer="L")
    assert [c["streams"] for c in rec.calls] == ["img", "img", "img"]


def test_recorder_receives_nothing_when_inactive():
    q, k, v = qkv(4, 4)
    rec = FakeRecorder()
    attention_output(attention(q, k, v, layer="L"), layer="L")  # no recorder active
    with recording(rec):
        attention_output(attention(q, k, v), layer=None)  # active, but the call names no layer
    assert rec.calls == []
    with recording(rec):
        pass
    attention_output(attention(q, k, v, layer="L"), layer="L")  # after the block
    assert rec.calls == []
    with pytest.raises(RuntimeError), recording(rec):
        raise RuntimeError("leaves the block")
    attention(q, k, v, layer="L")
    assert rec.calls == []


def test_nested_recording_routes_to_the_innermost_and_restores():
    q, k, v = qkv(4, 4)
    outer, inner = FakeRecorder(), FakeRecorder()
    with recording(outer):
        attention(q, k, v, layer="first")
        with recording(inner):
            attention(q, k, v, layer="second")
        attention(q, k, v, layer="third")
    assert [c["layer"] for c in outer.calls] == ["first", "first", "third", "third"]
    assert [c["layer"] for c in inner.calls] == ["second", "second"]


def test_recorder_on_the_tiny_dit_sees_every_layer_and_changes_nothing():
    from safetensors.torch import load_file

    from minidit.models.dit import load_dit

    model = load_dit(FIXTURES / "single" / "transformer")
    ref = load_file(FIXTURES / "reference.safetensors")
    x, t, y = ref["dit/x"], ref["dit/t"], ref["dit/y"]
    rec = FakeRecorder()
    with torch.no_grad():
        plain = model(x, t, y)
        with recording(rec):
            recorded = model(x, t, y)
    assert torch.equal(plain, recorded)
    layers = [layer.name for layer in model.attention_layers()]
    assert layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    # K, V, A from the attention, then F, the block's FFN output, filed under the same layer
    assert [(c["layer"], c["tensor"]) for c in rec.calls] == [(name, kind) for name in layers for kind in "KVAF"]
    tokens, heads, head_dim = (8 // 2) ** 2, 2, 8
    for c in rec.calls:
        expected = (len(x), tokens, heads * head_dim) if c["tensor"] in "AF" else (len(x), heads, tokens, head_dim)
        assert c["x"].shape == expected
        assert c["streams"] == "img"
