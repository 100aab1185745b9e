"""Mochi 1 preview's sampler against diffusers' FlowMatchEulerDiscreteScheduler set up as MochiPipeline sets it up
(linear-quadratic sigmas, invert_sigmas).

The fixtures are written by tests/reference/generate_mochi_pipeline.py. Each comparison runs against:
- "fixture": the outputs stored by the generator (diffusers 0.42.1, see fixtures/mochi_pipeline/VERSIONS.json);
- "live": the reference rebuilt now with the installed diffusers (skipped without it), which minidit must equal bit
  for bit.
Errors are max |minidit - reference| / max(1, max |reference|).
"""

import functools

import pytest
import torch
from conftest import SOURCES, assert_matches, reference_generator
from safetensors.torch import load_file

from minidit.errors import MiniditError
from minidit.schedulers.flow import FlowMatchConfig, FlowMatchEuler, linear_quadratic_sigmas

G = reference_generator("generate_mochi_pipeline")
# Live (in-process): 0 everywhere (bit-exact). Against the stored fixtures, the worst error per comparison
# (tests/measure_tolerances.py, default/avx2/avx512; the fixture was written at avx512): sigmas and timesteps 0; the
# float32 steps 3.93e-7 (default: x + dt v without a fused multiply-add), x 5; the steps that end in bf16 latents 0,
# allowed one bf16 rounding flip (2^-7 on this scale):
SCHEDULER_TOL = 2.0e-6
SCHEDULER_BF16_TOL = 2**-7


@functools.cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@functools.cache
def live_scheduler(steps: int) -> dict[str, torch.Tensor]:
    return G.reference_scheduler(steps)


def scheduler_reference(source: str, steps: int, key: str) -> torch.Tensor:
    return live_scheduler(steps)[key] if source == "live" else stored()[f"scheduler/{steps}/{key}"]


def mochi_scheduler(steps: int) -> FlowMatchEuler:
    return FlowMatchEuler(FlowMatchConfig.from_hub(G.hub_scheduler_config()), steps, schedule="mochi")


# ---- scheduler ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.SCHEDULER_STEPS)
def test_scheduler_matches_reference(steps, source):
    """The Hub config (invert_sigmas, shift 1) given MochiPipeline's linear-quadratic sigmas: the grid the step walks
    (diffusers' scheduler.sigmas: 1 - sigma, ending in 1), the timesteps 1000 (1 - sigma), and every step() in
    float32 and on bf16 latents (upcast for the step, cast back after it, as the pipeline does)."""
    s = mochi_scheduler(steps)
    grid, timesteps = (scheduler_reference(source, steps, key) for key in ("sigmas", "timesteps"))
    assert_matches(s.noise_levels, grid, source, SCHEDULER_TOL, "sigmas")
    assert_matches(torch.tensor(s.timesteps), timesteps, source, SCHEDULER_TOL, "timesteps")
    assert_matches(1 - torch.tensor(s.sigmas), grid[:-1], source, SCHEDULER_TOL, "1 - sigmas")
    inputs = G.step_inputs(steps)
    prev = torch.stack([s.step(inputs["model_output"][i], i, inputs["sample"][i]) for i in range(steps)])
    assert_matches(prev, scheduler_reference(source, steps, "prev"), source, SCHEDULER_TOL, "prev")
    prev_bf16 = torch.stack([s.step(inputs["model_output"][i], t, inputs["sample"][i].bfloat16().float()).bfloat16()
                             for i, t in enumerate(s.timesteps)])
    assert_matches(prev_bf16, scheduler_reference(source, steps, "prev_bf16"), source, SCHEDULER_BF16_TOL, "bf16")


def test_linear_quadratic_schedule():
    """The 64-step default: the first 32 sigmas fall linearly by 0.025 / 32 from 1, the rest follow the parabola
    through (32, 1 - 0.025) that reaches sigma 0 at step 64 (one step past the last); timesteps rise from 0."""
    sigmas = linear_quadratic_sigmas(64)
    assert len(sigmas) == 64 and sigmas[0] == 1.0
    assert sigmas[:32] == pytest.approx([1 - i * 0.025 / 32 for i in range(32)], abs=1e-15)
    assert sigmas[32] == pytest.approx(1 - 0.025, abs=1e-12)
    d, a = 32 - 0.025 * 64, (32 - 0.025 * 64) / (32 * 32**2)
    b, c = 0.025 / 32 - 2 * d / 32**2, a * 32**2
    assert a * 64**2 + b * 64 + c == pytest.approx(1.0, abs=1e-12)  # the curve ends at x = 1 (sigma 0)
    assert all(x > y for x, y in zip(sigmas, sigmas[1:]))
    s = mochi_scheduler(64)
    assert s.timesteps[0] == 0.0 and s.noise_levels[-1] == 1.0 and s.sigmas[0] == 1.0
    assert all(t == pytest.approx(1000 * (1 - sigma), abs=1e-3) for t, sigma in zip(s.timesteps, s.sigmas))


def test_scheduler_refusals():
    with pytest.raises(MiniditError, match="at least 2 steps"):
        mochi_scheduler(1)
    dynamic = FlowMatchConfig.from_hub({**G.hub_scheduler_config(), "use_dynamic_shifting": True})
    with pytest.raises(MiniditError, match="no mu"):
        FlowMatchEuler(dynamic, 64, image_seq_len=1024, schedule="mochi")
