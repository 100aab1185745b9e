"""Flow-matching Euler against diffusers' FlowMatchEulerDiscreteScheduler as StableDiffusion3Pipeline and FluxPipeline
drive it: sigmas, timesteps, mu and every step of a full loop in float32 and bfloat16, for the Hub scheduler configs
of SD3-medium, FLUX.1-dev and FLUX.1-schnell, each called both ways ("sd3" and "flux", see
generate_flow.CASES), at 1 to 56 steps and four resolutions. The model output at each step is a fixed function of
(x, t), so minidit's loop and diffusers' see the same inputs as long as they agree.

Measured (torch 2.13.0 CPU, diffusers 0.42.1): sigmas, timesteps and mu are identical to diffusers', and every
step of every loop is bit-identical (max error 0) in float32 and in bfloat16; the live cases assert exactly that,
the stored-fixture cases allow float32 (and one bf16) rounding for fixtures made on another machine.

"fixture" cases compare with tests/fixtures/flow/reference.safetensors; "live" cases rebuild the reference with
the installed diffusers (skipped without it).
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
from minidit.schedulers.flow import PRESETS, FlowMatchConfig, FlowMatchEuler, image_seq_len, training_sigma_range

G = reference_generator("generate_flow")
# max |error| / max(1, max |expected|) against the stored fixtures: the worst (tests/measure_tolerances.py,
# default/avx2/avx512) is 0 in both dtypes (elementwise float ops only), so the tolerance is two float32 ulps
# and one bfloat16 ulp at |x| = 1.
FIXTURE_TOLERANCE = {"float32": 2 * 2**-23, "bfloat16": 2**-7}
DYNAMIC_CASES = [case for case in G.CASES if G.dynamic(case)]
LOOPS = [(case, res) for case in G.CASES for res in G.loop_resolutions(case)]
SD3 = "sd3-medium@sd3"


@cache
def stored() -> dict[str, torch.Tensor]:
    return load_file(G.REFERENCE)


@cache
def live(case: str, resolution: str, steps: int) -> dict[str, torch.Tensor]:
    return G.flow_reference(case, resolution, steps, stored()["inputs/sample"], stored()["inputs/noise"])


def reference(source: str, case: str, resolution: str, steps: int, key: str) -> torch.Tensor:
    if source == "live":
        return live(case, resolution, steps)[key]
    return stored()[f"{case}/{resolution}/mu" if key == "mu" else f"{case}/{resolution}/N{steps}/{key}"]


@cache
def hub_config(config: str) -> FlowMatchConfig:
    """The config as minidit reads it from the stored Hub file."""
    return FlowMatchConfig.from_hub(json.loads(G.config_file(config).read_text()))


def scheduler(case: str, resolution: str, steps: int) -> FlowMatchEuler:
    config, schedule = G.CASES[case]
    return FlowMatchEuler(hub_config(config), steps, image_seq_len=image_seq_len(*G.RESOLUTIONS[resolution]),
                          schedule=schedule)


def model_fn(x: torch.Tensor, t: float) -> torch.Tensor:
    return G.velocity(x, t, stored()["inputs/noise"].to(x.dtype))


def run_loop(fm: FlowMatchEuler, expected: torch.Tensor, source: str, dtype: str) -> None:
    x = stored()["inputs/sample"].to(G.DTYPES[dtype])
    assert len(fm.timesteps) == len(expected) == fm.num_steps
    for i, t in enumerate(fm.timesteps):
        x = fm.step(model_fn(x, t), i, x)
        assert x.dtype == G.DTYPES[dtype]
        assert_matches(x, expected[i], source, FIXTURE_TOLERANCE[dtype], (i, t))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", G.STEPS)
@pytest.mark.parametrize("resolution", G.RESOLUTIONS)
@pytest.mark.parametrize("case", G.CASES)
def test_sigmas_and_timesteps(case, resolution, steps, source):
    """`sigmas` is diffusers' `scheduler.sigmas[:-1]`, `noise_levels` all of it (ending in 0), `timesteps` its
    `scheduler.timesteps`; configs without dynamic shifting give the same at every resolution, as diffusers does."""
    fm = scheduler(case, resolution, steps)
    sigmas, timesteps = (reference(source, case, resolution, steps, key) for key in ("sigmas", "timesteps"))
    assert sigmas.dtype == timesteps.dtype == torch.float32
    assert_matches(fm.noise_levels, sigmas, source, FIXTURE_TOLERANCE["float32"])
    assert_matches(torch.tensor(fm.sigmas, dtype=torch.float32), sigmas[:-1], source, FIXTURE_TOLERANCE["float32"])
    assert_matches(torch.tensor(fm.timesteps, dtype=torch.float32), timesteps, source, FIXTURE_TOLERANCE["float32"])
    if source == "live":
        assert fm.timesteps == timesteps.tolist() and fm.sigmas == sigmas[:-1].tolist()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("resolution", G.RESOLUTIONS)
@pytest.mark.parametrize("case", DYNAMIC_CASES)
def test_mu_equals_the_pipelines(case, resolution, source):
    """flux_mu(image_seq_len) is the mu both pipelines compute with calculate_shift for a dynamic-shift config."""
    assert scheduler(case, resolution, 4).mu == reference(source, case, resolution, 4, "mu").item()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("config", G.CONFIGS)
def test_training_sigma_range(config, source):
    """The shifted (or, with dynamic shifting, unshifted) training grid's ends: where "sd3" spacing starts and ends."""
    expected = G.sigma_range(config) if source == "live" else stored()[f"{config}/sigma_range"]
    assert training_sigma_range(hub_config(config)) == tuple(expected.tolist())


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype", G.DTYPES)
@pytest.mark.parametrize("steps", G.STEPS)
@pytest.mark.parametrize("case, resolution", LOOPS)
def test_every_step_of_the_loop(case, resolution, steps, dtype, source):
    run_loop(scheduler(case, resolution, steps), reference(source, case, resolution, steps, f"samples_{dtype}"),
             source, dtype)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype", G.DTYPES)
