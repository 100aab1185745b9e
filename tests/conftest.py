"""Shared test helpers: the reference generator as a module, the live-oracle marker, a tiny random DiT folder,
the generated tiny text-to-image pipelines."""

import functools
import importlib.util
import json
import os
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
        return r.generate([self.G.PIPELINE_PROMPT], self.G.PIPELINE_SEED,
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
    """Max |actual - expected| relative to max(1, max |expected|). Logged for tests/measure_tolerances.py."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    error = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1)).item()
    log_error(error)
    return error


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, source: str, tolerance: float, what=None) -> None:
    """A "live" reference was computed just now in this process, so minidit must equal it bit for bit; a "fixture"
    was stored on another machine, whose CPU kernels round differently, so it must be within `tolerance`
    (scaled_error; each caller states the measured worst case and margin behind its tolerance)."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    error = scaled_error(actual, expected)
    if source == "live":
        assert torch.equal(actual, expected), (what, error)
    else:
        assert error <= tolerance, (what, error, tolerance)


def log_error(error: float) -> None:
    """With MINIDIT_ERROR_LOG=FILE set, append the running test's error to FILE as a JSON line: this is how
    tests/measure_tolerances.py finds the worst error of every comparison under each CPU capability."""
    if path := os.environ.get("MINIDIT_ERROR_LOG"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "error": error}) + "\n")


def installed(name: str) -> bool:
    """Whether a package can be imported. MINIDIT_LIVE=0 hides the reference extra (diffusers, transformers, regex),
    so a machine that has them runs the suite as CI does: stored fixtures only."""
    if os.environ.get("MINIDIT_LIVE") == "0" and name in ("diffusers", "transformers", "regex"):
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# torch 2.13 on a CPU with AVX-512-BF16/AMX: forced down to ATEN_CPU_CAPABILITY=default or avx2, its bf16
# attention kernel still picks the packed AVX-512 path and raises this. A CPU that really lacks AVX-512 never
# takes that path, so the failure says nothing about minidit; such a test is reported as skipped, with the reason,
# and is checked by the run at the CPU's own capability.
EMULATED_CAPABILITY_BUG = "pack_vnni2 is only supported when avx512 is supported"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (call.excinfo is not None and os.environ.get("ATEN_CPU_CAPABILITY")
            and call.excinfo.errisinstance(RuntimeError) and EMULATED_CAPABILITY_BUG in str(call.excinfo.value)):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: torch's bf16 attention cannot run under ATEN_CPU_CAPABILITY="
                           f"{os.environ['ATEN_CPU_CAPABILITY']} on this CPU ({EMULATED_CAPABILITY_BUG!r}); "
                           f"the run at the CPU's own capability checks this test")


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
