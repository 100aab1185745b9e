"""Mochi 1 preview: the transformer, its capture points and the full-size config against diffusers'
MochiTransformer3DModel on identical tiny weights.

Every case goes through minidit's real loading code on a tiny `transformer/` folder in the Hub's diffusers layout,
written by tests/reference/generate_mochi.py: 48 blocks (the last one context_pre_only) at width 16, text width 24,
fp32 in five shards plus the index, config.json in the Hub form. Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/mochi/VERSIONS.json);
- "live": the reference rebuilt now from the same files with the installed diffusers (skipped without it), which
  minidit must equal bit for bit.
Errors are max |minidit - reference| / max(1, max |reference|).
"""

import functools
import json

import pytest
import torch
from conftest import LIVE, SOURCES, assert_matches, reference_generator, scaled_error
from safetensors.torch import load_file
from test_capture_points import KeepAll

from minidit import weights
from minidit.attention import explicit_attention, recording
from minidit.errors import MiniditError
from minidit.models.mochi import PRESETS, MochiConfig, MochiTransformer, load_mochi, rope_learned, rope_positions

G = reference_generator("generate_mochi")
# fp32. Live (in-process): 0 everywhere (bit-exact). Against the stored fixtures, the worst error per comparison
# (tests/measure_tolerances.py, default/avx2/avx512; the fixture was written at avx512, where all are 0), x 5. A wrong
# QK-norm eps (1e-6) moves the output by 7.8e-3, a wrong block-norm eps (1e-5) by 1.1, swapped final scale/shift by 0.8:
TOL = 3.8e-6  # transformer: 7.57e-7 (avx2) x 5
CAPTURE_TOL = 3.6e-6  # K, V, A: 7.11e-7 (avx2) x 5
LAYERS = 48


@functools.cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@functools.cache
def model() -> MochiTransformer:
    return load_mochi(G.TRANSFORMER, dtype=torch.float32)


def case_inputs(case: str) -> dict[str, torch.Tensor]:
    return {k: stored()[f"model/{case}/{k}"] for k in ("x", "t", "text", "mask")}


def forward(m: MochiTransformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return m(inputs["x"], inputs["text"], inputs["t"], inputs["mask"])


# ---- the transformer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.MODEL_CASES)
def test_transformer_matches_reference(case, source):
    """1, 3 and 5 latent frames, square and non-square grids, right-padded text (1 to 8 valid tokens of 8),
    timesteps 0 to 1000 (floats, as the pipeline gives them)."""
    inputs = case_inputs(case)
    expected = stored()[f"model/{case}/out"] if source == "fixture" else G.reference_forward(G.load_transformer(),
                                                                                              inputs)
    assert_matches(forward(model(), inputs), expected, source, TOL, case)


def test_padding_is_ignored():
    """The values of padded text tokens change nothing: they are no keys, their outputs are 0, and the pooling
    skips them."""
    inputs = case_inputs("3-frames")
    noisy = dict(inputs, text=torch.where(inputs["mask"][:, :, None].bool(), inputs["text"], 123.0))
    assert torch.equal(forward(model(), noisy), forward(model(), inputs))
    unmasked = dict(inputs, mask=torch.ones_like(inputs["mask"]))
    assert scaled_error(forward(model(), unmasked), forward(model(), inputs)) > 1e-3


def test_text_tokens_are_a_set():
    """Text tokens have no positions: a mask with holes gives what the valid tokens moved to the front give (the
    official code's behaviour; diffusers misplaces the text outputs then, see the model's header)."""
    inputs = case_inputs("3-frames")
    holes = inputs["mask"].clone()
    holes[0] = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1])
    order = torch.tensor([0, 1, 3, 4, 7, 2, 5, 6])  # the valid tokens first
    packed = dict(inputs, text=inputs["text"].clone(), mask=holes.clone())
    packed["text"][0], packed["mask"][0] = inputs["text"][0, order], holes[0, order]
    assert scaled_error(forward(model(), dict(inputs, mask=holes)), forward(model(), packed)) < 1e-5


@pytest.mark.parametrize("source", [pytest.param("live", marks=LIVE)])
def test_bfloat16_matches_reference(source):
    """In bf16 too, minidit equals diffusers bit for bit (both models loaded in bf16 from the fp32 files)."""
    reference = G.tools.quiet_diffusers().MochiTransformer3DModel.from_pretrained(
        G.TRANSFORMER, torch_dtype=torch.bfloat16).eval()
    m = load_mochi(G.TRANSFORMER, dtype=torch.bfloat16)
    for case in G.MODEL_CASES:
        inputs = case_inputs(case)
        inputs = dict(inputs, x=inputs["x"].bfloat16(), text=inputs["text"].bfloat16())
        assert_matches(forward(m, inputs), G.reference_forward(reference, inputs), source, 0.0, case)


def test_explicit_attention_matches_fused():
    for case in G.MODEL_CASES:
        inputs = case_inputs(case)
        with explicit_attention():
            explicit = forward(model(), inputs)
        assert scaled_error(explicit, forward(model(), inputs)) < 1e-5


