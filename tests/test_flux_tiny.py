"""The embedded flux-tiny: FLUX.1-dev's folder layout without the VAE (pixel space), within 10 MB, loaded by
minidit's real loaders and, identically, by diffusers and transformers; and the card's commands on it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import LIVE, ROOT

import minidit
from minidit.pipelines import FLUX_TINY_PROMPTS
from minidit.pipelines.flux import TRUE_CFG_SCALE
from minidit.tiny import shapes

TINY = ROOT / "weights" / "flux-tiny"
MAX_FOLDER_BYTES = 10 * 10**6
# FLUX.1-dev's files (checkpoints.md §4.1), without vae/ and tokenizer_2/tokenizer.json (see the model card)
FILES = {
    "model_index.json", "README.md", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
    *(f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
}


@pytest.fixture(scope="module")
def recipe():
    return minidit.load_backbone("flux-tiny")


def test_hub_layout_and_size():
    files = {p.relative_to(TINY).as_posix() for p in TINY.rglob("*") if p.is_file()}
    assert files == FILES
    assert sum((TINY / f).stat().st_size for f in files) <= MAX_FOLDER_BYTES
    index = json.loads((TINY / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and "vae" not in index  # pixel space
    config = json.loads((TINY / "transformer" / "config.json").read_text())
    assert (config["guidance_embeds"], config["in_channels"]) == (False, 12)


def test_recipe_defaults(recipe):
    """28 steps of FLUX.1-dev's schedule (mu 0.5 at 256 tokens), true CFG, T5 length 16, 32x32, both streams."""
    assert (recipe.default_steps, recipe.default_guidance) == (28, TRUE_CFG_SCALE)
    assert (recipe.max_sequence_length, recipe.resolution, recipe.pixel_space) == (16, (32, 32), True)
    assert recipe.make_scheduler("flux", 28).mu == pytest.approx(0.5)
    assert recipe.branches(recipe.default_guidance) == ("uncond", "cond")
    layers = recipe.attention_layers()
    assert len(layers) == 6 and all(layer.streams == ("img", "txt") for layer in layers)


def test_tokenizers_know_every_caption(recipe):
    """Every caption is read without unknown pieces, within the T5 length, and each CLIP word is one BPE token."""
    for text in shapes.all_captions():
        ids = recipe.tokenizer_2.encode(text)
        assert 2 not in ids and len(ids) < recipe.max_sequence_length, text
        clip_ids, mask = recipe.tokenizer([text], 77)
        assert int(mask.sum()) == 2 + len(text.split()), text  # <|startoftext|>, one token per word, <|endoftext|>
    assert all(shapes.parse_caption(p) is not None for p in FLUX_TINY_PROMPTS)


def test_text_matters(recipe):
    """Captions one word apart give different samples: the model reads its text."""
    from minidit.api import sample

    one, _ = sample(recipe, "a red circle on a black background", steps=8)
    other, _ = sample(recipe, "a blue circle on a black background", steps=8)
    square, _ = sample(recipe, "a red square on a black background", steps=8)
    assert (one - other).abs().mean() > 0.1 and (one - square).abs().mean() > 0.05


