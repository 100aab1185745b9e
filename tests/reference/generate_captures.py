"""Reference K, V and A for the capture-point tests (tests/test_capture_points.py), taken from inside diffusers'
attention processors.

Run by hand when the reference changes (needs the reference extra; after generate.py, generate_pixart.py and
generate_mmdit.py, whose tiny Hub-layout weights and input makers it reuses: it writes no weights):

    python tests/reference/generate_captures.py

It writes, under tests/fixtures/captures/ (the run is deterministic):

    reference.safetensors  per model (dit, pixart, sd3, flux-dev): the forward's inputs `<model>/input/<name>` and,
                           for every attention layer, `<model>/<layer>/<K|V|A>/<stream>`: the reference tensor
                           cut into the token ranges of its streams
    VERSIONS.json

Where the tensors are taken (design/analysis.md, "Capture points"). Every attention module's processor is wrapped
by `Recording`, which runs the original processor unchanged and watches it:
- K and V: the `key` and `value` of the one F.scaled_dot_product_attention call the processor makes (caught by a
  TorchFunctionMode), so after the projection, the head split (B, Nh, L, Dh), QK-norm and RoPE: exactly what
  enters the attention product. AttnProcessor2_0 (DiT; PixArt self and cross) and JointAttnProcessor2_0 (SD3) call
  it directly; FluxAttnProcessor through dispatch_attention_fn's native backend, which permutes its (B, L, Nh, Dh)
  to (B, Nh, L, Dh) first.
- A: the output of `attn.to_out[0]` (the image tokens, i.e. the queries) and of `attn.to_add_out` (the text tokens
  of a joint layer; SD3's last block has none, it is context_pre_only), caught by forward hooks. FLUX's
  single-stream attention has neither (pre_only): A is what its processor returns, heads merged, before the
  block's fused proj_out.
- streams, in diffusers' own concatenation order: SD3 [image; text] (JointAttnProcessor2_0 concatenates the sample
  projections first), FLUX [text; image] (FluxAttnProcessor puts the encoder projections first, and
  FluxSingleTransformerBlock concatenates [text; image] before its attention); PixArt's cross-attention K and V are
  text, its A image.
`reference_captures` asserts that the watched forward's output equals the plain forward's bit for bit, that every
layer ran once with one attention call, and that the hooked to_out[0] output is what the processor returned.
"""

import shutil
from pathlib import Path

import generator_tools as tools
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "captures"
REFERENCE = FIXTURES / "reference.safetensors"
MODELS = ("dit", "pixart", "sd3", "flux-dev")

_DIT, _PIXART, _MMDIT = (tools.generator(stem) for stem in ("generate", "generate_pixart", "generate_mmdit"))
# the transformer folders the other generators wrote; minidit's tests load the same files
WEIGHTS = {"dit": _DIT.FIXTURES / "single" / "transformer",  # 2 blocks, 4 x 4 patches
           "pixart": _PIXART.FOLDER_512 / "transformer",  # 2 blocks, no micro-conditions
           "sd3": _MMDIT.FIXTURES / "sd3" / "transformer",  # 3 joint blocks, the last context_pre_only
           "flux-dev": _MMDIT.FIXTURES / "flux-dev" / "transformer"}  # 2 double-stream and 3 single-stream blocks


def make_inputs(model: str) -> dict[str, torch.Tensor]:
    """The inputs of the other generators' parity cases: batch 5 (DiT) or 2, short sequences."""
    if model == "dit":
        return dict(zip(("x", "t", "y"), _DIT.forward_inputs(), strict=True))
    if model == "pixart":
        return _PIXART.model_inputs("512", masked=True)  # 24 image tokens; 10 text tokens, 4 padded in row 0
    if model == "sd3":
        return _MMDIT.sd3_inputs()  # 15 image tokens, 7 text tokens
    return _MMDIT.flux_inputs(guidance=True)  # 6 text tokens, 15 image tokens


def load_reference(model: str):
    if model == "dit":
        return _DIT.diffusers_dit(WEIGHTS["dit"])
    if model == "pixart":
        return _PIXART.load_transformer(WEIGHTS["pixart"])
    return _MMDIT.load("sd3" if model == "sd3" else "flux", WEIGHTS[model])


