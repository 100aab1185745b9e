"""FLUX.1: the whole text-to-image recipe (minidit/pipelines/flux.py) against diffusers' FluxPipeline on identical
tiny weights.

Every case goes through minidit's real loading code on a tiny FLUX.1-dev folder in the exact Hub layout written by
tests/reference/generate_flux_pipeline.py (byte-exact model_index.json, the Hub scheduler config, the CLIP BPE
tokenizer and a CLIPTextModel, T5 in two shards with spiece.model and tokenizer.json, the transformer in three bf16
shards with 19 + 38 blocks, a 16-channel 8x VAE). Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/flux_pipeline/VERSIONS.json);
- "live": the reference rebuilt now from the same files with the installed diffusers (skipped without it).
Errors are max |minidit - reference| / max(1, max |reference|).
"""

import shutil

import pytest
import torch
from conftest import SOURCES, TinyPipeline
from generator_tools import write_sorted_json

from minidit import weights
from minidit.errors import MiniditError
from minidit.pipelines.flux import FluxRecipe, image_ids, pack, unpack

P = TinyPipeline("generate_flux_pipeline", FluxRecipe)
G = P.G
# fp32. Live: 0 with FluxPipeline's own schedule, 9.4e-7 with SD3's (the sigmas' float32 cast). Against the stored
# fixtures, worst (tests/measure_tolerances.py, default/avx2/avx512): 2.45e-6 (avx2, default) x 4 -> 1e-5.
TOL = 1e-5


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.PIPELINE_CASES)
def test_pipeline_final_latents(case, source):
    """4 Euler steps, distilled guidance 3.5, seed 0, T5 length 512: FluxPipeline's final latents at the default
    1024x1024, at 256x384, and at 256x384 with SD3's schedule."""
    assert P.final_latents_error(case, source) < TOL


@pytest.mark.parametrize("steps", G.SD3_STEPS)
def test_sd3_schedule_is_sd3s(steps):
    """--scheduler sd3: the sigmas of SD3-medium's scheduler after set_timesteps(N), bit for bit, whatever the size."""
    for size in ((256, 384), (None, None)):
        scheduler = P.recipe(*size).make_scheduler("sd3", steps)
        assert torch.equal(torch.tensor(scheduler.sigmas), P.stored[f"sd3/{steps}/sigmas"])
        assert scheduler.mu is None


def test_flux_schedule_shifts_with_the_size():
    """--scheduler flux: the repository's dynamic shift, mu from (H/16)(W/16) (1.15 at 1024x1024)."""
    assert P.recipe(None, None).make_scheduler("flux", 4).mu == pytest.approx(1.15)
    assert P.recipe(256, 384).make_scheduler("flux", 4).mu == pytest.approx(0.5 + 0.65 * (384 - 256) / 3840)


def test_defaults_and_layers():
    r = P.recipe(256, 384)
    assert (r.default_steps, r.default_guidance, r.max_sequence_length) == (28, 3.5, 512)
    assert r.branches(3.5) == ("cond",) and r.resolution == (256, 384)
    layers = r.attention_layers()
    assert len(layers) == 57 and all(layer.streams == ("img", "txt") for layer in layers)
    assert [layer.a_point for layer in layers[19:]] == ["pre_proj"] * 38


def test_packing_matches_the_pipelines():
    """2x2 packing with the channel outermost (checkpoints.md §4.5), written independently here, and the ids."""
    latents = torch.randn(1, 16, 6, 8)
    tokens = pack(latents)
    assert tokens.shape == (1, 12, 64)
    r, c, ch, py, px = 1, 2, 5, 1, 0
    assert tokens[0, r * 4 + c, ch * 4 + py * 2 + px] == latents[0, ch, 2 * r + py, 2 * c + px]
    assert torch.equal(unpack(tokens, 6, 8), latents)
    ids = image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[r * 4 + c].tolist() == [0, r, c]


def test_prompt_case_is_kept():
    """FluxPipeline does not lower-case: CLIP's tokenizer does, T5's does not, so T5 states differ by case."""
    r = P.recipe(256, 384)
    upper, lower = r.encode("A Cabin"), r.encode("a cabin")
    assert not torch.equal(upper[0], lower[0]) and torch.equal(upper[1], lower[1])


def test_text_encoders_are_released_after_prepare():
    r = FluxRecipe(G.FOLDER, dtype=torch.float32, device="cpu", height=256, width=256)
    expected = r.encode("a prompt")
    r.prepare(["a prompt"])
    assert r.text_encoder is None and r.text_encoder_2 is None
    states, pooled = r.encode("a prompt")
    assert torch.equal(states, expected[0]) and torch.equal(pooled, expected[1])
    with pytest.raises(MiniditError, match="released"):
        r.encode("another prompt")


def test_fp16_backbone_runs_t5_in_bf16():
    r = FluxRecipe(G.FOLDER, dtype=torch.float16, device="cpu", height=256, width=256, max_sequence_length=16)
    assert r.text_encoder_2.shared.weight.dtype == torch.bfloat16 and r.model.proj_out.weight.dtype == torch.float16
    states, pooled = r.encode("a prompt")
    assert states.shape == (1, 16, 32) and states.dtype == pooled.dtype == torch.float16


def test_decode_gives_images():
    images = P.recipe(256, 384).decode(torch.randn(1, 16, 32, 48))
    assert images.shape == (1, 256, 384, 3) and images.dtype.name == "uint8"


@pytest.mark.parametrize("kwargs, match", [({"height": 100}, "multiples of 16"), ({"width": 0}, "multiples of 16"),
                                           ({"max_sequence_length": 513}, "between 1 and 512")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MiniditError, match=match):
        FluxRecipe(G.FOLDER, dtype=torch.float32, device="cpu", **kwargs)


def test_schnell_defaults(tmp_path):
    """A schnell folder (guidance_embeds false, no guidance embedder): 4 steps, guidance 0, T5 length 256, shift 1."""
    folder = tmp_path / "FLUX.1-schnell"
    shutil.copytree(G.FOLDER, folder)
    shutil.copy(G.SCHEDULERS / "FLUX.1-schnell" / "scheduler" / "scheduler_config.json", folder / "scheduler")
    transformer = folder / "transformer"
    config = weights.read_json(transformer / "config.json")
    write_sorted_json(transformer / "config.json", {**config, "guidance_embeds": False})
    sd = weights.load_folder(transformer, torch.bfloat16)
    for p in transformer.glob("*.safetensors*"):
        p.unlink()
    from safetensors.torch import save_file

    save_file({k: v for k, v in sd.items() if "guidance_embedder" not in k},
              transformer / "diffusion_pytorch_model.safetensors")
    r = FluxRecipe(folder, dtype=torch.float32, device="cpu", height=256, width=256)
    assert (r.default_steps, r.default_guidance, r.max_sequence_length) == (4, 0.0, 256)
    scheduler = r.make_scheduler("flux", 4)
    assert scheduler.sigmas == pytest.approx([1.0, 0.75, 0.5, 0.25]) and scheduler.mu is None
    assert r.generate("a prompt", 0, scheduler, 0.0).shape == (1, 16, 32, 32)