@LIVE
def test_diffusers_transformer_agrees(recipe):
    from diffusers import FluxTransformer2DModel

    reference = FluxTransformer2DModel.from_pretrained(TINY / "transformer").eval()
    text, pooled = recipe.encode(FLUX_TINY_PROMPTS[0])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 256, 12, generator=g), torch.tensor([0.7])
    img_ids, txt_ids = minidit.pipelines.flux.image_ids(32, 32), torch.zeros(text.shape[1], 3)
    with torch.no_grad():
        ours = recipe.model(x, t, text, pooled, img_ids, txt_ids)
        theirs = reference(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                           img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    assert torch.equal(ours, theirs)


@LIVE
def test_transformers_text_encoders_and_tokenizers_agree(recipe):
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    clip, t5 = CLIPTextModel.from_pretrained(TINY / "text_encoder"), T5EncoderModel.from_pretrained(
        TINY / "text_encoder_2")
    clip_tokenizer, t5_tokenizer = CLIPTokenizer.from_pretrained(TINY / "tokenizer"), T5TokenizerFast.from_pretrained(
        TINY / "tokenizer_2")
    texts = shapes.all_captions() + ["", "A RED circle, on a black background!"]
    for text in texts:
        ours_clip, _ = recipe.tokenizer([text], 77)
        ours_t5, _ = recipe.tokenizer_2([text], 16)
        assert ours_clip.tolist() == clip_tokenizer([text], padding="max_length", max_length=77,
                                                    truncation=True).input_ids, text
        assert ours_t5.tolist() == t5_tokenizer([text], padding="max_length", max_length=16,
                                                truncation=True).input_ids, text
    clip_ids, _ = recipe.tokenizer(texts, 77)
    t5_ids, _ = recipe.tokenizer_2(texts, 16)
    with torch.no_grad():
        assert torch.equal(recipe.text_encoder(clip_ids).pooled, clip(clip_ids).pooler_output)
        assert torch.equal(recipe.text_encoder_2(t5_ids), t5(t5_ids).last_hidden_state)


def run_analyze(tmp_path, *args) -> dict:
    """analyze.py as typed, from a scratch folder (its runs/ goes there); the run's manifest."""
    result = subprocess.run([sys.executable, str(ROOT / "analyze.py"), *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                                            "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.any_cpu
def test_the_scheduler_ablation_command(tmp_path):
    """`python analyze.py --steps 14 --scheduler sd3`, offline: flux-tiny, 8 captions, both streams and branches."""
    run_analyze(tmp_path, "--steps", "14", "--scheduler", "sd3")
    out = tmp_path / "runs" / "flux-tiny-sd3-14steps"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["model"], manifest["steps"], manifest["scheduler"]["schedule"]) == ("flux-tiny", 14, "sd3")
    assert manifest["n_prompts_done"] == 8 and manifest["guidance"] == TRUE_CFG_SCALE
    assert manifest["streams"] == ["img", "txt"] and manifest["branches"] == ["uncond", "cond"]
    rows = (out / "summary.csv").read_text().splitlines()
    # layers, streams, branches (uncond, cond and the pooled "all"), K/V/A, transitions, metrics
    assert len(rows) == 1 + 6 * 2 * 3 * 3 * 13 * 4
    for record in sorted((out / "records").glob("*.npz")):
        sums = np.load(record)[np.load(record).files[0]]
        assert sums.shape[:3] == (6, 2, 2) and np.isfinite(sums).all() and (sums[..., 0] > 0).all()


@pytest.mark.any_cpu
def test_make_analyze_default(tmp_path):
    """What `make analyze` runs (analyze.py --model flux-tiny --resume --save-images): 28 steps of FLUX.1-dev's
    schedule with true CFG, images, and figures of both streams."""
    makefile = (ROOT / "Makefile").read_text()
    assert "MODEL ?= flux-tiny" in makefile and "analyze.py --model $(MODEL) --resume --save-images" in makefile
    run_analyze(tmp_path, "--model", "flux-tiny", "--resume", "--save-images")
    out = tmp_path / "runs" / "flux-tiny-flux-28steps"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["steps"], manifest["guidance"], manifest["scheduler"]["mu"]) == (28, TRUE_CFG_SCALE, 0.5)
    assert manifest["n_prompts_done"] == 8 and manifest["branches"] == ["uncond", "cond"]
    assert len(list((out / "images").glob("*.png"))) == 8
    for name in ("grid_l1_img_all.png", "grid_l1_txt_all.png", "heatmap_rel_l1_txt_all.png", "samples.png"):
        assert (out / "figures" / name).stat().st_size > 0, name


def test_training_pairs_each_picture_with_its_caption():
    """The trainer looks up a drawn picture's text encoding by caption_index: the row of its caption."""
    captions = shapes.all_captions()
    parts = torch.tensor([shapes.parse_caption(c) for c in captions])
    assert shapes.caption_index(parts).tolist() == list(range(len(captions)))
