"""Text-to-video sampling for CogVideoX-5b and -2b: prompt -> T5 -> CogVideoX DDIM loop with guidance -> latents.

Follows diffusers' CogVideoXPipeline, which is how the Hub checkpoints are used:
- the prompt is used as given; T5 tokens: `</s>` appended, padded to 226, run **without** the attention mask; the
  unconditional branch is the T5 encoding of "" (negative prompt); the batch is [uncond; cond];
- frames: 49 by default (the transformer config's sample_frames), 4k + 1 for the 3D VAE's 4x temporal compression:
  (F - 1) / 4 + 1 latent frames; 480x720 by default, multiples of 16 (8x VAE, 2x2 patches);
- the noise is drawn as (1, latent frames, 16, H/8, W/8) from a CPU generator, in the latents' dtype;
- every step: the integer timestep for the whole batch, the model output cast to float32, guidance
  v_u + g (v_c - v_u) in float32, the scheduler step, the latents cast back to their dtype;
- `--dynamic-cfg` (the pipeline's use_dynamic_cfg, off by default): the guidance scale changes with the step
  (`dynamic_guidance`); CogVideoX's model card recommends it with its DPM scheduler.

CogVideoX's 3D VAE is not implemented yet: runs keep the final latents (--save-latents), and only the VAE's
config.json is read (its compression factors). T5-XXL (4.8B parameters) is released after `prepare(prompts)`.
"""

import math
from pathlib import Path

import numpy as np
import torch

from minidit import weights
from minidit.attention import AttentionLayer
from minidit.errors import MiniditError
from minidit.models.cogvideox import CogVideoXTransformer, load_cogvideox
from minidit.pipelines import recipe
from minidit.schedulers.cogvideox_ddim import CogVideoXDDIM, CogVideoXDDIMConfig
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer

DEFAULT_T5_LENGTH = 226  # CogVideoXPipeline's max_sequence_length


def dynamic_guidance(guidance: float, t: int, num_steps: int) -> float:
    """The pipeline's use_dynamic_cfg: 1 + g (1 - cos(pi ((N - t) / N)^5)) / 2.

    NOTE(official): t is the DDIM timestep (999 ... 0), not the step index, so ((N - t) / N)^5 is a large negative
    number for most steps and the scale oscillates between 1 and 1 + g rather than rising smoothly.
    """
    return 1 + guidance * ((1 - math.cos(math.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2)


class CogVideoXRecipe:
    """CogVideoX-5b / -2b for the analysis: a Hub-layout folder -> tokenizer, T5, transformer, scheduler."""

    name = "CogVideoX"
    options = ("height", "width", "frames", "max_sequence_length", "dynamic_cfg")
    schedulers = ("ddim",)  # the repositories' CogVideoXDDIMScheduler
    default_scheduler = "ddim"
    default_steps = 50  # CogVideoXPipeline's num_inference_steps
    default_guidance = 6.0  # CogVideoXPipeline's guidance_scale
    decodes = False  # the 3D VAE is not implemented yet

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, frames: int | None = None, max_sequence_length: int | None = None,
                 dynamic_cfg: bool | None = None):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.model: CogVideoXTransformer = load_cogvideox(folder / "transformer", dtype=dtype, device=device)
        cfg = self.model.config
        self.scheduler_config = CogVideoXDDIMConfig.from_hub(
            weights.read_json(folder / "scheduler" / "scheduler_config.json"))
        vae = weights.read_json(folder / "vae" / "config.json")
        self.vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)  # 8
        self.vae_temporal = vae.get("temporal_compression_ratio", 4)
        self.tokenizer = T5Tokenizer(folder / "tokenizer")
        self.text_encoder = load_t5(folder / "text_encoder", dtype=recipe.t5_dtype(dtype), device=device)
        self.frames = recipe.video_frames(frames, cfg.sample_frames, self.vae_temporal, self.name)
        height = cfg.sample_height * self.vae_scale if height is None else height  # 480 x 720 by default
        width = cfg.sample_width * self.vae_scale if width is None else width
        self.resolution = recipe.image_size(height, width, 0, self.vae_scale * cfg.patch_size, self.name)
        self.max_sequence_length = recipe.text_length(max_sequence_length, DEFAULT_T5_LENGTH, None, self.name)
        if not cfg.use_rotary_positional_embeddings and self.max_sequence_length != cfg.max_text_seq_length:
            raise MiniditError(f"--max-sequence-length must be {cfg.max_text_seq_length} for this CogVideoX (2b): its "
                               f"position table has exactly that many text rows, got {self.max_sequence_length}")
        self.dynamic_cfg = bool(dynamic_cfg)
        self.embeddings: dict[str, tuple[torch.Tensor]] = {}  # prompt -> T5 states (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    default_prompts, parse_prompt = recipe.video_prompts, recipe.as_given  # VIDEO_PROMPTS; any text, as given
    batch_key = recipe.same_batch  # every prompt's text has the same length (padded)

    prepare = recipe.prepare_t5  # every prompt and "" encoded once, then T5 released

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor]:
        """T5 states (1, Lt, 4096) in the backbone's dtype."""
        ids, _ = self.tokenizer([text], self.max_sequence_length)
        return (self.text_encoder(ids.to(self.device)).to(self.dtype),)  # NOTE(official): no attention mask

    def encode(self, text: str) -> tuple[torch.Tensor]:
        return recipe.from_cache(self.embeddings, text, self.device, self._encode, self.text_encoder is None)

    # ---- sampling ----------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, steps: int) -> CogVideoXDDIM:
        return CogVideoXDDIM(self.scheduler_config, steps)

    branches = recipe.uncond_cond  # [uncond; cond] with guidance

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers()

    def manifest_fields(self) -> dict:
        return {"resolution": list(self.resolution), "frames": self.frames,
                "max_sequence_length": self.max_sequence_length, "dynamic_cfg": self.dynamic_cfg}

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, scheduler: CogVideoXDDIM, guidance: float) -> torch.Tensor:
        """Final latents (P, (F - 1) / 4 + 1, 16, H / 8, W / 8) for F frames at H x W, from the noise of `seed`."""
        latent_frames = (self.frames - 1) // self.vae_temporal + 1
        h, w = (side // self.vae_scale for side in self.resolution)
        noise = recipe.prompt_noise(len(prompts), (latent_frames, self.model.config.in_channels, h, w), seed,
                                    self.dtype, self.device)
        (text,) = recipe.text_batch(self.encode, prompts, guidance)  # [uncond; cond] with guidance
        steps = len(scheduler.timesteps)

        def velocity(x: torch.Tensor, t: int) -> torch.Tensor:
            batch = torch.cat([x, x]) if guidance > 1 else x
            timestep = torch.full((len(batch),), t, dtype=torch.int64, device=self.device)
            v = self.model(batch, text, timestep).float()  # NOTE(official): guidance and step in float32
            if guidance <= 1:
                return v
            uncond, cond = v.chunk(2)
            return recipe.guided(uncond, cond, dynamic_guidance(guidance, t, steps) if self.dynamic_cfg else guidance)

        return scheduler.sample(velocity, noise)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        raise MiniditError("CogVideoX's 3D VAE (AutoencoderKLCogVideoX) is not implemented in minidit yet (a later "
                           "issue), so it cannot write images or videos: run with --save-latents instead of "
                           "--save-images to keep the final latents")