@pytest.mark.parametrize("steps", G.STEPS)
@pytest.mark.parametrize("resolution", G.RESOLUTIONS)
def test_flux_sampled_with_sd3_schedule(resolution, steps, dtype, source):
    """`--model flux --scheduler sd3`: SD3-medium's config with the "sd3" schedule, given FLUX's image token count,
    is StableDiffusion3Pipeline's schedule and loop (which ignore the size for this config)."""
    fm = FlowMatchEuler(PRESETS["stabilityai/stable-diffusion-3-medium-diffusers"], steps,
                        image_seq_len=image_seq_len(*G.RESOLUTIONS[resolution]), schedule="sd3")
    assert_matches(fm.noise_levels, reference(source, SD3, resolution, steps, "sigmas"), source,
                   FIXTURE_TOLERANCE["float32"])
    loop_resolution = resolution if source == "live" else G.DEFAULT_RESOLUTION
    run_loop(fm, reference(source, SD3, loop_resolution, steps, f"samples_{dtype}"), source, dtype)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype", G.DTYPES)
@pytest.mark.parametrize("case, resolution", [("sd3-medium@sd3", "1024x1024"), ("flux-dev@flux", "1024x1536"),
                                              ("flux-schnell@flux", "1024x1024")])
def test_sample_and_steps_by_timestep(case, resolution, dtype, source):
    """`sample` ends where diffusers' loop ends, also when run twice; `step` takes the timestep value as well as the
    index."""
    steps = 28
    fm, expected = scheduler(case, resolution, steps), reference(source, case, resolution, steps, f"samples_{dtype}")
    start = stored()["inputs/sample"].to(G.DTYPES[dtype])
    for run in range(2):
        assert_matches(fm.sample(model_fn, start), expected[-1], source, FIXTURE_TOLERANCE[dtype], run)
    x = start
    for i, t in enumerate(fm.timesteps):
        x = fm.step(model_fn(x, t), t, x)
        assert x.dtype == G.DTYPES[dtype]
        assert_matches(x, expected[i], source, FIXTURE_TOLERANCE[dtype], (i, t))


