"""Open-Sora 1.2: STDiT3, its capture points, RFlow and one whole RFLOW.sample against the official code of
hpcaitech/Open-Sora v1.2.0 on identical tiny weights.

Every case goes through minidit's real loading code on a tiny `OpenSora-STDiT-v3/` folder in the Hub's layout
(config.json with the Hub file's keys, one fp32 model.safetensors in the official key names), written by
tests/reference/generate_opensora.py: 28 spatial + 28 temporal blocks at width 16. The expected numbers are the
official code's, run by the generator (fp32, CPU; see fixtures/opensora/VERSIONS.json) and stored: there is no live
case, since the official code is not an installable package. Errors are max |minidit - official| / max(1, max
|official|).
"""

import functools
import json

import pytest
import torch
from conftest import reference_generator, scaled_error
from safetensors.torch import load_file, save_file
from test_capture_points import KeepAll

from minidit import weights
from minidit.attention import explicit_attention, recording
from minidit.errors import MiniditError
from minidit.models.opensora import PRESETS, STDiT3, STDiT3Config, load_opensora, position_table
from minidit.pipelines.recipe import guided
from minidit.rope import apply_rope
from minidit.schedulers.rflow import RFlow, RFlowConfig
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer

G = reference_generator("generate_opensora")
# fp32, against the official run stored by the generator (written at avx512). The worst error per comparison under
# ATEN_CPU_CAPABILITY default, avx2 and avx512 (tests/measure_tolerances.py tests/test_opensora.py), x 5:
TOL = 3.1e-6  # transformer: 6.08e-7 (avx2) x 5
CAPTURE_TOL = 1.7e-5  # K, V, A: 3.29e-6 (cross-attention, default) x 5
SAMPLE_TOL = 3.8e-5  # each step's model output and the final latents of RFLOW.sample: 7.53e-6 (default) x 5
T5_TOL = 2.1e-6  # the tiny T5's states of the processed prompts: 4.15e-7 (avx2) x 5
DEPTH = 28


@functools.cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@functools.cache
def model() -> STDiT3:
    return load_opensora(G.FOLDER, dtype=torch.float32)


def case_inputs(case: str) -> dict[str, torch.Tensor]:
    return {k: stored()[f"model/{case}/{k}"] for k in ("x", "t", "y", "mask", "fps", "height", "width")}