def reference_forward(model: str, reference, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if model == "dit":
        return _DIT.diffusers_forward(reference, inputs["x"], inputs["t"], inputs["y"])
    if model == "pixart":
        return _PIXART.reference_forward(reference, inputs)
    return (_MMDIT.sd3_forward if model == "sd3" else _MMDIT.flux_forward)(reference, inputs)


# ---- watching the processors ------------------------------------------------------------------------------

class _AttentionCalls(TorchFunctionMode):
    """Keeps the key and value of every F.scaled_dot_product_attention call made inside it."""

    def __init__(self):
        super().__init__()
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            k = args[1] if len(args) > 1 else kwargs["key"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            self.kv.append((k.detach().clone(), v.detach().clone()))
        return func(*args, **kwargs)


def _kv_streams(model: str, layer: str, hidden: torch.Tensor, encoder: torch.Tensor | None,
                text_length: int) -> tuple[tuple[str, int], ...]:
    """The token ranges of K and V, in the order the diffusers code concatenates them."""
    if model in ("dit", "pixart"):
        return (("txt", encoder.shape[1]),) if encoder is not None else (("img", hidden.shape[1]),)
    if model == "sd3":
        return ("img", hidden.shape[1]), ("txt", encoder.shape[1])
    if layer.startswith("single_transformer_blocks."):  # hidden is [text; image] already
        return ("txt", text_length), ("img", hidden.shape[1] - text_length)
    return ("txt", encoder.shape[1]), ("img", hidden.shape[1])


def _cut(store: dict, prefix: str, x: torch.Tensor, dim: int, streams: tuple[tuple[str, int], ...]) -> None:
    names, lengths = zip(*streams, strict=True)
    assert sum(lengths) == x.shape[dim], (prefix, streams, x.shape)
    for name, piece in zip(names, x.split(list(lengths), dim=dim), strict=True):
        assert f"{prefix}/{name}" not in store, f"{prefix}/{name} recorded twice"
        store[f"{prefix}/{name}"] = piece.contiguous()


class Recording:
    """An attention processor that runs `original` unchanged and stores K, V and A under `<layer>/<tensor>/`."""

    def __init__(self, original, model: str, layer: str, text_length: int, store: dict):
        self.original, self.model, self.layer, self.text_length = original, model, layer, text_length
        self.store = store

    def __call__(self, attn, hidden_states, *args, **kwargs):
        # Attention passes encoder_hidden_states by keyword, FluxAttention by position
        encoder = kwargs.get("encoder_hidden_states", args[0] if args else None)
        outputs = {}
        projections = {"img": attn.to_out[0] if hasattr(attn, "to_out") else None,
                       "txt": getattr(attn, "to_add_out", None)}
        hooks = [module.register_forward_hook(lambda m, i, out, s=stream: outputs.__setitem__(s, out.detach().clone()))
                 for stream, module in projections.items() if module is not None]
        try:
            with _AttentionCalls() as calls:
                result = self.original(attn, hidden_states, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        assert len(calls.kv) == 1, f"{self.layer}: {len(calls.kv)} attention calls"
        k, v = calls.kv[0]
        streams = _kv_streams(self.model, self.layer, hidden_states, encoder, self.text_length)
        _cut(self.store, f"{self.layer}/K", k, 2, streams)
        _cut(self.store, f"{self.layer}/V", v, 2, streams)
        if outputs:  # A after the output projection(s); to_out[1] is a dropout, the identity in eval
            first = result[0] if isinstance(result, tuple) else result
            assert torch.equal(first, outputs["img"]), self.layer
            for stream, a in outputs.items():
                self.store[f"{self.layer}/A/{stream}"] = a.contiguous()
        else:  # FLUX single-stream (pre_only): heads merged, before the fused projection
            _cut(self.store, f"{self.layer}/A", result.detach().clone(), 1, streams)
        return result


def attention_modules(reference) -> dict:
    """Every attention module of a diffusers transformer by its module path (minidit's layer names)."""
    return {name: m for name, m in reference.named_modules() if hasattr(m, "processor") and hasattr(m, "to_q")}


@torch.no_grad()
def reference_captures(model: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<layer>/<tensor>/<stream>` -> diffusers' tensor at that capture point, for one forward on `inputs`."""
    reference = load_reference(model)
    plain = reference_forward(model, reference, inputs)
    text_length = inputs["text"].shape[1] if "text" in inputs else 0
    store: dict[str, torch.Tensor] = {}
    modules = attention_modules(reference)
    originals = {name: m.processor for name, m in modules.items()}
    for name, m in modules.items():
        m.set_processor(Recording(originals[name], model, name, text_length, store))
    try:
        watched = reference_forward(model, reference, inputs)
    finally:
        for name, m in modules.items():
            m.set_processor(originals[name])
    assert torch.equal(watched, plain), f"{model}: watching the processors changed the output"
    assert {key.split("/")[0] for key in store} == set(modules), "a layer did not run"
    return store


def main() -> None:
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)
    tensors = {}
    for model in MODELS:
        inputs = make_inputs(model)
        tensors |= {f"{model}/input/{k}": v.contiguous() for k, v in inputs.items()}
        tensors |= {f"{model}/{k}": v for k, v in reference_captures(model, inputs).items()}
    save_file(dict(sorted(tensors.items())), REFERENCE)
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", tools.versions("diffusers", "torch", "safetensors"))
    layers = {m: len({k.split("/")[1] for k in tensors if k.startswith(m + "/") and "/input/" not in k})
              for m in MODELS}
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 1e3:.1f} kB): layers {layers}")


if __name__ == "__main__":
    main()
