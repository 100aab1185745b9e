"""The embedded dit-tiny: loads through the real loader, is what diffusers loads, and `make analyze` works on it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import LIVE, ROOT

import minidit
from minidit.weights import safetensors_header

TINY = ROOT / "weights" / "dit-tiny"
MAX_WEIGHT_BYTES = 10 * 10**6


def test_hub_layout_and_size():
    index = json.loads((TINY / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and "vae" not in index  # pixel space
    weights = TINY / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHT_BYTES
    recipe = minidit.load_backbone("dit-tiny")
    assert set(safetensors_header(weights)) == set(recipe.model.state_dict())
    assert len(index["id2label"]) == recipe.num_classes
    assert recipe.default_prompts() == [index["id2label"][str(i)] for i in range(recipe.num_classes)]


@LIVE
def test_diffusers_loads_it_and_agrees():
    from diffusers import DiTTransformer2DModel

    ours = minidit.load_backbone("dit-tiny").model
    ref = DiTTransformer2DModel.from_pretrained(TINY / "transformer").eval()
    c = ours.config
    x = torch.randn(3, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0, 500, 999]), torch.tensor([0, 3, c.num_embeds_ada_norm])
    with torch.no_grad():
        assert torch.equal(ours(x, t, y), ref(x, timestep=t, class_labels=y).sample)


@pytest.mark.any_cpu
def test_make_analyze_dit_tiny_writes_everything(tmp_path):
    """What `make analyze MODEL=dit-tiny` runs (analyze.py --model dit-tiny --resume --save-images), into a
    temporary --out."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "analyze.py"), "--model", "dit-tiny", "--resume", "--save-images", "--out",
           str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["model"], manifest["steps"], manifest["guidance"]) == ("dit-tiny", 50, 4.0)
    assert manifest["n_prompts_done"] == 8 and len(list((out / "records").glob("[0-9]*.npz"))) == 8
    for name in ["summary.csv", "cv.csv", "figures/grid_l1_img_all.png", "figures/heatmap_l1_img_all.png",
                 "figures/grid_rel_l1_img_all.png", "figures/samples.png"]:
        assert (out / name).stat().st_size > 0, name
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 6 * 3 * 3 * 49 * 4  # layers, branches, K/V/A
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "8 of 8 prompts already done" in again.stderr
