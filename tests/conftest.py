"""Shared test helpers: the reference generator as a module, the live-oracle marker, a tiny random DiT folder,
the generated tiny text-to-image pipelines."""

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidit.models.dit import DiT, DiTConfig, save_hub_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent / "reference"))  # the generators import generator_tools
import generator_tools  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "dit"


def reference_generator(stem: str = "generate"):
    """tests/reference/<stem>.py as a module (the reference libraries are imported only inside its functions)."""
    return generator_tools.generator(stem)


class TinyPipeline:
    """A tiny pipeline folder made by tests/reference/<stem>.py: the reference numbers it stored, a minidit
    recipe per output size, and minidit's final latents per pipeline case (each computed once per session)."""

    def __init__(self, stem: str, recipe_class):
        self.G, self.recipe_class = reference_generator(stem), recipe_class

    @functools.cached_property
    def stored(self) -> dict[str, torch.Tensor]:
        return load_file(self.G.REFERENCE)

    @functools.cache
    def recipe(self, height: int | None, width: int | None):
        return self.recipe_class(self.G.FOLDER, dtype=torch.float32, device="cpu", height=height, width=width)

    @functools.cache
    def final_latents(self, case: str) -> torch.Tensor:
        height, width, schedule = self.G.PIPELINE_CASES[case]
        r = self.recipe(height, width)
        return r.generate(self.G.PIPELINE_PROMPT, self.G.PIPELINE_SEED,
                          r.make_scheduler(schedule, self.G.PIPELINE_STEPS), self.G.PIPELINE_GUIDANCE)

    def final_latents_error(self, case: str, source: str) -> float:
        """minidit's final latents for `case` against the stored ("fixture") or freshly computed ("live") ones."""
        height, width, schedule = self.G.PIPELINE_CASES[case]
        latents = self.final_latents(case)
        expected = (self.stored[f"pipeline/{case}/latents"] if source == "fixture"
                    else self.G.reference_pipeline(self.G.FOLDER, height, width, schedule))
        assert latents.shape == (1, 16, (height or 1024) // 8, (width or 1024) // 8)
        return scaled_error(latents, expected)


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
