"""Text-to-video sampling for Latte-1: prompt -> T5 -> DDIM loop with guidance -> video latents -> SD VAE per frame.

Follows diffusers' LattePipeline, which is how the Hub checkpoint is used:
- the prompt is lower-cased and stripped (the pipeline's `clean_caption=True` path needs bs4 and ftfy and
  falls back to exactly this without them; minidit does not implement caption cleaning);
- T5 tokens: `</s>` appended, padded to 120, run with the attention mask; the unconditional branch is the T5
  encoding of "" (padded to the same 120 tokens); the batch is [uncond; cond];
- `mask_feature`: the transformer gets no text mask. Instead the prompt's T5 states are cut to its real tokens
  (the first sum(mask) of them), and the states of "" to the same length (so its first token is `</s>` and the
  rest are T5's outputs at padding positions);
- the initial noise is drawn as (1, 4, T, H/8, W/8) from a CPU generator; 16 frames at 512x512 by default;
- guidance on the epsilon channels, the learned-variance channels dropped before the DDIM step;
- decoding: each frame through the 2D SD VAE, 14 frames at a time, latents multiplied by 1 / scaling_factor.
NOTE(official): the Hub's `scheduler_config.json` (the 421-byte version) says `variance_type: learned_range`, which
makes diffusers' LattePipeline keep all 8 channels and fail in DDIMScheduler.step; the variance channels are dropped
here, as the pipeline does for any other variance_type (DDIM ignores it otherwise).

T5-XXL is the largest part (4.8B parameters): `prepare(prompts)` encodes every prompt of a run once, then releases
the encoder, so only the 1B transformer and the VAE stay on the accelerator.
"""

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from minidit import weights
from minidit.attention import AttentionLayer
from minidit.errors import MiniditError
from minidit.models.latte import Latte, load_latte
from minidit.pipelines import recipe
from minidit.schedulers.ddim import DDIM, DDIMConfig
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer
from minidit.vae.autoencoder_kl import load_vae, to_uint8

DEFAULT_T5_LENGTH = 120  # LattePipeline's max_length (hard-coded there)
DEFAULT_SIZE = 512  # LattePipeline's height and width
DECODE_CHUNK_SIZE = 14  # frames per VAE call, LattePipeline's decode_chunk_size


def mask_feature(cond: tuple[torch.Tensor, torch.Tensor], uncond: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LattePipeline's `mask_feature` for a batch of one: the prompt's T5 states (1, Lt, 4096) cut to its sum(mask)
    real tokens, and the negative prompt's states (if any) cut to the same length."""
    keep = int(cond[1].sum())
    return cond[0][:, :keep], None if uncond is None else uncond[0][:, :keep]


class LatteRecipe:
    """Latte-1 for the analysis: a Hub-layout folder -> tokenizer, T5, backbone, DDIM, VAE."""

    name = "Latte-1"
    options = ("height", "width", "frames", "max_sequence_length", "cross_attention")
    schedulers = ("ddim",)
    default_scheduler = "ddim"
    default_steps = 50  # LattePipeline's num_inference_steps
    default_guidance = 7.5  # LattePipeline's guidance_scale
    decodes = True

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, frames: int | None = None, max_sequence_length: int | None = None,
                 cross_attention: bool = False):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.model: Latte = load_latte(folder / "transformer", dtype=dtype, device=device)
        self.cross_attention = cross_attention
        self.scheduler_config = DDIMConfig.from_hub(weights.read_json(folder / "scheduler" / "scheduler_config.json"))
        self.tokenizer = T5Tokenizer(folder / "tokenizer")
        self.text_encoder = load_t5(folder / "text_encoder", dtype=recipe.t5_dtype(dtype), device=device)
        self.vae = load_vae(folder / "vae", dtype=dtype, device=device)
        self.vae_scale = recipe.latent_scale(self.vae)
        self.max_sequence_length = recipe.text_length(max_sequence_length, DEFAULT_T5_LENGTH, None, self.name)
        self.resolution = recipe.image_size(height, width, DEFAULT_SIZE, self.vae_scale * self.model.config.patch_size,
                                            self.name)
        video_length = self.model.config.video_length
        self.frames = video_length if frames is None else frames
        if self.frames not in (1, video_length):
            raise MiniditError(f"--frames must be {video_length} (a video: the length of {self.name}'s temporal "
                               f"position table) or 1 (an image), got {self.frames}")
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> T5 states, mask (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    default_prompts, parse_prompt = recipe.text_prompts, recipe.as_given  # TEXT_PROMPTS; any text, as given

    prepare = recipe.prepare_t5  # every prompt and "" encoded once, then T5 released

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states (1, Lt, 4096) in the backbone's dtype and the attention mask (1, Lt), Lt = max_sequence_length."""
        return recipe.t5_with_mask(self.tokenizer, self.text_encoder, text, self.max_sequence_length, self.dtype,
                                   self.device)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        return recipe.from_cache(self.embeddings, text, self.device, self._encode, self.text_encoder is None)

    def batch_key(self, prompt: str) -> int:
        """The prompt's T5 length after `mask_feature`: only prompts of one length share a batch (cutting the states
        of a batch of one to its real tokens is what the model saw in LattePipeline; padding them back would not be)."""
        return int(self.encode(prompt)[1].sum())

    def text(self, prompts: list[str], guidance: float) -> torch.Tensor:
        """The transformer's text input: [uncond; cond] T5 states with guidance, each prompt's cut by `mask_feature`
        (prompts of one `batch_key`). Not recipe.text_batch: the negative prompt's length depends on the prompt's."""
        negative = self.encode(recipe.NEGATIVE_PROMPT) if guidance > 1 else None
        cut = [mask_feature(self.encode(p), negative) for p in prompts]
        cond = torch.cat([states for states, _ in cut])
        if negative is None:
            return cond
        uncond = torch.cat([states for _, states in cut])
        return torch.cat([uncond, cond])

    # ---- sampling ----------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, steps: int) -> DDIM:
        return DDIM(self.scheduler_config, steps)

    branches = recipe.uncond_cond  # [uncond; cond] with guidance

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers(cross=self.cross_attention)

    def manifest_fields(self) -> dict:
        return {"resolution": list(self.resolution), "frames": self.frames,
                "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, scheduler: DDIM, guidance: float) -> torch.Tensor:
        """Final latents (P, 4, T, h / 8, w / 8) of the videos, from the noise of `seed`."""
        channels = self.model.config.in_channels
        h, w = (side // self.vae_scale for side in self.resolution)
        noise = recipe.prompt_noise(len(prompts), (channels, self.frames, h, w), seed, self.dtype, self.device)
        text = self.text(prompts, guidance)

        def epsilon(x: torch.Tensor, t: int) -> torch.Tensor:
            timesteps = torch.full((len(x),), t, device=self.device)
            return self.model(x, timesteps, text)[:, :channels]  # learned sigma dropped

        return scheduler.sample(recipe.with_guidance(epsilon, guidance), noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 (B, T, H, W, 3) videos: every frame through the SD VAE."""
        # NOTE(official): LattePipeline multiplies by 1 / scaling_factor (the VAE's own decode divides: 1 ulp apart)
        z = rearrange(latents, "B C T H W -> (B T) C H W") * (1 / self.vae.config.scaling_factor)
        z = z.to(self.vae.decoder.conv_in.weight.dtype)
        frames = torch.cat([self.vae(chunk) for chunk in z.split(DECODE_CHUNK_SIZE)])  # (B T, 3, H, W)
        return rearrange(to_uint8(frames), "(B T) H W C -> B T H W C", B=len(latents))
