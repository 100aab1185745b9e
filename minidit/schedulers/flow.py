"""Flow-matching Euler (rectified flow), as diffusers' FlowMatchEulerDiscreteScheduler is driven by the
StableDiffusion3Pipeline (SD3), the FluxPipeline (FLUX.1 dev and schnell) and the MochiPipeline (Mochi 1 preview).

The noisy sample is x_sigma = (1 - sigma) x0 + sigma eps, sigma from 1 (pure noise) to 0 (data); the model predicts
the velocity v = eps - x0, and sampling is Euler on dx/dsigma = v over a decreasing list of noise levels
sigma_0 > ... > sigma_{N-1} > sigma_N = 0:

    x <- x + (sigma_{i+1} - sigma_i) v(x, t_i),    t_i = 1000 sigma_i (a float, `timesteps`)

The two shifts, both pushing the steps towards high noise:
    shift_sigma(sigma, s) = s sigma / (1 + (s - 1) sigma)            fixed shift s (SD3: 3.0; schnell: 1.0 = none)
    time_shift(mu, sigma) = e^mu / (e^mu + (1 / sigma - 1))          resolution-dependent (FLUX.1-dev), with
    mu = flux_mu(L): linear in the image token count L = (H/16)(W/16), 0.5 at 256 tokens, 1.15 at 4096 (1024^2)
The config's `use_dynamic_shifting` picks time_shift (mu from L), otherwise shift_sigma with `shift`.

Two ways of calling the scheduler (`schedule`), chosen independently of the config:
  "sd3"  what StableDiffusion3Pipeline gets from `set_timesteps(N)`:
         1. the training grid sigma_k = k / 1000, k = 1000..1, is shifted once with shift_sigma (not with
            dynamic shifting), giving sigma_max = 1 and sigma_min = shift_sigma(0.001, 3) = 0.002994 for SD3;
         2. N points evenly spaced from sigma_max to sigma_min (in float64) are shifted (again): with SD3's config
            the low end is shifted twice, so the last sigma is shift_sigma(0.002994, 3) = 0.008929, not 0.002994.
            With dynamic shifting, step 1 is skipped (sigma_min = 0.001) and step 2 applies time_shift(mu); the SD3
            pipeline then computes mu from its own latent size, as FLUX's does.
  "flux" what FluxPipeline passes: sigmas = linspace(1, 1/N, N) in float32 (BFL's `get_schedule` grid
         linspace(1, 0, N + 1) without its final 0), then time_shift(mu) with dynamic shifting (dev) or
         shift_sigma with `shift` otherwise (schnell: shift 1, so sigma = linspace(1, 1/N, N)).
Both append sigma_N = 0 and keep the sigmas in float32; `timesteps` = 1000 sigma in float32.

What `analyze.py --scheduler` means for each model (config from PRESETS, or the repository's own file):

    --model        --scheduler sd3                                  --scheduler flux
    sd3            SD3-medium's config, "sd3": StableDiffusion3-    FLUX.1-dev's config, "flux": SD3 sampled with
                   Pipeline (the default)                           FluxPipeline's schedule (mu from the size)
    flux (dev)     SD3-medium's config, "sd3": FLUX sampled with    FLUX.1-dev's own config, "flux": FluxPipeline
                   SD3's schedule (shift 3.0, no dynamic shift)     (the default)
    flux-schnell   SD3-medium's config, "sd3"                       schnell's own config (shift 1.0), "flux":
                                                                    FluxPipeline (the default)

A third way, for Mochi 1 preview:
  "mochi" what MochiPipeline passes: sigmas = `linear_quadratic_sigmas(N, 0.025)` (genmo's schedule, in float64, then
         float32), shifted with `shift` (Mochi's config: 1.0, so unchanged); no dynamic shifting (the pipeline passes
         no mu). Half the steps (N // 2) walk linearly from sigma 1 down to 1 - 0.025, the rest follow a parabola
         in the step index that continues from there and would reach sigma 0 at i = N (the appended end), so most
         steps are spent at high noise: with x = 1 - sigma, M = N // 2 and delta = 0.025,
             x_i = i delta / M                           for i < M
             x_i = a i^2 + b i + c                       for i >= M,  d = M - delta N, Q = N - M,
             a = d / (M Q^2), b = delta / M - 2 d / Q^2, c = a M^2
The config switch `invert_sigmas` (Mochi's config has it on; diffusers says only Mochi needs it) inverts the grid
after the shift: the scheduler walks s = 1 - sigma upwards from 0 and appends 1, not 0, and hands out
t = 1000 s = 1000 (1 - sigma). NOTE(official): Mochi's model takes t = 0 at pure noise, and its output is the
velocity towards the data (x0 - eps), so the same Euler line x <- x + (s_{i+1} - s_i) v moves towards the data.
`sigmas` stays the true noise level (1 at the start), for the manifest; `noise_levels` is the grid the step walks.

The scheduler only hands out t; what the model is fed is the pipeline's business. NOTE(official):
StableDiffusion3Pipeline passes t as float32; FluxPipeline casts t to the latents' dtype and divides by 1000 (so in
bf16 the FLUX model sees bf16-rounded timesteps), and the FLUX model multiplies by 1000 again.

Numerics follow diffusers 0.42.1 operation by operation (float64 numpy for the "sd3" grid, float32 numpy for the
"flux" grid, float32 torch for the step), so sigmas, timesteps and every step agree to the bit. Refused with a
MiniditError: Karras / exponential / beta sigmas, shift_terminal, the "linear" time shift, stochastic sampling.
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from minidit.errors import MiniditError

SCHEDULES = ("sd3", "flux", "mochi")
MOCHI_THRESHOLD = 0.025  # MochiPipeline's threshold_noise: x = 1 - sigma where the linear part of its schedule ends
PIXELS_PER_TOKEN = 16  # the VAE's 8x downsampling, then 2x2 patches (SD3) or 2x2 packing (FLUX)
# diffusers options minidit does not implement, with the value (diffusers' default) that turns each one off
TURNED_OFF = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
}


@dataclass(frozen=True)
class FlowMatchConfig:
    """FlowMatchEulerDiscreteScheduler's settings; the defaults are diffusers' (absent keys of a Hub file)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False  # walk 1 - sigma (Mochi): see the module docstring

    def __post_init__(self):
        if self.num_train_timesteps < 1 or self.shift <= 0:
            raise MiniditError(f"flow-matching config needs num_train_timesteps >= 1 and shift > 0, got "
                               f"{self.num_train_timesteps} and {self.shift}")
        if self.use_dynamic_shifting and self.max_image_seq_len == self.base_image_seq_len:
            raise MiniditError("flow-matching dynamic shifting needs max_image_seq_len != base_image_seq_len "
                               f"(both are {self.base_image_seq_len})")

    @classmethod
    def from_hub(cls, config: dict) -> "FlowMatchConfig":
        """From a diffusers `scheduler_config.json`: absent keys take diffusers' defaults, unknown keys are ignored."""
        for name, off in TURNED_OFF.items():
            value = config.get(name, off)
            # NOTE(official): diffusers tests shift_terminal and the sigma switches for truth, not identity
            switched_on = value != off if isinstance(off, str) else bool(value)
            if switched_on:
                raise MiniditError(f"flow-matching Euler with {name}={value!r} is not supported by minidit "
                                   f"(it implements {name}={off!r} only)")
        return cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})


