"""Reference fixtures for the flow-matching Euler tests, computed with diffusers' FlowMatchEulerDiscreteScheduler as
the oracle, called the way StableDiffusion3Pipeline and FluxPipeline call it.

Run by hand when the reference changes (needs the reference extra: diffusers, transformers):

    python tests/reference/generate_flow.py

It writes, under tests/fixtures/flow/ (the run is deterministic):

    stable-diffusion-3-medium-diffusers/scheduler/scheduler_config.json   the Hub repositories' scheduler configs,
    FLUX.1-dev/scheduler/scheduler_config.json                            serialised as diffusers' `save_config`
    FLUX.1-schnell/scheduler/scheduler_config.json                        writes them (sizes: HUB_CONFIG_BYTES)
    reference.safetensors   the loop's inputs and, for each case of CASES, resolution of RESOLUTIONS and step
                            count N of STEPS:
        inputs/sample                        SHAPE  float32, the starting sample, seeded
        inputs/noise                         SHAPE  float32, the fixed tensor inside the stand-in model, seeded
        {config}/sigma_range                 (2,)   float64, the scheduler's (sigma_max, sigma_min) after init
        {case}/{res}/mu                      (1,)   float64, the mu the pipeline passes (dynamic-shift configs only)
        {case}/{res}/N{N}/sigmas             (N + 1,) float32, `scheduler.sigmas` (ending in 0)
        {case}/{res}/N{N}/timesteps          (N,)   float32, `scheduler.timesteps`
        {case}/{res}/N{N}/samples_{dtype}    (N, *SHAPE) float32 / bfloat16: every `scheduler.step(...)` output of
                                             one full loop from inputs/sample cast to dtype, the model output at
                                             each step being `velocity(x, t, noise)`; only at the resolutions of
                                             `loop_resolutions(case)` (one for the configs that ignore the size)
                            its metadata holds CONFIGS, CASES, STEPS and RESOLUTIONS
    VERSIONS.json           the library versions that produced the expected outputs

A case is "<config>@<schedule>": one of the three Hub scheduler configs, called as StableDiffusion3Pipeline calls
it ("sd3": `set_timesteps(N)`, plus mu from the latent size when the config shifts dynamically) or as FluxPipeline
does ("flux": `sigmas=linspace(1, 1/N, N)` and mu from `calculate_shift`). The pipelines' own pairs are
sd3-medium@sd3, flux-dev@flux and flux-schnell@flux; the other three are the cross combinations of
`analyze.py --scheduler` (minidit/schedulers/flow.py's docstring): FLUX sampled with SD3's schedule is
sd3-medium@sd3 run on FLUX's latents.

Functions here are also used by the tests' "live" cases; diffusers is imported inside the functions that need it.
"""

import json
import math
import warnings
from pathlib import Path

import generator_tools as tools
import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "flow"
REFERENCE = FIXTURES / "reference.safetensors"

SEED = 20240601
SHAPE = (2, 4, 3, 5)  # (B, C, H, W), non-square
STEPS = (1, 4, 14, 28, 56)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (height, width) in pixels; the image token count is (H/16)(W/16): 256, 1024, 4096 (= max_image_seq_len), 6144
RESOLUTIONS = {"256x256": (256, 256), "512x512": (512, 512), "1024x1024": (1024, 1024), "1024x1536": (1024, 1536)}
DEFAULT_RESOLUTION = "1024x1024"

# the Hub repositories' scheduler/scheduler_config.json, key for key (checkpoints.md §3.1, §4.3)
CONFIGS = {
    "sd3-medium": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
                   "num_train_timesteps": 1000, "shift": 3.0},
    "flux-dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                 "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    "flux-schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                     "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
}
REPOS = {"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
         "flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"}
# serialised sizes. flux-dev: 273 B, as checkpoints.md §4.3 states. sd3-medium (a 6-line file, §3.1) and
# flux-schnell: checkpoints.md gives no size; these are the sizes of the reconstructions above
HUB_CONFIG_BYTES = {"sd3-medium": 141, "flux-dev": 273, "flux-schnell": 274}
CASES = {f"{config}@{schedule}": (config, schedule)
         for config in CONFIGS for schedule in ("sd3", "flux")}

# the stand-in model: half the input (so the loop's own state matters) plus a fixed tensor whose weight varies
# smoothly with t, so every step's velocity differs
INPUT_WEIGHT = 0.5
NOISE_PERIOD = 300.0


def velocity(x: torch.Tensor, t: float, noise: torch.Tensor) -> torch.Tensor:
    """The stand-in model output at timestep t (= 1000 sigma), in x's dtype (`noise` must already be in it)."""
    return INPUT_WEIGHT * x + math.cos(t / NOISE_PERIOD) * noise


