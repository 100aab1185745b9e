"""Shared fixtures: a tiny random DiT written in the Hub layout of facebook/DiT-XL-2-256."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minidit.models.dit import DiT, DiTConfig, save_hub_config

ROOT = Path(__file__).resolve().parents[1]
TINY = DiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                 patch_size=2, sample_size=8, num_embeds_ada_norm=4)
DDIM_CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02,
               "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
               "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}


def write_dit_folder(folder: Path, cfg: DiTConfig = TINY, seed: int = 0) -> Path:
    """A pixel-space DiT with random weights (adaLN included, so every layer moves) in the Hub layout."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model = DiT(cfg)
        for p in model.parameters():
            p.normal_(0, 0.1)
    save_hub_config(cfg, folder / "transformer")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "transformer" / "diffusion_pytorch_model.safetensors")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(DDIM_CONFIG))
    labels = {str(i): name for i, name in enumerate(["circle", "square", "triangle", "cross"])}
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "id2label": labels}))
    return folder


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory) -> Path:
    return write_dit_folder(tmp_path_factory.mktemp("tiny-dit"))
