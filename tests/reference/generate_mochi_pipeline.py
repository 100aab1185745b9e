"""Reference fixtures for the Mochi pipeline tests, computed with diffusers' FlowMatchEulerDiscreteScheduler (set up
as MochiPipeline sets it up) and MochiPipeline as the oracles.

Run by hand when the reference changes (needs the reference extra):

    python tests/reference/generate_mochi_pipeline.py

It writes, under tests/fixtures/mochi_pipeline/ (the run is deterministic):

    reference.safetensors  scheduler cases: MochiPipeline's sigmas and timesteps at several step counts, and every
                           step() on its own random sample and model output, in float32 and through bf16 latents
    VERSIONS.json          the library versions that produced the expected outputs

Functions here are also used by the tests' "live" cases; diffusers is imported inside functions.
"""

import shutil
from pathlib import Path

import generator_tools as tools
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "mochi_pipeline"
REFERENCE = FIXTURES / "reference.safetensors"

SEED = 20241105
DIFFUSERS_VERSION = "0.32.0.dev0"  # what the Mochi repository's JSON files were written with

# checkpoints.md §8.3: scheduler/scheduler_config.json of genmo/mochi-1-preview (12 lines, 299 bytes)
HUB_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": True, "max_image_seq_len": 4096,
    "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
HUB_SIZES = {"scheduler": 299}

# scheduler cases: step counts (64 is MochiPipeline's default; 1 fails in the pipeline itself: N // 2 = 0)
SCHEDULER_STEPS = (2, 3, 4, 28, 64)
STEP_SHAPE = (1, 3, 2, 2, 3)  # (B, C, T, H, W)


def hub_scheduler_config() -> dict:
    return dict(HUB_SCHEDULER)


# ---- scheduler ----------------------------------------------------------------------------------------------

def make_scheduler(steps: int):
    """diffusers' scheduler from the Hub config, given MochiPipeline's sigmas as the pipeline gives them (its own
    linear_quadratic_schedule and retrieve_timesteps)."""
    diffusers = tools.quiet_diffusers()
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule, retrieve_timesteps

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in HUB_SCHEDULER.items() if not k.startswith("_")})
    sigmas = np.array(linear_quadratic_schedule(steps, 0.025))
    retrieve_timesteps(scheduler, steps, "cpu", None, sigmas)
    scheduler.set_begin_index(0)
    return scheduler


def step_inputs(steps: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + steps)
    return {"sample": torch.randn(steps, *STEP_SHAPE, generator=generator),
            "model_output": torch.randn(steps, *STEP_SHAPE, generator=generator)}


def reference_scheduler(steps: int) -> dict[str, torch.Tensor]:
    """sigmas (N + 1: the inverted grid, ending in 1), timesteps, and step() at every timestep on its own random
    sample and model output (float32), and once more as MochiPipeline steps bf16 latents: the sample upcast to
    float32 for the step, the result cast back to bf16."""
    scheduler = make_scheduler(steps)
    inputs = step_inputs(steps)
    out = {"sigmas": scheduler.sigmas.clone(), "timesteps": scheduler.timesteps.clone()}
    prev, prev_bf16 = [], []
    for i, t in enumerate(scheduler.timesteps):
        prev.append(scheduler.step(inputs["model_output"][i], t, inputs["sample"][i], return_dict=False)[0])
    scheduler = make_scheduler(steps)
    for i, t in enumerate(scheduler.timesteps):
        latents = inputs["sample"][i].bfloat16()
        x = scheduler.step(inputs["model_output"][i], t, latents.to(torch.float32), return_dict=False)[0]
        prev_bf16.append(x.to(latents.dtype))
    return out | {"prev": torch.stack(prev), "prev_bf16": torch.stack(prev_bf16)}


def main() -> None:
    import json

    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    assert len(json.dumps(HUB_SCHEDULER, indent=2, sort_keys=True)) + 1 == HUB_SIZES["scheduler"]
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)

    tensors = {}
    for steps in SCHEDULER_STEPS:
        tensors |= {f"scheduler/{steps}/{k}": v for k, v in reference_scheduler(steps).items()}

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, REFERENCE)
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", tools.versions("diffusers", "torch", "numpy", "safetensors"))
    print(f"wrote {FIXTURES} ({REFERENCE.stat().st_size / 1e3:.0f} kB reference)")


if __name__ == "__main__":
    main()
