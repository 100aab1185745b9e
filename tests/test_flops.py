"""minidit/analysis/flops.py: the counter against a hand count of DiT-XL/2 (every product of its forward, exactly),
attention counted as 4 B Nh Lq Lk Dh on both paths, the table for every model, the scaling with batch and frames, and
the time arithmetic. Full-size models only where one forward is cheap (DiT-XL/2); elsewhere the official configs at
one or two layers, which see the same inputs through the same code."""

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minidit.analysis import flops
from minidit.attention import attention, explicit_attention
from minidit.models import cogvideox, dit, flux, latte, mochi, opensora, pixart, sd3
from minidit.models.dit import FREQ_DIM
from minidit.presets import PAPER

MODELS = ["dit-xl-256", "pixart-1024", "sd3", "flux-dev", "latte", "cogvideox-5b", "cogvideox-2b", "opensora",
          "mochi"]
# (presets, key, the fields that count layers): each backbone at its shallowest with every kind of block
SHALLOW = [(dit.PRESETS, "DiT-XL/2-256", {"num_layers": 1}), (pixart.PRESETS, "PixArt-XL-2-1024-MS", {"num_layers": 1}),
           (sd3.PRESETS, "stable-diffusion-3-medium", {"num_layers": 2}),  # the last block is text-output-free
           (flux.PRESETS, "FLUX.1-dev", {"num_layers": 1, "num_single_layers": 1}),
           (latte.PRESETS, "Latte-1", {"num_layers": 1}), (opensora.PRESETS, "OpenSora-STDiT-v3", {"depth": 1}),
           (cogvideox.PRESETS, "CogVideoX-5b", {"num_layers": 1}),
           (cogvideox.PRESETS, "CogVideoX-2b", {"num_layers": 1}),
           (mochi.PRESETS, "mochi-1-preview", {"num_layers": 2})]


@pytest.fixture
def shallow(monkeypatch):
    for presets, key, layers in SHALLOW:
        monkeypatch.setitem(presets, key, replace(presets[key], **layers))


def study(model: str) -> flops.Study:
    return next(s for s in flops.studies() if s.model == model)


def test_dit_xl_counted_as_by_hand():
    """Every product of DiT-XL/2's forward at 256², batch 2, written out (2 FLOPs per multiply-add, biases free)."""
    s = study("dit-xl-256")
    cfg = dit.PRESETS["DiT-XL/2-256"]
    D, B, p = cfg.hidden_size, s.batch, cfg.patch_size
    L = (s.height // 8 // p) * (s.width // 8 // p)  # 256 tokens
    conditioning = 2 * (FREQ_DIM * D + D * D)  # the timestep MLP: in every block (Hub layout) and the final layer
    block = conditioning + 2 * D * 6 * D + 2 * L * (4 * D * D + 2 * 4 * D * D) + 4 * L * L * D  # adaLN, qkvo+FFN, attn
    final = conditioning + 2 * D * 2 * D + 2 * L * D * p * p * cfg.out_channels
    patches = 2 * L * D * cfg.in_channels * p * p
    count = flops.forward_flops(s)
    assert count.attention == B * cfg.num_layers * 4 * L * L * D
    assert count.total == B * (patches + cfg.num_layers * block + final)


@pytest.mark.parametrize("device, explicit", [("meta", True), ("cpu", True), ("meta", False)])
def test_attention_counted_as_4_B_Nh_Lq_Lk_Dh(device, explicit):
    """minidit's attention(), with a mask, on the explicit path (flops.py's) on any device, and on the fused path on
    the meta device, where PyTorch decomposes it into products (on a CPU tensor its fused kernel counts nothing)."""
    B, Nh, Lq, Lk, Dh = 2, 3, 5, 7, 8
    q, k, v = (torch.zeros(B, Nh, L, Dh, device=device) for L in (Lq, Lk, Lk))
    mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool, device=device)
    with explicit_attention(explicit), FlopCounterMode(display=False) as counter:
        attention(q, k, v, mask=mask)
    assert counter.get_total_flops() == 4 * B * Nh * Lq * Lk * Dh


def test_the_studies_follow_the_presets():
    assert [s.model for s in flops.studies()] == MODELS
    for s in flops.studies():
        paper = PAPER.get(s.model)
        if paper is not None:
            assert (s.height, s.width, s.frames, s.steps, s.text_tokens, s.prompts) == (
                paper.height, paper.width, paper.frames, paper.steps, paper.max_sequence_length, paper.num_prompts)
        assert s.batch == (1 if s.model == "flux-dev" else 2), s.model
    assert study("mochi").prompts == 100 and study("latte").prompts == 1000
    assert replace(study("cogvideox-2b"), model="cogvideox-5b") == study("cogvideox-5b")
    assert (study("dit-xl-256").steps, study("dit-xl-256").height) == (50, 256)