# the Hub repositories' scheduler configs (tests/fixtures/flow holds the files themselves)
PRESETS = {
    "stabilityai/stable-diffusion-3-medium-diffusers": FlowMatchConfig(shift=3.0),
    "black-forest-labs/FLUX.1-dev": FlowMatchConfig(shift=3.0, use_dynamic_shifting=True),  # shift unused
    "black-forest-labs/FLUX.1-schnell": FlowMatchConfig(shift=1.0),
}


def shift_sigma(sigma, shift: float):
    """SD3's fixed shift; works on floats, numpy arrays and tensors, in their own precision."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def time_shift(mu: float, sigma):
    """FLUX's resolution-dependent shift (diffusers' "exponential" time shift, power 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def flux_mu(image_seq_len: int, cfg: FlowMatchConfig) -> float:
    """mu on the line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), extrapolated
    beyond; written as slope and intercept, in the reference's order of operations."""
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * slope + (cfg.base_shift - slope * cfg.base_image_seq_len)


def linear_quadratic_sigmas(num_steps: int, threshold: float = MOCHI_THRESHOLD) -> list[float]:
    """Mochi's N sigmas from 1 down (Python floats): linear in x = 1 - sigma for N // 2 steps up to `threshold`, then
    quadratic (formulas in the module docstring), in the reference's order of operations."""
    linear = num_steps // 2
    quadratic = num_steps - linear
    d = linear - threshold * num_steps
    a = d / (linear * quadratic**2)
    b = threshold / linear - 2 * d / quadratic**2
    c = a * linear**2
    x = [i * threshold / linear for i in range(linear)] + [a * i**2 + b * i + c for i in range(linear, num_steps)]
    return [1.0 - xi for xi in x]


def image_seq_len(height: int, width: int) -> int:
    """The number of image tokens of an H x W (pixels) image, for SD3 and FLUX alike."""
    return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)


