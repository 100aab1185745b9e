"""CogVideoX's DDIM (eta = 0), as configured by the CogVideoX repositories' `scheduler_config.json`.

Matches diffusers' CogVideoXDDIMScheduler, which differs from plain DDIM (ddim.py) in four places:
- scaled-linear betas are computed in float64, so the whole alpha table is float64;
- an SNR shift: alpha_bar <- alpha_bar / (s + (1 - s) alpha_bar), i.e. SNR / s (2b: s = 3.0; 5b: 1.0, no shift);
- `rescale_betas_zero_snr`: sqrt(alpha_bar) moved and stretched so that it ends at exactly 0 (Lin et al.,
  https://arxiv.org/abs/2305.08891), so the first of the "trailing" timesteps, 999, is pure noise;
- the update is written as x_prev = a_t x + b_t x0, with a_t = sqrt((1 - alpha_prev) / (1 - alpha_t)) and
  b_t = sqrt(alpha_prev) - sqrt(alpha_t) a_t, which equals DDIM's sqrt(alpha_prev) x0 + sqrt(1 - alpha_prev) eps
  but rounds differently.
Every operation is the reference's, in its order and dtypes, so results agree to the bit.
"""

import math
from dataclasses import dataclass, fields

import torch

from minidit.errors import MiniditError
from minidit.schedulers.ddim import spaced_timesteps


@dataclass(frozen=True)
class CogVideoXDDIMConfig:
    # Defaults are those of diffusers' CogVideoXDDIMScheduler, applied to keys a config file lacks.
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0

    @classmethod
    def from_hub(cls, config: dict) -> "CogVideoXDDIMConfig":
        """Build from a Hub `scheduler/scheduler_config.json`. Its clip_sample and thresholding keys are ignored, as
        the reference's step() ignores them."""
        cfg = cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})
        if config.get("trained_betas") is not None or cfg.beta_schedule not in ("linear", "scaled_linear"):
            raise MiniditError(f"CogVideoX DDIM with beta_schedule={cfg.beta_schedule!r} or trained_betas is not "
                               f"supported by minidit")
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise MiniditError(f"CogVideoX DDIM prediction_type={cfg.prediction_type!r} is not supported by minidit")
        if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise MiniditError(f"unknown timestep_spacing {cfg.timestep_spacing!r}")
        return cfg


def snr_shift(alphas_cumprod: torch.Tensor, scale: float) -> torch.Tensor:
    """alpha_bar / (s + (1 - s) alpha_bar): the signal-to-noise ratio alpha_bar / (1 - alpha_bar) divided by s."""
    return alphas_cumprod / (scale + (1 - scale) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sqrt(alpha_bar) shifted to end at 0 and scaled to keep its start (Lin et al. 2023, Algorithm 1)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


class CogVideoXDDIM:
    name = "ddim"
    init_noise_sigma = 1.0  # the initial noise is used as drawn

    def __init__(self, cfg: CogVideoXDDIMConfig, num_steps: int):
        if num_steps < 1 or num_steps > cfg.num_train_timesteps:
            raise MiniditError(f"DDIM needs 1 to {cfg.num_train_timesteps} steps, got {num_steps}")
        self.cfg, self.num_steps = cfg, num_steps
        n = cfg.num_train_timesteps
        if cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
        else:  # NOTE(official): float64 here, unlike DDIMScheduler's float32
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
        alphas_cumprod = snr_shift(torch.cumprod(1.0 - betas, dim=0), cfg.snr_shift_scale)
        if cfg.rescale_betas_zero_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else alphas_cumprod[0]
        self.timesteps = spaced_timesteps(cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset, num_steps)

    @property
    def sigmas(self) -> list[float]:
        """The noise level sqrt((1 - a_t) / a_t) of each timestep, for the run manifest (inf where a_t = 0: the
        first trailing timestep under the zero-terminal-SNR rescale)."""
        a = self.alphas_cumprod[self.timesteps].double()
        return [math.inf if v == 0 else math.sqrt((1 - v) / v) for v in a.tolist()]

    def step(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        prev_t = t - self.cfg.num_train_timesteps // self.num_steps
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = 1 - alpha_t
        if self.cfg.prediction_type == "epsilon":
            x0 = (x - beta_t**0.5 * model_output) / alpha_t**0.5
        else:  # v-prediction
            x0 = alpha_t**0.5 * x - beta_t**0.5 * model_output
        a_t = ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5
        b_t = alpha_prev**0.5 - alpha_t**0.5 * a_t
        return a_t * x + b_t * x0

    def sample(self, model_fn, x: torch.Tensor) -> torch.Tensor:
        """Run the loop: `model_fn(x, t)` returns the model output for integer timestep t.

        NOTE(official): the pipeline steps with a float32 model output and casts the result back to the latents'
        dtype after every step.
        """
        x = x * self.init_noise_sigma
        for t in self.timesteps:
            x = self.step(model_fn(x, t), t, x).to(x.dtype)
        return x
