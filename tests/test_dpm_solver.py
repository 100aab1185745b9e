"""DPM-Solver++ against diffusers' DPMSolverMultistepScheduler: timesteps, noise levels, alphas_cumprod and every
step of a full sampling loop, for PixArt-alpha's Hub config and four variants (see generate_dpm_solver.CASES),
at 1 to 50 steps. The model output at each step is a fixed function of (x, t), so minidit's loop and diffusers'
see the same inputs as long as they agree.

Measured (torch 2.13.0 CPU, diffusers 0.42.1): every step is bit-identical to diffusers' (max error 0), for every
case and step count; the live cases assert exactly that, the stored-fixture cases allow float32 rounding.

"fixture" cases compare with tests/fixtures/dpm_solver/reference.safetensors; "live" cases rebuild the reference
with the installed diffusers (skipped without it).
"""

import json
from dataclasses import asdict
from functools import cache

import pytest
import torch
from conftest import LIVE, SOURCES, assert_matches, reference_generator
from safetensors import safe_open
from safetensors.torch import load_file

from minidit.errors import MiniditError
from minidit.schedulers.dpm_solver import DPMSolver, DPMSolverConfig

G = reference_generator("generate_dpm_solver")
# max |error| / max(1, max |expected|) against the stored fixtures; worst (tests/measure_tolerances.py,
# default/avx2/avx512): 2.0e-6 (step 44 of a 50-step loop, default; 1.1e-6 at avx2/avx512) x 4 -> 8e-6.
FIXTURE_TOLERANCE = 8e-6


@cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@cache
def live(case: str, steps: int) -> dict[str, torch.Tensor]:
    return G.dpm_reference(G.CASES[case], steps, stored()["inputs/sample"], stored()["inputs/noise"])


def reference(source: str, case: str, steps: int, key: str) -> torch.Tensor:
    if source == "live":
        return live(case, steps)[key]
    return stored()[f"{case}/{key}" if key == "alphas_cumprod" else f"{case}/N{steps}/{key}"]


def scheduler(case: str, steps: int) -> DPMSolver:
    return DPMSolver(DPMSolverConfig.from_hub(G.CASES[case]), steps)


def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
    return G.model_output(x, t, stored()["inputs/noise"])


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.STEPS)
@pytest.mark.parametrize("case", G.CASES)
def test_timesteps(case, steps, source):
    assert scheduler(case, steps).timesteps == reference(source, case, steps, "timesteps").tolist()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.STEPS)
@pytest.mark.parametrize("case", G.CASES)
def test_sigmas(case, steps, source):
    """`sigmas` is diffusers' `scheduler.sigmas[:-1]`; `noise_levels` adds the final level (0 or sigma_min)."""
    dpm, expected = scheduler(case, steps), reference(source, case, steps, "sigmas")
    assert_matches(torch.tensor(dpm.sigmas, dtype=torch.float32), expected[:-1], source, FIXTURE_TOLERANCE)
    assert dpm.noise_levels.dtype == expected.dtype == torch.float32
    assert_matches(dpm.noise_levels, expected, source, FIXTURE_TOLERANCE)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.CASES)
def test_alphas_cumprod(case, source):
    expected = reference(source, case, 1, "alphas_cumprod")
    assert expected.dtype == torch.float32
    assert_matches(scheduler(case, 1).alphas_cumprod, expected, source, FIXTURE_TOLERANCE)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.STEPS)
@pytest.mark.parametrize("case", G.CASES)
def test_every_step_of_the_loop(case, steps, source):
    dpm, expected = scheduler(case, steps), reference(source, case, steps, "samples")
    x = stored()["inputs/sample"]
    assert len(dpm.timesteps) == len(expected) == steps
    for k, t in enumerate(dpm.timesteps):
        x = dpm.step(model_fn(x, t), t, x)
        assert_matches(x, expected[k], source, FIXTURE_TOLERANCE, (k, t))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", [4, 20])
@pytest.mark.parametrize("case", ["pixart", "heun-trailing-sigma-min"])
def test_sample_runs_the_loop_and_starts_afresh(case, steps, source):
    """`sample` ends where diffusers' loop ends, also when run a second time on the same solver."""
    dpm, expected = scheduler(case, steps), reference(source, case, steps, "samples")[-1]
    for run in range(2):
        assert_matches(dpm.sample(model_fn, stored()["inputs/sample"]), expected, source, FIXTURE_TOLERANCE, run)


@LIVE
@pytest.mark.parametrize("case", G.CASES)
def test_config_fields_equal_diffusers(case):
    """Every DPMSolverConfig field, absent keys included (final_sigmas_type), has diffusers' value."""
    from diffusers import DPMSolverMultistepScheduler

    diffusers_config = DPMSolverMultistepScheduler.from_config(G.CASES[case]).config
    assert asdict(DPMSolverConfig.from_hub(G.CASES[case])) == {k: diffusers_config[k] for k in
                                                                asdict(DPMSolverConfig())}


def test_pixart_hub_config_file():
    """PixArt-alpha's scheduler_config.json as stored (655 B on the Hub) reads to the PixArt config."""
    text = (G.FIXTURES / "scheduler_config.json").read_bytes()
    assert len(text) == G.PIXART_CONFIG_BYTES == 655
    assert text.decode() == G.config_json(G.PIXART_CONFIG)
    assert DPMSolverConfig.from_hub(json.loads(text)) == DPMSolverConfig.from_hub(G.CASES["pixart"])


@pytest.mark.parametrize("bad, message", [
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ({"algorithm_type": "deis"}, "algorithm_type"),
    ({"thresholding": True}, "thresholding"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"use_lu_lambdas": True}, "use_lu_lambdas"),
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"trained_betas": [0.01] * 1000}, "trained_betas"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"lambda_min_clipped": -5.1}, "lambda_min_clipped"),
    ({"solver_order": 3}, "solver_order"),
    ({"solver_type": "logrho"}, "solver_type"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"final_sigmas_type": "denoise_to_zero"}, "final_sigmas_type"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
])
def test_unsupported_configs_are_refused(bad, message):
    with pytest.raises(MiniditError, match=message):
        DPMSolverConfig.from_hub({**G.PIXART_CONFIG, **bad})


@pytest.mark.parametrize("steps", [0, 1001])
def test_step_count_out_of_range(steps):
    with pytest.raises(MiniditError, match="1 to 1000"):
        DPMSolver(DPMSolverConfig(), steps)


@pytest.mark.parametrize("spacing, steps", [("linspace", 1000), ("leading", 1000), ("trailing", 61)])
def test_step_counts_whose_timesteps_repeat_or_leave_the_range(spacing, steps):
    """diffusers' rounding repeats a timestep here (a zero step in the multistep update) or adds t = -1."""
    with pytest.raises(MiniditError, match="repeated or out-of-range timesteps"):
        DPMSolver(DPMSolverConfig(timestep_spacing=spacing), steps)


def test_steps_must_follow_the_timesteps():
    dpm, x = scheduler("pixart", 4), stored()["inputs/sample"]
    with pytest.raises(MiniditError, match="in order"):
        dpm.step(model_fn(x, dpm.timesteps[1]), dpm.timesteps[1], x)
    for t in dpm.timesteps:
        x = dpm.step(model_fn(x, t), t, x)
    with pytest.raises(MiniditError, match="no further step"):
        dpm.step(model_fn(x, 0), 0, x)


def test_fixture_cases_match_the_generator():
    with safe_open(G.REFERENCE, "pt") as f:
        meta = json.loads(f.metadata()["reference"])
    assert meta["cases"] == G.CASES and tuple(meta["steps"]) == G.STEPS