def training_sigma_range(cfg: FlowMatchConfig) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the training grid k / n, k = n..1, shifted unless the shift is dynamic (float32)."""
    grid = torch.arange(cfg.num_train_timesteps, 0, -1, dtype=torch.float32) / cfg.num_train_timesteps
    if not cfg.use_dynamic_shifting:
        grid = shift_sigma(grid, cfg.shift)
    return grid[0].item(), grid[-1].item()


def step_index(timesteps: list[float], t_index_or_t, sampler: str) -> int:
    """The step a scheduler's step() is asked for: an int index, or the float timestep itself (exactly one of
    `timesteps`, as a pipeline that loops over them passes it)."""
    if isinstance(t_index_or_t, int):
        if not 0 <= t_index_or_t < len(timesteps):
            raise MiniditError(f"{sampler} step index {t_index_or_t} is out of range 0..{len(timesteps) - 1}")
        return t_index_or_t
    hits = [i for i, t in enumerate(timesteps) if t == float(t_index_or_t)]
    if len(hits) != 1:
        raise MiniditError(f"timestep {float(t_index_or_t)!r} is not exactly one of this schedule's timesteps; "
                           f"pass one of `timesteps` or the step index (an int)")
    return hits[0]


class FlowMatchEuler:
    name = "flow-euler"

    def __init__(self, cfg: FlowMatchConfig, num_steps: int, *, image_seq_len: int | None = None,
                 schedule: str = "sd3"):
        """`image_seq_len` = (H/16)(W/16) is needed only with dynamic shifting (it sets mu); `schedule` is "sd3" or
        "flux" (the module docstring says what each does)."""
        if num_steps < 1:
            raise MiniditError(f"flow-matching Euler needs at least 1 step, got {num_steps}")
        if schedule not in SCHEDULES:
            raise MiniditError(f"unknown flow-matching schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
        if schedule == "mochi" and num_steps < 2:  # NOTE(official): MochiPipeline divides by N // 2
            raise MiniditError(f"Mochi's linear-quadratic schedule needs at least 2 steps, got {num_steps}")
        if schedule == "mochi" and cfg.use_dynamic_shifting:
            raise MiniditError("Mochi's schedule has no resolution-dependent shift (MochiPipeline passes no mu): "
                               "use a scheduler config with use_dynamic_shifting false")
        self.cfg, self.num_steps, self.schedule = cfg, num_steps, schedule
        self.mu = None
        if cfg.use_dynamic_shifting:
            if image_seq_len is None or image_seq_len < 1:
                raise MiniditError("this flow-matching config shifts by resolution (use_dynamic_shifting): pass "
                                   f"image_seq_len = (H/16)*(W/16) >= 1, got {image_seq_len}")
            self.mu = flux_mu(image_seq_len, cfg)

        n = cfg.num_train_timesteps
        if schedule == "sd3":
            sigma_max, sigma_min = training_sigma_range(cfg)
            base = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n  # float64
        elif schedule == "flux":
            base = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
        else:
            base = np.array(linear_quadratic_sigmas(num_steps)).astype(np.float32)
        shifted = time_shift(self.mu, base) if cfg.use_dynamic_shifting else shift_sigma(base, cfg.shift)
        self._sigmas = torch.from_numpy(shifted).to(torch.float32)
        if cfg.invert_sigmas:  # Mochi: walk s = 1 - sigma from 0 up to an appended 1
            grid, end = 1.0 - self._sigmas, torch.ones(1)
        else:
            grid, end = self._sigmas, torch.zeros(1)
        self._timesteps = grid * n  # float32, what diffusers' scheduler.timesteps holds
        self.noise_levels = torch.cat([grid, end])  # (N + 1,) float32: diffusers' scheduler.sigmas

    @property
    def sigmas(self) -> list[float]:
        """The noise levels sigma_0 .. sigma_{N-1} (1 = pure noise; without the final 0), float32 values as Python
        floats (with invert_sigmas too: the levels before the inversion)."""
        return self._sigmas.tolist()

    @property
    def timesteps(self) -> list[float]:
        """t_i = 1000 sigma_i (with invert_sigmas: 1000 (1 - sigma_i)), the float32 values as Python floats."""
        return self._timesteps.tolist()

    def step(self, model_output: torch.Tensor, t_index_or_t, x: torch.Tensor) -> torch.Tensor:
        """One Euler step from sigma_i to sigma_{i+1}: i is given as an int, or as the timestep t_i (a float)."""
        i = step_index(self.timesteps, t_index_or_t, "flow-matching")
        dt = self.noise_levels[i + 1] - self.noise_levels[i]  # float32, negative (with invert_sigmas: positive)
        # NOTE(official): the sample is upcast to float32, dt * v stays in v's dtype, the sum is cast back to v's
        return (x.to(torch.float32) + dt * model_output).to(model_output.dtype)

    def sample(self, model_fn, x: torch.Tensor) -> torch.Tensor:
        """Run the loop: `model_fn(x, t)` returns the velocity for timestep t = 1000 sigma (a float)."""
        for i, t in enumerate(self.timesteps):
            x = self.step(model_fn(x, t), i, x)
        return x
