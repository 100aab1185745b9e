"""DDIM (Song et al., 2021), deterministic (eta = 0), as configured by the Hub's `scheduler_config.json`.

Matches diffusers' DDIMScheduler for the settings DiT and Latte ship: linear or scaled-linear betas,
"leading" / "trailing" / "linspace" timestep spacing, epsilon or v prediction, `set_alpha_to_one`.
All arithmetic stays in float32 tensors, in the reference's order, so results agree to the bit.
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

from minidit.errors import MiniditError


@dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    clip_sample: bool = False

    @classmethod
    def from_hub(cls, config: dict) -> "DDIMConfig":
        cfg = cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})
        if cfg.clip_sample or config.get("thresholding") or config.get("trained_betas") is not None:
            raise MiniditError("DDIM with clip_sample, thresholding or trained_betas is not supported by minidit")
        if (cfg.beta_schedule not in ("linear", "scaled_linear")
                or cfg.prediction_type not in ("epsilon", "v_prediction")):
            raise MiniditError(f"DDIM beta_schedule={cfg.beta_schedule!r} / prediction_type={cfg.prediction_type!r} "
                               f"is not supported by minidit")
        return cfg


def spaced_timesteps(num_train_timesteps: int, spacing: str, steps_offset: int, num_steps: int) -> list[int]:
    """The `num_steps` timesteps of diffusers' "leading", "trailing" and "linspace" spacings, first to last."""
    n = num_train_timesteps
    if spacing == "leading":
        ts = (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise MiniditError(f"unknown timestep_spacing {spacing!r}")
    return [int(t) for t in ts]


class DDIM:
    name = "ddim"

    def __init__(self, cfg: DDIMConfig, num_steps: int):
        if num_steps < 1 or num_steps > cfg.num_train_timesteps:
            raise MiniditError(f"DDIM needs 1 to {cfg.num_train_timesteps} steps, got {num_steps}")
        self.cfg, self.num_steps = cfg, num_steps
        n = cfg.num_train_timesteps
        if cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
        else:
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = spaced_timesteps(cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset, num_steps)
        self.step_ratio = n // num_steps

    @property
    def sigmas(self) -> list[float]:
        """The noise level sqrt((1 - a_t) / a_t) of each timestep, for the run manifest."""
        a = self.alphas_cumprod[self.timesteps].double()
        return ((1 - a) / a).sqrt().tolist()

    def step(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        prev_t = t - self.step_ratio
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = 1 - alpha_t
        if self.cfg.prediction_type == "epsilon":
            x0 = (x - beta_t**0.5 * model_output) / alpha_t**0.5
            eps = model_output
        else:  # v-prediction
            x0 = alpha_t**0.5 * x - beta_t**0.5 * model_output
            eps = alpha_t**0.5 * model_output + beta_t**0.5 * x
        return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps

    def sample(self, model_fn, x: torch.Tensor) -> torch.Tensor:
        """Run the loop: `model_fn(x, t)` returns the model output for integer timestep t."""
        for t in self.timesteps:
            x = self.step(model_fn(x, t), t, x)
        return x
