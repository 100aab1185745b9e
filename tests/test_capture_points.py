"""The capture points checked by value: what every model hands the recorder equals diffusers' own tensors at the
documented points (design/analysis.md, "Capture points").

For one forward of each tiny model (the Hub-layout weights the parity generators wrote, loaded through minidit's
loaders), a recorder keeps every K, V and A it receives, cut into token ranges by the `streams` argument it gets.
tests/reference/generate_captures.py took the same tensors from inside diffusers' attention processors, cut by
diffusers' own concatenation order:
- K, V: what enters the attention product, after the projection, the head split (B, Nh, L, Dh), QK-norm and RoPE;
- A: after the output projection (to_out[0] for the image tokens, to_add_out for the text tokens), before any
  gate, residual or norm; FLUX single-stream: the attention result with heads merged, before the fused proj_out.
Each case compares one kind of layer, and every tensor of every layer of its kind, against:
- "fixture": the tensors stored by the generator (diffusers 0.42.1, see fixtures/captures/VERSIONS.json);
- "live": the same tensors taken now from the installed diffusers (skipped without it).
Errors are max |minidit - reference| / max(1, max |reference|).
"""

import functools

import pytest
import torch
from conftest import SOURCES, reference_generator, scaled_error
from safetensors.torch import load_file

from minidit.attention import recording
from minidit.models.dit import load_dit
from minidit.models.flux import load_flux
from minidit.models.pixart import load_pixart
from minidit.models.sd3 import load_sd3

G = reference_generator("generate_captures")
# Measured worst error against the stored fixture: 5.35e-7 (pixart-cross A, ATEN_CPU_CAPABILITY=avx2; default 4.9e-7,
# the native avx512 the fixture was written with 0), times a margin of 10. Live: 0 under all three.
TOL = 5.4e-6

SELF, CROSS = {"K": {"img"}, "V": {"img"}, "A": {"img"}}, {"K": {"txt"}, "V": {"txt"}, "A": {"img"}}
JOINT = {"K": {"img", "txt"}, "V": {"img", "txt"}, "A": {"img", "txt"}}
# case -> (model, its layers of that kind, the streams each tensor must come in)
CASES = {
    "dit-self": ("dit", ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], SELF),
    "pixart-self": ("pixart", ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], SELF),
    "pixart-cross": ("pixart", ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"], CROSS),
    "sd3-joint": ("sd3", ["transformer_blocks.0.attn", "transformer_blocks.1.attn"], JOINT),
    # the last block is context_pre_only: its text tokens enter K and V, but it has no text output (no A/txt)
    "sd3-joint-last": ("sd3", ["transformer_blocks.2.attn"], {**JOINT, "A": {"img"}}),
    "flux-double": ("flux-dev", ["transformer_blocks.0.attn", "transformer_blocks.1.attn"], JOINT),
    "flux-single": ("flux-dev", [f"single_transformer_blocks.{i}.attn" for i in range(3)], JOINT),
}


class KeepAll:
    """A recorder that keeps every tensor it receives of `kinds`, cut into its streams' token ranges along `token_dim`
    (K, V and A by default; F, the blocks' feed-forward output, is checked in tests/test_ffn.py)."""

    def __init__(self, kinds: str = "KVA"):
        self.kinds = kinds
        self.tensors: dict[str, torch.Tensor] = {}  # "<layer>/<tensor>/<stream>" -> the tensor's tokens of that stream

    def capture(self, layer, tensor, x, token_dim, streams):
        if tensor not in self.kinds:
            return
        ranges = ((streams, x.shape[token_dim]),) if isinstance(streams, str) else streams
        names, lengths = zip(*ranges, strict=True)
        assert sum(lengths) == x.shape[token_dim], f"{layer} {tensor}: streams {streams} for shape {tuple(x.shape)}"
        for name, piece in zip(names, x.split(list(lengths), dim=token_dim), strict=True):
            key = f"{layer}/{tensor}/{name}"
            assert key not in self.tensors, f"{key} captured twice in one forward"
            self.tensors[key] = piece.detach().clone()


@functools.cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


def inputs(model: str) -> dict[str, torch.Tensor]:
    prefix = f"{model}/input/"
    return {k[len(prefix):]: v for k, v in stored().items() if k.startswith(prefix)}


@functools.cache
def reference(model: str, source: str) -> dict[str, torch.Tensor]:
    """"<layer>/<tensor>/<stream>" -> diffusers' tensor."""
    if source == "live":
        return G.reference_captures(model, inputs(model))
    prefix = f"{model}/"
    return {k[len(prefix):]: v for k, v in stored().items() if k.startswith(prefix) and "/input/" not in k}


@functools.cache
def captured(model: str) -> dict[str, torch.Tensor]:
    """What minidit's model hands the recorder during one forward on the stored inputs."""
    x, path, recorder = inputs(model), G.WEIGHTS[model], KeepAll()
    with torch.no_grad(), recording(recorder):
        if model == "dit":
            load_dit(path)(x["x"], x["t"], x["y"])
        elif model == "pixart":
            load_pixart(path)(x["x"], x["t"], x["text"], x["text_mask"])
        elif model == "sd3":
            load_sd3(path)(x["x"], x["t"], x["text"], x["pooled"])
        else:
            load_flux(path, dtype=torch.float32)(x["x"], x["t"], x["text"], x["pooled"], x["img_ids"], x["txt_ids"],
                                                 x["guidance"])
    return recorder.tensors


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", CASES)
def test_captured_tensors_equal_the_reference(case, source):
    model, layers, streams = CASES[case]
    expected_keys = {f"{layer}/{tensor}/{s}" for layer in layers for tensor, names in streams.items() for s in names}
    ours = {k: v for k, v in captured(model).items() if k.rsplit("/", 2)[0] in layers}
    theirs = {k: v for k, v in reference(model, source).items() if k.rsplit("/", 2)[0] in layers}
    assert ours.keys() == expected_keys, "minidit's (layer, tensor, stream) captures differ from the contract"
    assert theirs.keys() == expected_keys, "the reference's (layer, tensor, stream) tensors differ from the contract"
    errors = {key: scaled_error(ours[key], theirs[key]) for key in sorted(expected_keys)}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{worst}: error {errors[worst]:.3g} (tolerance {TOL:g})"


@pytest.mark.parametrize("model", G.MODELS)
def test_every_layer_is_captured_and_checked(model):
    """One forward captures exactly the reference's layers, and the cases above cover all of them."""
    layers = lambda tensors: {k.rsplit("/", 2)[0] for k in tensors}
    checked = {layer for m, names, _ in CASES.values() if m == model for layer in names}
    assert layers(captured(model)) == layers(reference(model, "fixture")) == checked