def test_the_table_builds_for_every_model(shallow):
    rows = flops.table().splitlines()
    assert len(rows) == 2 + len(MODELS)
    for model, row in zip(MODELS, rows[2:]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == model and cells[1] == study(model).settings()
        assert float(cells[2].split()[0]) > 0 and float(cells[3]) >= 0 and int(cells[4]) == study(model).prompts
        assert all(float(c.removeprefix(">= ").split()[0]) >= 0 and c.endswith((" h", " min")) for c in cells[5:])


# Attention of one forward of the shallow backbones per batch element, from the study's shapes by hand: the sum over
# attention calls of Lq Lk Nh Dh (x 4 in the count). Latents are 8x smaller than the pixels; patches 2 x 2.
ATTENTION = {
    "dit-xl-256": 256 * 256 * 1152,  # 32 x 32 latent: 256 tokens
    "pixart-1024": 4096 * (4096 + 120) * 1152,  # self, then cross to 120 T5 tokens
    "sd3": 2 * (4096 + 77 + 256) ** 2 * 1536,  # 2 joint blocks over [image; CLIP; T5]
    "flux-dev": 2 * (4096 + 512) ** 2 * 3072,  # 1 double- and 1 single-stream block
    "latte": 16 * 1024 * (1024 + 120) * 1152 + 1024 * 16 * 16 * 1152,  # per frame: self + cross; temporal
    "cogvideox-5b": (3 * 30 * 45 + 226) ** 2 * 3072,  # 9 frames -> 3 latent frames of 30 x 45 tokens, + text
    "cogvideox-2b": (3 * 30 * 45 + 226) ** 2 * 1920,
    # 51 frames -> 15 latent frames of 15 x 27 tokens (53 columns padded to 54): spatial self, temporal self, and
    # both blocks' cross-attention to 300 T5 tokens
    "opensora": (15 * 405 * 405 + 405 * 15 * 15 + 2 * 15 * 405 * 300) * 1152,
    # 49 frames -> 9 latent frames of 30 x 53 tokens, joint with 256 T5 tokens, 2 blocks; the caption pool: 1 query
    "mochi": 2 * (9 * 30 * 53 + 256) ** 2 * 3072 + 1 * (1 + 256) * 4096,
}
ROPE_ANGLES = {"mochi": 2 * 14310 * 3 * 24 * 64}  # Mochi's batched product besides attention: positions x frequencies


@pytest.mark.parametrize("model", MODELS)
def test_each_backbone_sees_the_studys_tokens(shallow, model):
    count = flops.forward_flops(study(model))
    assert count.attention == 4 * study(model).batch * ATTENTION[model] + ROPE_ANGLES.get(model, 0)


def test_batch_two_doubles_the_flops(shallow):
    one = flops.forward_flops(study("flux-dev"))
    two = flops.forward_flops(replace(study("flux-dev"), batch=2))
    assert (two.total, two.attention) == (2 * one.total, 2 * one.attention)


def test_open_soras_temporal_attention_grows_with_the_square_of_the_frames(shallow):
    """51 -> 102 -> 153 frames: 15 -> 30 -> 45 latent frames of S = 15 x 27 tokens. Spatial and cross-attention grow
    with the frames, the temporal self-attention (B S sequences of T tokens) with their square, every other product
    with the frames (the tokens) plus a part per prompt (the caption's projection, the timestep's MLP)."""
    s = study("opensora")
    counts = [flops.forward_flops(replace(s, frames=n * s.frames)) for n in (1, 2, 3)]
    cfg = opensora.PRESETS["OpenSora-STDiT-v3"]
    T, S = 15, 15 * 27
    temporal = 4 * s.batch * S * T * T * cfg.hidden_size * cfg.depth  # 4 B S Nh T^2 Dh per temporal block
    assert counts[1].attention - 2 * counts[0].attention == 2 * temporal
    assert counts[2].attention - 3 * counts[0].attention == 6 * temporal
    others = [c.total - c.attention for c in counts]
    assert others[2] - others[1] == others[1] - others[0] > 0


def test_full_3d_attention_grows_with_the_square_of_the_tokens(shallow):
    """CogVideoX-2b: 9 -> 17 frames is 3 -> 5 latent frames, (4050 + 226)^2 -> (6750 + 226)^2 attention."""
    s = study("cogvideox-2b")
    short, long = flops.forward_flops(s), flops.forward_flops(replace(s, frames=17))
    assert long.attention / short.attention == pytest.approx((6750 + 226) ** 2 / (4050 + 226) ** 2, rel=1e-12)


def test_study_time():
    s = study("mochi")  # 100 prompts: 13 on each of 8 GPUs
    per_forward = 1e15
    one = flops.study_seconds(s, per_forward, flops.H100_PEAK)
    assert one == 100 * 64 * per_forward / (989e12 * 0.40)
    assert flops.study_seconds(s, per_forward, flops.H100_PEAK, gpus=8) == one * 13 / 100
    assert [flops.duration(x) for x in (30, 9 * 60 + 3, 59 * 60, 3600 * 2.44)] == ["0.5 min", "9.1 min", "59 min",
                                                                                   "2.4 h"]