def config_json(config: dict) -> str:
    """Serialised the way diffusers writes config files (and so the way the Hub files are)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def config_file(config: str) -> Path:
    return FIXTURES / REPOS[config].split("/")[1] / "scheduler" / "scheduler_config.json"


def image_seq_len(resolution: str) -> int:
    height, width = RESOLUTIONS[resolution]
    return (height // 16) * (width // 16)  # FLUX: 2x2-packed tokens of the /8 latent; SD3: its 2x2 patches


def dynamic(case: str) -> bool:
    return bool(CONFIGS[CASES[case][0]].get("use_dynamic_shifting", False))


def loop_resolutions(case: str) -> list[str]:
    """Where the full loop is stored: every resolution when the config shifts by resolution, else one."""
    return list(RESOLUTIONS) if dynamic(case) else [DEFAULT_RESOLUTION]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The starting sample and the stand-in model's fixed noise."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _scheduler(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.utils import logging

    logging.set_verbosity_error()
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def pipeline_schedule(case: str, steps: int, seq_len: int):
    """A fresh scheduler on which the pipeline of the case's schedule has set the timesteps (its step 5,
    "Prepare timesteps", with diffusers' own calculate_shift and retrieve_timesteps); returns (scheduler, mu)."""
    config, schedule = CASES[case]
    scheduler = _scheduler(CONFIGS[config])
    get = scheduler.config.get
    with warnings.catch_warnings():  # numpy 2's `__array__` copy-keyword notice from inside diffusers
        warnings.simplefilter("ignore", DeprecationWarning)
        if schedule == "flux":  # FluxPipeline.__call__
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

            sigmas = np.linspace(1.0, 1 / steps, steps)
            mu = calculate_shift(seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                                 get("base_shift", 0.5), get("max_shift", 1.15))
            retrieve_timesteps(scheduler, steps, None, sigmas=sigmas, mu=mu)
            scheduler.set_begin_index(0)
            mu = mu if get("use_dynamic_shifting") else None  # computed and passed, but unused without it
        else:  # StableDiffusion3Pipeline.__call__
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
                calculate_shift,
                retrieve_timesteps,
            )

            kwargs = {}
            if get("use_dynamic_shifting", None):
                kwargs["mu"] = calculate_shift(seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                                               get("base_shift", 0.5), get("max_shift", 1.16))
            retrieve_timesteps(scheduler, steps, None, sigmas=None, **kwargs)
            mu = kwargs.get("mu")
    return scheduler, mu


def flow_reference(case: str, resolution: str, steps: int, sample: torch.Tensor, noise: torch.Tensor,
                   loops: bool = True) -> dict[str, torch.Tensor]:
    """The case's schedule at this resolution and (with `loops`) every step of a full loop in each dtype."""
    scheduler, mu = pipeline_schedule(case, steps, image_seq_len(resolution))
    out = {"sigmas": scheduler.sigmas.clone(), "timesteps": scheduler.timesteps.clone()}
    if mu is not None:
        out["mu"] = torch.tensor([mu], dtype=torch.float64)
    for name, dtype in DTYPES.items() if loops else ():
        scheduler, _ = pipeline_schedule(case, steps, image_seq_len(resolution))
        x, n, samples = sample.to(dtype), noise.to(dtype), []
        for t in scheduler.timesteps:
            x = scheduler.step(velocity(x, float(t), n), t, x, return_dict=False)[0]
            samples.append(x)
        out[f"samples_{name}"] = torch.stack(samples)
    return out


def sigma_range(config: str) -> torch.Tensor:
    """The scheduler's (sigma_max, sigma_min) after init: the training grid's ends, shifted unless dynamic."""
    scheduler = _scheduler(CONFIGS[config])
    return torch.tensor([scheduler.sigma_max, scheduler.sigma_min], dtype=torch.float64)


def main() -> None:
    from safetensors.torch import save_file

    FIXTURES.mkdir(parents=True, exist_ok=True)
    for config in CONFIGS:
        path = config_file(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_json(CONFIGS[config]))
        print(f"{path.relative_to(FIXTURES)}: {path.stat().st_size} B")
        assert path.stat().st_size == HUB_CONFIG_BYTES[config], (config, path.stat().st_size)

    sample, noise = inputs()
    ref = {"inputs/sample": sample, "inputs/noise": noise}
    ref.update({f"{config}/sigma_range": sigma_range(config) for config in CONFIGS})
    for case in CASES:
        for resolution in RESOLUTIONS:
            for steps in STEPS:
                out = flow_reference(case, resolution, steps, sample, noise,
                                     loops=resolution in loop_resolutions(case))
                if not dynamic(case):  # the size must not matter: compare with the first resolution's
                    first = ref.get(f"{case}/{next(iter(RESOLUTIONS))}/N{steps}/sigmas", out["sigmas"])
                    assert torch.equal(first, out["sigmas"]), (case, resolution, steps)
                for key, value in out.items():
                    assert torch.isfinite(value).all(), (case, resolution, steps, key)
                    ref[f"{case}/{resolution}/mu" if key == "mu" else f"{case}/{resolution}/N{steps}/{key}"] = value

    # one metadata entry: safetensors writes several in hash order, which would make the file non-deterministic
    metadata = {"configs": CONFIGS, "cases": CASES, "steps": STEPS, "resolutions": RESOLUTIONS}
    save_file({k: v.contiguous() for k, v in sorted(ref.items())}, REFERENCE,
              metadata={"reference": json.dumps(metadata, sort_keys=True)})
    versions = tools.versions("diffusers", "transformers", "torch", "numpy", "safetensors")
    tools.write_json(FIXTURES / "VERSIONS.json", versions)
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