def forward(m: STDiT3, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The official call's inputs: y is (B, 1, Lt, C_text) there."""
    with torch.no_grad():
        return m(inputs["x"], inputs["t"], inputs["y"][:, 0], inputs["mask"], inputs["fps"], inputs["height"],
                 inputs["width"])


# ---- the transformer --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", G.MODEL_CASES)
def test_transformer_matches_official(case):
    """1, 3 and 5 latent frames, an odd width (the patch embedding pads), timesteps 0 to 999, fps 8 to 120, position
    scales from 32x48 to 720x1280 pixels; in each batch two captions of different lengths (1 to 24 valid tokens of
    24), which the official code packs into one sequence with a block-diagonal mask and minidit keeps padded with a
    per-sample mask: the outputs agree."""
    inputs = case_inputs(case)
    valid = inputs["mask"].sum(1)
    assert valid[0] != valid[1] and (valid < G.TINY["model_max_length"]).any()
    out = forward(model(), inputs)
    assert out.dtype == torch.float32 and out.shape == stored()[f"model/{case}/out"].shape
    assert scaled_error(out, stored()[f"model/{case}/out"]) <= TOL


def test_padding_is_ignored():
    """The values of padded text tokens change nothing (they are masked out of every cross-attention); the mask
    does change the output."""
    inputs = case_inputs(G.CAPTURE_CASE)
    noisy = dict(inputs, y=torch.where(inputs["mask"][:, None, :, None].bool(), inputs["y"], 123.0))
    assert torch.equal(forward(model(), noisy), forward(model(), inputs))
    unmasked = dict(inputs, mask=torch.ones_like(inputs["mask"]))
    assert scaled_error(forward(model(), unmasked), forward(model(), inputs)) > 1e-3
    assert torch.equal(forward(model(), dict(inputs, mask=None)), forward(model(), unmasked))


def test_only_the_first_samples_size_counts():
    """NOTE(official): the position table's scale reads height[0] and width[0] only."""
    inputs = case_inputs(G.CAPTURE_CASE)
    other = dict(inputs, height=torch.tensor([inputs["height"][0], 999.0]), width=torch.tensor([inputs["width"][0],
                                                                                                1.0]))
    assert torch.equal(forward(model(), other), forward(model(), inputs))


def test_explicit_attention_matches_fused():
    for case in G.MODEL_CASES:
        inputs = case_inputs(case)
        with explicit_attention():
            explicit = forward(model(), inputs)
        assert scaled_error(explicit, forward(model(), inputs)) < 1e-5


def test_position_table_by_hand():
    """Token (row i, column j): the first half of the channels is [sin | cos] of the column coordinate, the second of
    the row's, coordinate = index / scale * base_size / n, frequencies 1 / 10000^(k / (dim/4)) (float64 here)."""
    dim, h, w, scale, base = 16, 3, 5, 0.75, 4
    table = position_table(dim, h, w, scale, base)
    assert table.shape == (h * w, dim)
    i, j = 2, 3
    freqs = 1.0 / 10000 ** (torch.arange(0, dim // 2, 2, dtype=torch.float64) / (dim // 2))
    col, row = j / scale * base / w, i / scale * base / h
    expected = torch.cat([(col * freqs).sin(), (col * freqs).cos(), (row * freqs).sin(), (row * freqs).cos()])
    assert torch.allclose(table[i * w + j].double(), expected, atol=1e-6)


def test_temporal_rope_pairing():
    """Frame f rotates the interleaved channel pair (2k, 2k+1) by f * freqs[k], freqs the checkpoint's rope.freqs
    = 1 / 10000^(2k / Dh), against a hand-computed float64 rotation."""
    rope = model().rope
    assert torch.equal(rope.freqs, 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
    cos, sin = rope(5)
    x = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    rotated = apply_rope(x, cos, sin)
    f, k = 3, 2
    angle = f * rope.freqs[k].double()
    a, b = x[0, 1, f, 2 * k].double(), x[0, 1, f, 2 * k + 1].double()
    expected = torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])
    assert torch.allclose(rotated[0, 1, f, 2 * k: 2 * k + 2].double(), expected, atol=1e-6)


# ---- capture points ---------------------------------------------------------------------------------------------

@functools.cache
def captured() -> dict[str, torch.Tensor]:
    recorder = KeepAll()
    with recording(recorder):
        forward(model(), case_inputs(G.CAPTURE_CASE))
    return recorder.tensors


def test_attention_layers():
    layers = model().attention_layers()
    assert [layer.name for layer in layers] == [f"spatial_blocks.{i}.attn" for i in range(DEPTH)] + [
        f"temporal_blocks.{i}.attn" for i in range(DEPTH)]
    assert [layer.kind for layer in layers] == ["spatial"] * DEPTH + ["temporal"] * DEPTH
    cross = model().attention_layers(cross=True)[2 * DEPTH:]
    assert [layer.name for layer in cross] == [f"{kind}_blocks.{i}.cross_attn" for kind in ("spatial", "temporal")
                                               for i in range(DEPTH)]
    assert all(layer.kind == "cross" and layer.streams == ("img", "txt") for layer in cross)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_self_attention_captures_equal_the_official(kind):
    """K and V entering the attention product (after the qkv projection, head split, RMS QK-norm and, temporal only,
    RoPE), (rows, Nh, L, Dh), and A (proj's output), (rows, L, D), in the fold the attention runs in: (B T) rows of
    S tokens (spatial), (B S) rows of T frames (temporal); every block."""
    inputs = case_inputs(G.CAPTURE_CASE)
    B, _, T, H, W = inputs["x"].shape
    rows, length = (B * T, H * W // 4) if kind == "spatial" else (B * H * W // 4, T)
    ours = captured()
    for i in range(DEPTH):
        layer = f"{kind}_blocks.{i}.attn"
        for tensor in "KVA":
            theirs = stored()[f"captures/{layer}/{tensor}"]
            mine = ours[f"{layer}/{tensor}/img"]
            assert mine.shape == theirs.shape == ((rows, 2, length, 8) if tensor != "A" else (rows, length, 16))
            assert scaled_error(mine, theirs) <= CAPTURE_TOL, (layer, tensor)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_cross_attention_captures_equal_the_official(kind):
    """K and V of the text, (B, Nh, Lt, Dh) padded here: their valid tokens, concatenated over the batch, are the
    official packed (Nh, sum of lengths, Dh); A on the video tokens, (B, T S, D); every block."""
    valid = case_inputs(G.CAPTURE_CASE)["mask"].bool()
    ours = captured()
    for i in range(DEPTH):
        layer = f"{kind}_blocks.{i}.cross_attn"
        for tensor in "KV":
            mine = ours[f"{layer}/{tensor}/txt"]
            assert mine.shape[2] == G.TINY["model_max_length"]
            packed = torch.cat([mine[b][:, valid[b]] for b in range(len(valid))], dim=1)  # (Nh, sum L, Dh)
            assert scaled_error(packed, stored()[f"captures/{layer}/{tensor}"]) <= CAPTURE_TOL, (layer, tensor)
        assert scaled_error(ours[f"{layer}/A/img"], stored()[f"captures/{layer}/A"]) <= CAPTURE_TOL, layer


def test_every_layer_is_recorded_once():
    names = {layer.name for layer in model().attention_layers(cross=True)}
    expected = {f"{n}/{t}/{'txt' if 'cross' in n and t != 'A' else 'img'}" for n in names for t in "KVA"}
    assert set(captured()) == expected


# ---- checkpoints and the full size ------------------------------------------------------------------------------

def test_loads_the_hub_folder():
    """The folder, or its weight file: every stored tensor (973 at full size: rope.freqs and the y_embedding buffer
    included) lands by name; in bf16 too."""
    raw = weights.load_folder(G.FOLDER)
    assert "rope.freqs" in raw and "y_embedder.y_embedding" in raw
    for m in (model(), load_opensora(G.FOLDER / "model.safetensors")):
        sd = m.state_dict()
        assert sd.keys() == raw.keys() and all(torch.equal(sd[k], raw[k]) for k in raw)
    sd = load_opensora(G.FOLDER, dtype=torch.bfloat16).state_dict()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, raw[k].bfloat16()) for k, v in sd.items())
    assert model().config == STDiT3Config.from_hub(json.loads((G.FOLDER / "config.json").read_text()))


def test_missing_rope_freqs_are_recomputed(tmp_path):
    """checkpoints.md §14: whether the real file stores rope.freqs is unknown; without it they are recomputed, equal
    to the stored ones. A file missing another tensor is refused with the key named."""
    raw = weights.load_folder(G.FOLDER)
    (tmp_path / "config.json").write_bytes((G.FOLDER / "config.json").read_bytes())
    save_file({k: v for k, v in raw.items() if k != "rope.freqs"}, tmp_path / "model.safetensors")
    assert torch.equal(load_opensora(tmp_path).rope.freqs, raw["rope.freqs"])
    save_file({k: v for k, v in raw.items() if k != "final_layer.linear.bias"}, tmp_path / "model.safetensors")
    with pytest.raises(MiniditError, match="1 missing"):
        load_opensora(tmp_path)


def test_fullsize_on_meta():
    """The §7.2 config: the 973 key names and shapes of the official code's state dict on the meta device,
    1,207,643,972 parameters (rope.freqs included) plus the 1,228,800-value null caption buffer; 56 (+56) layers."""
    assert STDiT3Config.from_hub(G.hub_config(tiny=False)) == PRESETS["OpenSora-STDiT-v3"]
    with torch.device("meta"):
        m = STDiT3(PRESETS["OpenSora-STDiT-v3"])
    expected = json.loads((G.FIXTURES / "fullsize.json").read_text())["OpenSora-STDiT-v3"]
    assert sum(p.numel() for p in m.parameters()) == expected["parameters"] == 1_207_643_972
    sd = m.state_dict()
    assert {k: sd[k].numel() for k, _ in m.named_buffers()} == expected["stored_buffers"] == {
        "y_embedder.y_embedding": 1_228_800}
    keys = {k: list(v.shape) for k, v in sd.items()}
    assert keys == expected["keys"] and len(keys) == 973
    assert len(m.attention_layers()) == 56 and len(m.attention_layers(cross=True)) == 112


def test_config_refusals():
    for key, value in (("qk_norm", False), ("skip_y_embedder", True)):
        with pytest.raises(MiniditError, match=key):
            STDiT3Config.from_hub({**G.hub_config(tiny=False), key: value})
    with pytest.raises(MiniditError, match="heads"):
        STDiT3Config.from_hub({"hidden_size": 1152, "num_heads": 7})


# ---- RFlow ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in G.RFLOW_CASES if c != "480p-16f-8"])
def test_rflow_timesteps_equal_the_official(case):
    """RFLOW.sample's timesteps after the transform, bit for bit: 240p 9:16 51 frames (v1.2.0's defaults), 720p
    102 frames, a 512 image, 144p 17 frames; and with the sizes in bf16, as scripts/inference.py makes them."""
    steps, height, width, frames = G.RFLOW_CASES[case]
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    scheduler = RFlow(steps, height=height, width=width, num_frames=frames, dtype=dtype)
    assert torch.equal(torch.tensor(scheduler.timesteps), stored()[f"rflow/{case}/timesteps"])
    assert torch.equal(torch.tensor(scheduler.sigmas), stored()[f"rflow/{case}/timesteps"] / 1000)


def test_rflow_bf16_sizes_change_the_timesteps():
    """NOTE(official): in bf16 the transform's ratio is rounded (240 x 426 = 102,240 is not a bf16 number)."""
    bf16, fp32 = stored()["rflow/240p-9:16-51f-30-bf16/timesteps"], stored()["rflow/240p-9:16-51f-30/timesteps"]
    assert not torch.equal(bf16, fp32)


def test_rflow_refuses_2_to_16_frames():
    """The official transform makes every step 0 there (the first 0/0 = NaN); minidit refuses."""
    official = stored()["rflow/480p-16f-8/timesteps"]
    assert official[0].isnan() and (official[1:] == 0).all()
    with pytest.raises(MiniditError, match="16 frames"):
        RFlow(8, height=480, width=854, num_frames=16)
    assert RFlow(8, height=480, width=854, num_frames=16, cfg=RFlowConfig(use_timestep_transform=False)).timesteps == [
        1000 - 125 * i for i in range(8)]


def test_rflow_steps_cover_the_whole_path():
    """Euler from t_0 = 1000 to 0: with v = 1 the sample moves by exactly sum(dt) = 1; a step by its timestep."""
    scheduler = RFlow(30, height=240, width=426, num_frames=51)
    x = torch.zeros(1)
    for i, t in enumerate(scheduler.timesteps):
        assert torch.equal(scheduler.step(torch.ones(1), t, x), scheduler.step(torch.ones(1), i, x))
        x = scheduler.step(torch.ones(1), i, x)
    assert abs(x.item() - 1) < 1e-6
    with pytest.raises(MiniditError):
        scheduler.step(torch.ones(1), 30, x)


# ---- one whole RFLOW.sample -------------------------------------------------------------------------------------

@functools.cache
def settings() -> dict:
    return json.loads((G.FIXTURES / "sample.json").read_text())


def test_sample_text_matches_the_official_t5_encoder():
    """The prompts as scripts/inference.py hands them to T5 (the aesthetic-score suffix, then the cleaning), through
    minidit's tokenizer and T5 on the tiny T5 fixture: the official T5Encoder's mask and states. One prompt is
    shorter than the 24 tokens (padded: the mask matters), one is truncated."""
    s = settings()
    assert s["processed_prompts"] == [f"{p} aesthetic score: {s['aes']:.1f}.".lower() for p in s["prompts"]]
    ids, mask = T5Tokenizer(G.T5_TINY / "tokenizer")(s["processed_prompts"], s["model_max_length"])
    assert torch.equal(mask, stored()["sample/mask"]) and mask[0].sum() < s["model_max_length"] and mask[1].all()
    with torch.no_grad():
        states = load_t5(G.T5_TINY / "text_encoder")(ids, mask)
    assert scaled_error(states, stored()["sample/y"]) <= T5_TOL


def test_sample_matches_rflow_sample():
    """RFLOW.sample of v1.2.0 on the tiny model (fp32): 2 prompts, 4 steps, guidance 7, 64x96 pixels, 17 frames
    (5 latent frames), fps 24, the stored noise. The batch is [cond; uncond]: the prompts' T5 states, then the
    learned null caption with the prompts' own masks (NOTE(official)); pred = output[:, :4]; each step's model output
    and the final latents agree."""
    s, m = settings(), model()
    n = len(s["prompts"])
    assert torch.equal(m.null_text(n), stored()["sample/y_null"])
    text = torch.cat([stored()["sample/y"], m.null_text(n)])
    mask = torch.cat([stored()["sample/mask"]] * 2)
    scheduler = RFlow(s["steps"], height=s["height"], width=s["width"], num_frames=s["num_frames"])
    assert torch.equal(torch.tensor(scheduler.timesteps)[:, None].expand(-1, 2 * n), stored()["sample/timesteps"])
    full = lambda v: torch.full((2 * n,), float(v))  # noqa: E731
    outputs = []

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        with torch.no_grad():
            out = m(torch.cat([x, x]), full(t), text, mask, full(s["fps"]), full(s["height"]), full(s["width"]))
        outputs.append(out)
        cond, uncond = out[:, :4].chunk(2)
        return guided(uncond, cond, s["guidance"])

    z = stored()["sample/z"]
    assert list(z.shape[1:]) == s["latent_shape"]
    latents = scheduler.sample(velocity, z)
    for i, (ours, theirs) in enumerate(zip(outputs, stored()["sample/model_out"], strict=True)):
        assert scaled_error(ours, theirs) <= SAMPLE_TOL, i
    assert scaled_error(latents, stored()["sample/latents"]) <= SAMPLE_TOL
