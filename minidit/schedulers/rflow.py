"""RFlow: Open-Sora 1.2's rectified-flow sampler (hpcaitech/Open-Sora v1.2.0, `opensora/schedulers/rf/__init__.py`
and `rectified_flow.py`, as `RFLOW.sample` runs it for text-to-video).

The noisy sample at time t in [0, 1000] is x_t = (1 - t/1000) x0 + (t/1000) eps, and STDiT3 predicts the velocity
v = x0 - eps (its first 4 output channels). Sampling is Euler from t = 1000 towards 0:

    t_i = (1 - i/N) 1000,  i = 0 .. N-1               (floats; t_N = 0)
    t_i <- transform(t_i)                             (use_timestep_transform, on in v1.2.0's inference config)
    x <- x + v(x, t_i) (t_i - t_{i+1}) / 1000         (the last step goes to 0: + v t_{N-1} / 1000)

The transform shifts the steps towards high noise for large videos, with tau = t/1000:
    r = sqrt(height width / 512^2) sqrt(F),  F = 1 for an image (num_frames 1), else num_frames // 17 * 5
    tau' = r tau / (1 + (r - 1) tau),  t' = 1000 tau'
height and width are the video's pixel size and num_frames its pixel frame count (51 -> F = 15, the latent frames
of Open-Sora's VAE, which turns every 17 frames into 5).
NOTE(official): F is 0 for 2 to 16 frames, which makes every transformed timestep 0 (the first one 0/0 = NaN): the
official sampler then returns its noise unchanged (or NaN). minidit refuses such a frame count.
NOTE(official): scripts/inference.py builds height, width and num_frames in the run's dtype (bf16 in v1.2.0's config),
so r is computed in bf16 there; `dtype` reproduces that (r in bf16, the rest in float32, as torch promotes).

Classifier-free guidance is the recipe's: the batch [cond; uncond] (the learned null caption, see
models/opensora.py), pred = model(...)[:, :4], v = v_u + g (v_c - v_u); each step's model input is x itself.
Numerics follow the official code operation by operation in float32 torch, so timesteps and steps agree to the bit.
"""

from dataclasses import dataclass

import torch

from minidit.errors import MiniditError
from minidit.schedulers.flow import step_index

BASE_RESOLUTION = 512 * 512  # pixels at which the transform's space ratio is 1
FRAMES_PER_CHUNK, LATENT_FRAMES_PER_CHUNK = 17, 5  # NOTE(official): the VAE's temporal reduction, hard-coded


@dataclass(frozen=True)
class RFlowConfig:
    """RFLOW's settings in v1.2.0's inference config; the defaults of `configs/opensora-v1-2/inference/sample.py`."""

    num_timesteps: int = 1000
    use_timestep_transform: bool = True
    use_discrete_timesteps: bool = False  # round each t_i to an integer before the transform


def timestep_transform(t: torch.Tensor, height: torch.Tensor, width: torch.Tensor, num_frames: torch.Tensor,
                       num_timesteps: int = 1000) -> torch.Tensor:
    """The official transform of timesteps t (B,) in [0, num_timesteps] for videos of height x width pixels and
    num_frames frames, each (B,); in the official order of operations (its dtypes follow torch's promotion)."""
    tau = t / num_timesteps
    ratio_space = (height * width / BASE_RESOLUTION).sqrt()
    if num_frames[0] == 1:
        frames = torch.ones_like(num_frames)
    else:
        frames = num_frames // FRAMES_PER_CHUNK * LATENT_FRAMES_PER_CHUNK
    ratio = ratio_space * frames.sqrt()
    return ratio * tau / (1 + (ratio - 1) * tau) * num_timesteps


class RFlow:
    name = "rflow"

    def __init__(self, num_steps: int, *, height: int, width: int, num_frames: int,
                 cfg: RFlowConfig = RFlowConfig(), dtype: torch.dtype = torch.float32):
        """height, width: the video's pixel size; num_frames: its pixel frame count (1 for an image); `dtype`: the
        dtype scripts/inference.py gives these sizes (the run's dtype, see the module docstring)."""
        if num_steps < 1:
            raise MiniditError(f"RFlow needs at least 1 step, got {num_steps}")
        if min(height, width, num_frames) < 1:
            raise MiniditError(f"RFlow needs a positive size and frame count, got {height}x{width}, {num_frames}")
        if cfg.use_timestep_transform and 1 < num_frames < FRAMES_PER_CHUNK:
            raise MiniditError(f"RFlow's timestep transform gives {num_frames} frames a time ratio of 0 (frames // 17 "
                               f"* 5 latent frames), so every step would be at t = 0: use 1 frame or at least 17")
        self.cfg, self.num_steps = cfg, num_steps
        n = cfg.num_timesteps
        grid = [(1.0 - i / num_steps) * n for i in range(num_steps)]  # Python floats, as the official list
        if cfg.use_discrete_timesteps:
            grid = [float(round(t)) for t in grid]
        t = torch.tensor(grid)  # float32, each as torch.tensor([t] * B) holds it
        if cfg.use_timestep_transform:
            size = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
            t = timestep_transform(t, size(height), size(width), size(num_frames), n)
        self._timesteps = t.float()
        self.noise_levels = torch.cat([self._timesteps, torch.zeros(1)]) / n  # (N + 1,) float32 sigmas, ending in 0

    @property
    def timesteps(self) -> list[float]:
        """t_0 .. t_{N-1} after the transform (float32 values as Python floats): what the model is fed."""
        return self._timesteps.tolist()

    @property
    def sigmas(self) -> list[float]:
        """t_i / 1000: the noise fraction of x at each step."""
        return self.noise_levels[:-1].tolist()

    def step(self, model_output: torch.Tensor, t_index_or_t, x: torch.Tensor) -> torch.Tensor:
        """One Euler step from t_i to t_{i+1} (0 after the last): x + v (t_i - t_{i+1}) / 1000. model_output is the
        guided velocity (B, C, T, H, W); i is given as an int, or as the timestep t_i (a float)."""
        i = step_index(self.timesteps, t_index_or_t, "RFlow")
        t_next = self._timesteps[i + 1] if i + 1 < self.num_steps else None
        dt = (self._timesteps[i] if t_next is None else self._timesteps[i] - t_next) / self.cfg.num_timesteps
        # NOTE(official): the velocity is float32 (STDiT3 returns float32), so x becomes float32 after a step
        return x + model_output * dt.to(model_output.device)

    def sample(self, model_fn, x: torch.Tensor) -> torch.Tensor:
        """Run the loop: `model_fn(x, t)` returns the (guided) velocity for timestep t (a float)."""
        for i, t in enumerate(self.timesteps):
            x = self.step(model_fn(x, t), i, x)
        return x
