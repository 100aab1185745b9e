"""Shared test helpers: the reference generator as a module, the live-oracle marker, a tiny random DiT folder."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minidit.models.dit import DiT, DiTConfig, save_hub_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "dit"


def reference_generator(stem: str = "generate"):
    """tests/reference/<stem>.py as a module (the reference libraries are imported only inside its functions)."""
    name = f"minidit_tests_reference_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "reference" / f"{stem}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| relative to max(1, max |expected|)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1)).item()


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


LIVE = pytest.mark.skipif(not installed("diffusers"), reason="diffusers is not installed: the live reference cases "
                          "are skipped (the stored-fixture cases still run)")
SOURCES = [pytest.param("fixture"), pytest.param("live", marks=LIVE)]
TINY = DiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                 patch_size=2, sample_size=8, num_embeds_ada_norm=4)
DDIM_CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02,
               "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
               "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}


def write_dit_folder(folder: Path, cfg: DiTConfig = TINY, seed: int = 0, std: float = 0.1) -> Path:
    """A DiT with random weights (adaLN included, so every layer moves) in the Hub layout of DiT-XL-2-256."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model = DiT(cfg)
        for p in model.parameters():
            p.normal_(0, std)
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
