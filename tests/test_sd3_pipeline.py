"""SD3-medium: the whole text-to-image recipe (minidit/pipelines/sd3.py) against diffusers' StableDiffusion3Pipeline
on identical tiny weights.

Every case goes through minidit's real loading code on a tiny stable-diffusion-3-medium-diffusers folder in the
exact Hub layout written by tests/reference/generate_sd3_pipeline.py (model_index.json of the Hub's 706 B, the Hub
scheduler config, two CLIP BPE tokenizers padding with `<|endoftext|>` and `!`, two CLIPTextModelWithProjection,
T5 in two shards with spiece.model and tokenizer.json, the transformer with SD3's 24 joint blocks in one fp16 file,
a 16-channel 8x VAE). Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/sd3_pipeline/VERSIONS.json);
- "live": the reference rebuilt now from the same files with the installed diffusers (skipped without it).
Errors are max |minidit - reference| / max(1, max |reference|).
"""


import pytest
import torch
from conftest import SOURCES, TinyPipeline

from minidit.errors import MiniditError
from minidit.pipelines.sd3 import SD3Recipe

P = TinyPipeline("generate_sd3_pipeline", SD3Recipe)
G = P.G
# fp32; worst error against the stored fixtures (tests/measure_tolerances.py, default/avx2/avx512):
# 2.6e-6 (default) x 3.9 -> 1e-5.
TOL = 1e-5


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.PIPELINE_CASES)
def test_pipeline_final_latents(case, source):
    """4 Euler steps, guidance 7.0 ([uncond; cond] batch), seed 0, T5 length 256: StableDiffusion3Pipeline's final
    latents at the default 1024x1024, at 256x384, and at 256x384 with FLUX.1-dev's schedule."""
    assert P.final_latents_error(case, source) < TOL


def test_schedules():
    """"sd3": the repository's fixed shift 3.0, no mu; "flux": FLUX.1-dev's dynamic shift, mu from (H/16)(W/16)."""
    r = P.recipe(256, 384)
    sd3 = r.make_scheduler("sd3", 4)
    assert sd3.mu is None and sd3.cfg.shift == 3.0 and sd3.sigmas[0] == 1.0
    assert r.make_scheduler("flux", 4).mu == pytest.approx(0.5 + 0.65 * (384 - 256) / 3840)
    assert P.recipe(None, None).make_scheduler("flux", 4).mu == pytest.approx(1.15)


def test_defaults_and_layers():
    r = P.recipe(None, None)
    assert (r.default_steps, r.default_guidance, r.max_sequence_length) == (28, 7.0, 256)
    assert r.resolution == (1024, 1024) and r.default_scheduler == "sd3" and r.schedulers == ("sd3", "flux")
    assert r.branches(7.0) == ("uncond", "cond") and r.branches(1.0) == ("cond",)
    layers = r.attention_layers()
    assert len(layers) == 24 and all(layer.kind == "joint" and layer.streams == ("img", "txt") for layer in layers)


def test_text_recipe():
    """(1, 77 + 256, 32): [CLIP-L; bigG] penultimate states zero-padded from 24 to T5's 32, then T5; pooled 8 + 16."""
    r = P.recipe(256, 384)
    text, pooled = r.encode("a cabin")
    assert text.shape == (1, 77 + 256, 32) and pooled.shape == (1, 24)
    assert torch.all(text[:, :77, 24:] == 0) and torch.any(text[:, :77, :24] != 0)


def test_prompt_case_is_kept():
    """StableDiffusion3Pipeline does not lower-case: the CLIP tokenizers do, T5's does not."""
    r = P.recipe(256, 384)
    upper, lower = r.encode("A Cabin"), r.encode("a cabin")
    assert torch.equal(upper[0][:, :77], lower[0][:, :77]) and torch.equal(upper[1], lower[1])
    assert not torch.equal(upper[0][:, 77:], lower[0][:, 77:])


def test_text_encoders_are_released_after_prepare():
    r = SD3Recipe(G.FOLDER, dtype=torch.float32, device="cpu", height=256, width=256)
    expected = r.encode("a prompt")
    r.prepare(["a prompt"])
    assert r.text_encoder is None and r.text_encoder_2 is None and r.text_encoder_3 is None
    assert "" in r.embeddings  # the negative prompt
    states, pooled = r.encode("a prompt")
    assert torch.equal(states, expected[0]) and torch.equal(pooled, expected[1])
    with pytest.raises(MiniditError, match="released"):
        r.encode("another prompt")


def test_fp16_backbone_runs_t5_in_bf16():
    r = SD3Recipe(G.FOLDER, dtype=torch.float16, device="cpu", height=256, width=256, max_sequence_length=16)
    assert r.text_encoder_3.shared.weight.dtype == torch.bfloat16 and r.model.proj_out.weight.dtype == torch.float16
    states, pooled = r.encode("a prompt")
    assert states.shape == (1, 77 + 16, 32) and states.dtype == pooled.dtype == torch.float16


def test_decode_gives_images():
    images = P.recipe(256, 384).decode(torch.randn(1, 16, 32, 48))
    assert images.shape == (1, 256, 384, 3) and images.dtype.name == "uint8"


@pytest.mark.parametrize("kwargs, match", [({"height": 100}, "multiples of 16"), ({"width": 0}, "multiples of 16"),
                                           ({"max_sequence_length": 513}, "between 1 and 512")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MiniditError, match=match):
        SD3Recipe(G.FOLDER, dtype=torch.float32, device="cpu", **kwargs)
