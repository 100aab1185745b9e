"""Reference fixtures for the DPM-Solver++ tests, computed with diffusers' DPMSolverMultistepScheduler as the oracle.

Run by hand when the reference changes (needs the reference extra: diffusers):

    python tests/reference/generate_dpm_solver.py

It writes, under tests/fixtures/dpm_solver/ (≈1 MB in all; the run is deterministic):

    scheduler_config.json   PixArt-alpha's `scheduler/scheduler_config.json` (PixArt-alpha/PixArt-XL-2-1024-MS),
                            byte-exact: 655 B, serialised as diffusers' `save_config` writes it
    reference.safetensors   the loop's inputs and, for each case of CASES and each step count N of STEPS:
        inputs/sample                 (2, 4, 8, 6)  the starting sample, seeded
        inputs/noise                  (2, 4, 8, 6)  the fixed tensor inside the stand-in model, seeded
        {case}/alphas_cumprod         (1000,)       float32
        {case}/N{N}/timesteps         (N,)          int64, `scheduler.timesteps` after `set_timesteps(N)`
        {case}/N{N}/sigmas            (N + 1,)      float32, `scheduler.sigmas` (the last entry is the final level)
        {case}/N{N}/samples           (N, 2, 4, 8, 6)  every `scheduler.step(...).prev_sample` of one full loop, the
                                                    model output at each step being `model_output(x, t, noise)`;
                                                    its metadata holds CASES and STEPS
    VERSIONS.json           the library versions that produced the expected outputs

The cases: PixArt's own config (its last step is always first order: final_sigmas_type "zero"), and variants
that between them flip every other switch minidit supports: scaled-linear betas, v-prediction, leading spacing
with steps_offset, first order; heun, trailing spacing and sigma_min, where lower_order_final alone decides the
last step (first order below 15 steps, second order from 15); sigma_min without lower_order_final (the last step
is second order at any step count); euler_at_final with sigma_min (the last step is first order at any count).
The step counts straddle the threshold (14, 15) and include 1 and 2, where the loop never or only once reaches
second order.

Functions here are also used by the tests' "live" cases; diffusers is imported inside the functions that need it.
"""

import json
import math
import warnings
from pathlib import Path

import generator_tools as tools
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dpm_solver"
REFERENCE = FIXTURES / "reference.safetensors"

SEED = 20240321
SHAPE = (2, 4, 8, 6)  # (B, C, H, W), non-square
STEPS = (1, 2, 4, 14, 15, 20, 25, 50)

# PixArt-alpha/PixArt-XL-2-1024-MS scheduler/scheduler_config.json, key for key (655 B once serialised)
PIXART_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0", "algorithm_type": "dpmsolver++",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False, "lambda_min_clipped": -math.inf, "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None}
PIXART_CONFIG_BYTES = 655

CASES = {
    "pixart": PIXART_CONFIG,
    "scaled-v-leading-order1": {**PIXART_CONFIG, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                "beta_end": 0.012, "prediction_type": "v_prediction", "timestep_spacing": "leading",
                                "steps_offset": 1, "solver_order": 1},
    "heun-trailing-sigma-min": {**PIXART_CONFIG, "solver_type": "heun", "timestep_spacing": "trailing",
                                "final_sigmas_type": "sigma_min"},
    "sigma-min-no-lower-order-final": {**PIXART_CONFIG, "final_sigmas_type": "sigma_min", "lower_order_final": False},
    "euler-at-final-sigma-min": {**PIXART_CONFIG, "final_sigmas_type": "sigma_min", "euler_at_final": True,
                                 "lower_order_final": False},
}

# the stand-in model: mostly the input (as a noise prediction is, early on) plus a fixed tensor whose weight
# varies smoothly with t, so that consecutive data predictions differ and the second-order term is exercised
INPUT_WEIGHT = 0.9
NOISE_WEIGHT = 0.1
NOISE_PERIOD = 100.0


def model_output(x: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    return INPUT_WEIGHT * x + (NOISE_WEIGHT * math.cos(t / NOISE_PERIOD)) * noise


def config_json(config: dict) -> str:
    """Serialised the way diffusers writes config files (and so the way the Hub files are)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The starting sample and the stand-in model's fixed noise."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def dpm_reference(config: dict, steps: int, sample: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """diffusers' DPMSolverMultistepScheduler: its schedule, and every step of a full loop from `sample`."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.utils import logging

    logging.set_verbosity_error()
    scheduler = DPMSolverMultistepScheduler.from_config(config)
    with warnings.catch_warnings():  # numpy 2's `__array__` copy-keyword notice from inside diffusers
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(steps)
    x, samples = sample.clone(), []
    for t in scheduler.timesteps:
        x = scheduler.step(model_output(x, int(t), noise), t, x).prev_sample
        samples.append(x)
    return {"timesteps": scheduler.timesteps.clone(), "sigmas": scheduler.sigmas.clone(),
            "alphas_cumprod": scheduler.alphas_cumprod.clone(), "samples": torch.stack(samples)}


def main() -> None:
    from safetensors.torch import save_file

    FIXTURES.mkdir(parents=True, exist_ok=True)
    config_file = FIXTURES / "scheduler_config.json"
    config_file.write_text(config_json(PIXART_CONFIG))
    assert config_file.stat().st_size == PIXART_CONFIG_BYTES, config_file.stat().st_size

    sample, noise = inputs()
    ref = {"inputs/sample": sample, "inputs/noise": noise}
    for case, config in CASES.items():
        for steps in STEPS:
            out = dpm_reference(config, steps, sample, noise)
            assert torch.isfinite(out["samples"]).all(), (case, steps)
            ref[f"{case}/alphas_cumprod"] = out["alphas_cumprod"]
            for key in ("timesteps", "sigmas", "samples"):
                ref[f"{case}/N{steps}/{key}"] = out[key]

    # one metadata entry: safetensors writes several in hash order, which would make the file non-deterministic
    metadata = {"cases": CASES, "steps": STEPS}
    save_file({k: v.contiguous() for k, v in sorted(ref.items())}, REFERENCE,
              metadata={"reference": json.dumps(metadata, sort_keys=True)})
    tools.write_json(FIXTURES / "VERSIONS.json", tools.versions("diffusers", "torch", "numpy", "safetensors"))
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