def test_loads_the_shards():
    """Five fp32 shards plus the index; loads in the requested dtype: the stored values."""
    files = sorted(G.TRANSFORMER.glob("*.safetensors"))
    assert len(files) == G.TRANSFORMER_SHARDS
    raw = weights.load_folder(G.TRANSFORMER)
    for dtype in (torch.float32, torch.bfloat16):
        m = model() if dtype == torch.float32 else load_mochi(G.TRANSFORMER, dtype=dtype)
        sd = m.state_dict()
        assert len(sd) == len(raw) and all(p.dtype == dtype for p in sd.values())
        assert all(torch.equal(sd[k], raw[k].to(dtype)) for k in raw)
    assert model().config.num_layers == LAYERS and model().transformer_blocks[-1].context_pre_only


def test_rope_positions_and_pairing():
    """The centred grid rescaled to 192 x 192 cells, and the rotation of one head's channel pair against a
    hand-computed float64 angle sum over the three axes."""
    pos = rope_positions(2, 4, 6)
    assert pos.shape == (2 * 4 * 6, 3)
    scale = (192 * 192 / 24) ** 0.5
    t, i, j = 1, 3, 5
    token = (t * 4 + i) * 6 + j
    expected = torch.tensor([t, (i + 0.5 - 2) * scale, (j + 0.5 - 3) * scale])
    assert torch.allclose(pos[token], expected, atol=1e-4)
    assert torch.allclose(pos[:, 1:].mean(0), torch.zeros(2), atol=1e-4)  # centred on 0
    freqs = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_learned(freqs, pos)
    assert cos.shape == sin.shape == (2, 48, 8)
    n, f = 1, 2
    angle = sum(pos[token, a].double() * freqs[a, n, f].double() for a in range(3))
    assert torch.allclose(cos[n, token, 2 * f: 2 * f + 2].double(), angle.cos().expand(2), atol=1e-5)
    assert torch.allclose(sin[n, token, 2 * f: 2 * f + 2].double(), angle.sin().expand(2), atol=1e-5)


# ---- capture points ---------------------------------------------------------------------------------------------

@functools.cache
def captured() -> dict[str, torch.Tensor]:
    recorder = KeepAll()
    inputs = {k: v[:1] for k, v in case_inputs(G.CAPTURE_CASE).items()}
    with recording(recorder):
        forward(model(), inputs)
    return recorder.tensors


def expected_keys(layers) -> set[str]:
    """K and V of both streams in every layer; A of both, except the last block's text (context_pre_only)."""
    return {f"{layer}/{tensor}/{s}" for layer in layers for tensor in "KVA" for s in ("img", "txt")} - {
        f"transformer_blocks.{LAYERS - 1}.attn1/A/txt"}


@pytest.mark.parametrize("source", SOURCES)
def test_captured_tensors_equal_the_reference(source):
    """K and V (after the projection, head split, RMS QK-norm and, visual tokens, RoPE), (B, Nh, L, Dh), the padded
    text tokens included; A (to_out[0]'s and to_add_out's outputs, the padded text tokens' = the bias), each cut into
    its visual and text tokens, [visual; text]. The fixture holds layers 0, 1, 46 and 47; the live case every layer."""
    if source == "fixture":
        theirs = {k[len("captures/"):]: v for k, v in stored().items() if k.startswith("captures/")}
        layers = [f"transformer_blocks.{i}.attn1" for i in G.CAPTURE_LAYERS]
    else:
        theirs = G.reference_captures()
        layers = [f"transformer_blocks.{i}.attn1" for i in range(LAYERS)]
    ours = captured()
    assert set(ours) == expected_keys(f"transformer_blocks.{i}.attn1" for i in range(LAYERS))
    assert theirs.keys() == expected_keys(layers)
    for key in sorted(theirs):
        assert_matches(ours[key], theirs[key], source, CAPTURE_TOL, key)


def test_attention_layers():
    layers = model().attention_layers()
    assert [layer.name for layer in layers] == [f"transformer_blocks.{i}.attn1" for i in range(LAYERS)]
    assert all(layer.kind == "joint" and layer.streams == ("img", "txt") for layer in layers)


# ---- full size --------------------------------------------------------------------------------------------------

def test_fullsize_on_meta():
    """The official config: 10,027,677,744 parameters, the 1071 key names and shapes (diffusers on meta), 48 joint
    layers."""
    assert MochiConfig.from_hub(G.hub_transformer_config(tiny=False)) == PRESETS["mochi-1-preview"]
    with torch.device("meta"):
        m = MochiTransformer(PRESETS["mochi-1-preview"])
    expected = json.loads((G.FIXTURES / "fullsize.json").read_text())["mochi-1-preview"]
    count = sum(p.numel() for p in m.parameters())
    assert count == expected["parameters"] == 10_027_677_744
    keys = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert keys == expected["keys"] and len(keys) == 1071
    assert len(m.attention_layers()) == LAYERS


def test_config_defaults_and_refusals():
    """Keys absent from a config.json take diffusers' defaults (out_channels None: in_channels); other QK-norms and
    activations are refused."""
    cfg = MochiConfig.from_hub({"num_layers": 4})
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.pooled_projection_dim, cfg.time_embed_dim,
            cfg.out_dim, cfg.max_sequence_length) == (24, 128, 1536, 256, 12, 256)
    assert MochiConfig.from_hub({"_class_name": "MochiTransformer3DModel"}) == PRESETS["mochi-1-preview"]
    for key, value in (("qk_norm", "layer_norm"), ("activation_fn", "gelu")):
        with pytest.raises(MiniditError, match=key):
            MochiConfig.from_hub({key: value})