@pytest.mark.parametrize("config", G.CONFIGS)
def test_hub_config_files(config):
    """The stored Hub scheduler configs: diffusers' serialisation, the expected byte sizes, and minidit's presets."""
    text = G.config_file(config).read_bytes()
    assert len(text) == G.HUB_CONFIG_BYTES[config]
    assert text.decode() == G.config_json(G.CONFIGS[config])
    assert hub_config(config) == PRESETS[G.REPOS[config]]


@LIVE
@pytest.mark.parametrize("config", G.CONFIGS)
def test_config_fields_equal_diffusers(config):
    """Every FlowMatchConfig field, absent keys included (SD3's file has no base_shift etc.), has diffusers' value."""
    diffusers_config = G._scheduler(G.CONFIGS[config]).config
    assert asdict(hub_config(config)) == {k: diffusers_config[k] for k in asdict(FlowMatchConfig())}


@pytest.mark.parametrize("bad, message", [
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"shift_terminal": 0.1}, "shift_terminal"),
    ({"stochastic_sampling": True}, "stochastic_sampling"),
    ({"time_shift_type": "linear"}, "time_shift_type"),
    ({"shift": 0.0}, "shift > 0"),
    ({"use_dynamic_shifting": True, "max_image_seq_len": 256}, "max_image_seq_len"),
])
def test_unsupported_configs_are_refused(bad, message):
    with pytest.raises(MiniditError, match=message):
        FlowMatchConfig.from_hub({**G.CONFIGS["flux-dev"], **bad})


@pytest.mark.parametrize("off", [{"shift_terminal": None}, {"shift_terminal": 0.0}, {"time_shift_type": "exponential"},
                                 {"invert_sigmas": False}, {"some_future_key": 1}])
def test_switched_off_and_unknown_keys_are_accepted(off):
    assert FlowMatchConfig.from_hub({**G.CONFIGS["flux-dev"], **off}) == PRESETS["black-forest-labs/FLUX.1-dev"]


@pytest.mark.parametrize("steps", [0, -1])
def test_step_count_below_one(steps):
    with pytest.raises(MiniditError, match="at least 1 step"):
        FlowMatchEuler(PRESETS["stabilityai/stable-diffusion-3-medium-diffusers"], steps)


@pytest.mark.parametrize("schedule", ["sd3", "flux"])
@pytest.mark.parametrize("seq_len", [None, 0])
def test_dynamic_shifting_needs_the_image_size(schedule, seq_len):
    with pytest.raises(MiniditError, match="image_seq_len"):
        FlowMatchEuler(PRESETS["black-forest-labs/FLUX.1-dev"], 28, image_seq_len=seq_len, schedule=schedule)


def test_unknown_schedule():
    with pytest.raises(MiniditError, match="unknown flow-matching schedule 'karras'"):
        FlowMatchEuler(PRESETS["black-forest-labs/FLUX.1-schnell"], 4, schedule="karras")


def test_step_refuses_a_timestep_or_index_not_in_the_schedule():
    fm, x = scheduler("flux-schnell@flux", "1024x1024", 4), stored()["inputs/sample"]
    with pytest.raises(MiniditError, match="not exactly one of this schedule's timesteps"):
        fm.step(x, fm.timesteps[0] - 0.5, x)
    with pytest.raises(MiniditError, match="out of range 0..3"):
        fm.step(x, 4, x)


def test_fixture_cases_match_the_generator():
    with safe_open(G.REFERENCE, "pt") as f:
        meta = json.loads(f.metadata()["reference"])
    assert meta["configs"] == G.CONFIGS and tuple(meta["steps"]) == G.STEPS
    assert meta["cases"] == {k: list(v) for k, v in G.CASES.items()}
    assert meta["resolutions"] == {k: list(v) for k, v in G.RESOLUTIONS.items()}
