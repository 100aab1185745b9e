"""DPM-Solver++ multistep (Lu et al., 2022, arXiv:2211.01095), deterministic, as configured by the Hub's
`scheduler_config.json`; PixArt-alpha ships it as "2M": second order, midpoint.

Matches diffusers' DPMSolverMultistepScheduler for algorithm_type "dpmsolver++" with solver_order 1 or 2,
solver_type "midpoint" or "heun", linear or scaled-linear betas, epsilon or v prediction, "linspace" / "leading" /
"trailing" timestep spacing, lower_order_final, euler_at_final and final_sigmas_type "zero" or "sigma_min".
Every other diffusers option (thresholding, Karras / Lu / exponential / beta / flow sigmas, the SDE variants,
trained betas, ...) is refused with a MiniditError.

Notation. With a_t = alphas_cumprod[t] the noisy sample is x_t = alpha_t x0 + sigma_t eps, alpha_t = sqrt(a_t),
sigma_t = sqrt(1 - a_t). The schedule is kept as the noise-to-signal ratio s_t = sigma_t / alpha_t =
sqrt((1 - a_t) / a_t) of each timestep (diffusers calls these `sigmas`; DDIM's `sigmas` are the same quantity),
followed by one final level that the last step lands on: 0 ("zero": the last step returns the data prediction) or
s at t = 0 ("sigma_min"). The solver steps in lambda = log(alpha / sigma), half the log-SNR. Each step turns the
model output into a data prediction x0 and moves from level s to the next level s' (h = lambda' - lambda):

    first order (= DDIM):  x' = (sigma' / sigma) x - alpha' (exp(-h) - 1) x0
    second order, midpoint: the same with x0 -> x0 + D1 / 2,   D1 = (x0 - x0_prev) / r,   r = (lambda - lambda_prev) / h
    second order, heun:     the first-order step, plus alpha' ((exp(-h) - 1) / h + 1) D1

where x0_prev is the previous step's data prediction: the solver keeps it between calls to `step`.
Scalars are float32 0-dim tensors computed one at a time, in the reference's order, so results agree to the bit.
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from minidit.errors import MiniditError

# the values each config field may take in minidit
SUPPORTED = {
    "beta_schedule": ("linear", "scaled_linear"),
    "prediction_type": ("epsilon", "v_prediction"),
    "solver_order": (1, 2),
    "solver_type": ("midpoint", "heun"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
}
# diffusers options minidit does not implement, with the value (diffusers' default) that turns each one off
TURNED_OFF = {
    "algorithm_type": "dpmsolver++",
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "rescale_betas_zero_snr": False,
    "trained_betas": None,
    "variance_type": None,
    "lambda_min_clipped": -math.inf,
}
# NOTE(official): with lower_order_final, diffusers' last step is first order only for runs shorter than this
LOWER_ORDER_FINAL_BELOW = 15


@dataclass(frozen=True)
class DPMSolverConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        for name, allowed in SUPPORTED.items():
            if getattr(self, name) not in allowed:
                raise MiniditError(f"DPM-Solver with {name}={getattr(self, name)!r} is not supported by minidit "
                                   f"(supported: {', '.join(map(repr, allowed))})")

    @classmethod
    def from_hub(cls, config: dict) -> "DPMSolverConfig":
        """From a diffusers `scheduler_config.json`: absent keys take diffusers' defaults, unknown keys are ignored."""
        for name, off in TURNED_OFF.items():
            if config.get(name, off) != off:
                raise MiniditError(f"DPM-Solver with {name}={config[name]!r} is not supported by minidit "
                                   f"(it implements {name}={off!r} only)")
        return cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})


