"""DDIM against diffusers' DDIMScheduler: timesteps, alphas_cumprod and one step, for DiT's Hub config with each
timestep spacing (leading is DiT's: its config has no timestep_spacing) and a variant with every other supported
switch flipped (scaled_linear betas, v-prediction, set_alpha_to_one false, steps_offset 1).

"fixture" cases compare with tests/fixtures/dit/reference.safetensors; "live" cases rebuild the reference with
the installed diffusers (skipped without it).
"""

import json
from functools import cache

import pytest
import torch
from conftest import FIXTURES, SOURCES, assert_matches, reference_generator
from safetensors import safe_open
from safetensors.torch import load_file

from minidit.errors import MiniditError
from minidit.schedulers.ddim import DDIM, DDIMConfig

G = reference_generator()
# Worst error against the fixtures (tests/measure_tolerances.py, default/avx2/avx512):
# 2.1e-7 (a step, default) x 4 -> 9e-7.
FIXTURE_TOLERANCE = 9e-7


@cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference.safetensors")


@cache
def live(case: str, steps: int) -> dict[str, torch.Tensor]:
    return G.ddim_reference(G.DDIM_CASES[case], steps, stored()["ddim/model_output"], stored()["ddim/sample"])


def reference(source: str, case: str, steps: int, key: str) -> torch.Tensor:
    if source == "fixture":
        if key in ("alphas_cumprod", "final_alpha_cumprod"):
            return stored()[f"ddim/{case}/{key}"]
        return stored()[f"ddim/{case}/N{steps}/{key}"]
    return live(case, steps)[key]


def scheduler(case: str, steps: int) -> DDIM:
    return DDIM(DDIMConfig.from_hub(G.DDIM_CASES[case]), steps)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.DDIM_STEPS)
@pytest.mark.parametrize("case", G.DDIM_CASES)
def test_timesteps(case, steps, source):
    assert scheduler(case, steps).timesteps == reference(source, case, steps, "timesteps").tolist()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.DDIM_STEPS)
@pytest.mark.parametrize("case", G.DDIM_CASES)
def test_step_at_first_and_last_timestep(case, steps, source):
    """The last step exercises the final alpha (set_alpha_to_one, or alphas_cumprod[0])."""
    ddim = scheduler(case, steps)
    model_output, x = stored()["ddim/model_output"], stored()["ddim/sample"]
    for which, t in (("prev_first", ddim.timesteps[0]), ("prev_last", ddim.timesteps[-1])):
        assert_matches(ddim.step(model_output, t, x), reference(source, case, steps, which), source, FIXTURE_TOLERANCE,
                       which)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", G.DDIM_CASES)
def test_alphas_cumprod(case, source):
    ddim = scheduler(case, 1)
    expected = reference(source, case, 1, "alphas_cumprod")
    assert ddim.alphas_cumprod.dtype == expected.dtype == torch.float32
    assert_matches(ddim.alphas_cumprod, expected, source, FIXTURE_TOLERANCE)
    assert_matches(ddim.final_alpha_cumprod.reshape(1), reference(source, case, 1, "final_alpha_cumprod"), source,
                   FIXTURE_TOLERANCE)


def test_hub_scheduler_config_defaults():
    """DiT's scheduler_config.json (byte-exact, 310 B) has no timestep_spacing: diffusers' default is leading."""
    text = (FIXTURES / "hub-xl2-256" / "scheduler" / "scheduler_config.json").read_bytes()
    assert len(text) == 310
    cfg = DDIMConfig.from_hub(json.loads(text))
    assert cfg == DDIMConfig(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                             prediction_type="epsilon", set_alpha_to_one=True, steps_offset=0,
                             timestep_spacing="leading", clip_sample=False)
    assert json.loads((FIXTURES / "single" / "scheduler" / "scheduler_config.json").read_text()) == json.loads(text)
    # leading, by hand: 50 steps of 1000 // 50 = 20, from 980 down to 0
    assert DDIM(cfg, 50).timesteps == list(range(980, -1, -20))


def test_sigmas_by_hand():
    ddim = scheduler("dit-leading", 4)
    a = ddim.alphas_cumprod.double()[ddim.timesteps]  # compared with diffusers' in test_alphas_cumprod
    assert torch.allclose(torch.tensor(ddim.sigmas, dtype=torch.float64), ((1 - a) / a).sqrt(), rtol=1e-12)


@pytest.mark.parametrize("bad, message", [
    ({"clip_sample": True}, "clip_sample"),
    ({"thresholding": True}, "thresholding"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "squaredcos_cap_v2"),
    ({"prediction_type": "sample"}, "sample"),
])
def test_unsupported_configs_are_refused(bad, message):
    with pytest.raises(MiniditError, match=message):
        DDIMConfig.from_hub({**G.SCHEDULER_CONFIG, **bad})


@pytest.mark.parametrize("steps", [0, 1001])
def test_step_count_out_of_range(steps):
    with pytest.raises(MiniditError, match="1 to 1000"):
        DDIM(DDIMConfig(), steps)


def test_unknown_spacing():
    with pytest.raises(MiniditError, match="timestep_spacing"):
        DDIM(DDIMConfig(timestep_spacing="karras"), 10)


def test_fixture_cases_match_the_generator():
    with safe_open(FIXTURES / "reference.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["reference"])
    assert meta["ddim_cases"] == G.DDIM_CASES and tuple(meta["ddim_steps"]) == G.DDIM_STEPS
    assert {1, 4, 20, 50} <= set(G.DDIM_STEPS)