def alpha_sigma_lambda(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha, sigma and lambda = log(alpha / sigma) from the noise-to-signal ratio s = sigma / alpha."""
    alpha = 1 / ((s**2 + 1) ** 0.5)  # alpha^2 + sigma^2 = 1
    sigma = s * alpha
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


class DPMSolver:
    name = "dpm-solver++"

    def __init__(self, cfg: DPMSolverConfig, num_steps: int):
        n = cfg.num_train_timesteps
        if num_steps < 1 or num_steps > n:
            raise MiniditError(f"DPM-Solver needs 1 to {n} steps, got {num_steps}")
        self.cfg, self.num_steps = cfg, num_steps
        self.timesteps = self._spacing(cfg, num_steps)
        # diffusers' rounding can repeat a timestep (linspace, 1000 steps: the multistep update then divides by a
        # zero step) or leave 0..n-1 (trailing, 61 steps: an extra t = -1)
        if len(set(self.timesteps)) < len(self.timesteps) or not 0 <= min(self.timesteps) <= max(self.timesteps) < n:
            raise MiniditError(f"DPM-Solver with {cfg.timestep_spacing} spacing and {num_steps} steps gives repeated "
                               f"or out-of-range timesteps (t={self.timesteps[0]} to {self.timesteps[-1]}, allowed "
                               f"0 to {n - 1}); use another step count")
        if cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
        else:
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        ratios = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # s_t for every training timestep
        final = ratios[0] if cfg.final_sigmas_type == "sigma_min" else torch.tensor(0.0, dtype=torch.float32)
        self.noise_levels = torch.cat([ratios[self.timesteps], final.reshape(1)])  # (len(timesteps) + 1,) float32
        self.reset()

    @staticmethod
    def _spacing(cfg: DPMSolverConfig, num_steps: int) -> list[int]:
        n = cfg.num_train_timesteps
        # NOTE(official): linspace and leading place num_steps + 1 points and drop the last one, unlike DDIM's
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = n // (num_steps + 1)
            ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        else:  # trailing
            ts = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
        return [int(t) for t in ts]

    @property
    def sigmas(self) -> list[float]:
        """The noise level sqrt((1 - a_t) / a_t) of each timestep, for the run manifest: the float32 values the solver
        uses (diffusers' `scheduler.sigmas[:-1]`). DDIM's are the same quantity computed in float64 from the same
        float32 alphas_cumprod; the two agree to float32 rounding."""
        return self.noise_levels[:-1].tolist()

    def reset(self) -> None:
        """Forget the previous step: call before a new sampling run (`sample` does)."""
        self.index, self.x0_prev = 0, None

    def step(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """One step from timestep t = self.timesteps[self.index] to the next noise level. Steps must come in order."""
        i, steps = self.index, len(self.timesteps)
        if i >= steps or int(t) != self.timesteps[i]:
            expected = f"t={self.timesteps[i]}" if i < steps else "no further step"
            raise MiniditError(f"DPM-Solver is a multistep method: call step() on its timesteps in order (step {i}: "
                               f"expected {expected}, got t={int(t)}); call reset() to start a new run")
        alpha, sigma, lam = alpha_sigma_lambda(self.noise_levels[i])
        if self.cfg.prediction_type == "epsilon":
            x0 = (x - sigma * model_output) / alpha
        else:  # v-prediction
            x0 = alpha * x - sigma * model_output

        last = i == steps - 1
        # NOTE(official): final_sigmas_type "zero" alone makes the last step first order, whatever the other flags
        first_order = (self.cfg.solver_order == 1 or self.x0_prev is None
                       or (last and (self.cfg.euler_at_final or self.cfg.final_sigmas_type == "zero"
                                     or (self.cfg.lower_order_final and steps < LOWER_ORDER_FINAL_BELOW))))
        alpha_next, sigma_next, lam_next = alpha_sigma_lambda(self.noise_levels[i + 1])
        h = lam_next - lam
        phi = alpha_next * (torch.exp(-h) - 1.0)
        x = x.float()  # NOTE(official): the update runs in float32 whatever the input dtype
        if first_order:
            x_next = (sigma_next / sigma) * x - phi * x0
        else:
            _, _, lam_prev = alpha_sigma_lambda(self.noise_levels[i - 1])
            r = (lam - lam_prev) / h
            d1 = (1.0 / r) * (x0 - self.x0_prev)
            if self.cfg.solver_type == "midpoint":
                x_next = (sigma_next / sigma) * x - phi * x0 - 0.5 * phi * d1
            else:  # heun
                x_next = (sigma_next / sigma) * x - phi * x0 + (alpha_next * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        self.index, self.x0_prev = i + 1, x0
        return x_next.to(x0.dtype)

    def sample(self, model_fn, x: torch.Tensor) -> torch.Tensor:
        """Run the loop from the start: `model_fn(x, t)` returns the model output for integer timestep t."""
        self.reset()
        for t in self.timesteps:
            x = self.step(model_fn(x, t), t, x)
        return x
