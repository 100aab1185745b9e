"""Text-to-image sampling for PixArt-α: prompt -> T5 -> DPM-Solver++ loop with guidance -> latents -> SD VAE.

Follows diffusers' PixArtAlphaPipeline, which is how the Hub checkpoints are used:
- the prompt is lower-cased and stripped (the pipeline's `clean_caption=True` path needs bs4 and ftfy and
  falls back to exactly this without them; minidit does not implement caption cleaning);
- T5 tokens: `</s>` appended, padded to 120, run with the attention mask; the unconditional branch is the
  T5 encoding of "" (not the original code's learned null caption); the batch is [uncond; cond];
- the requested size is mapped to the nearest of 33 aspect-ratio buckets; the 1024 model also receives the
  bucket's [height, width] and height / width as micro-conditions; the decoded image is resized and
  centre-cropped back to the requested size;
- guidance on the epsilon channels, the learned-variance channels dropped before the scheduler step.

T5-XXL is the largest part (4.8B parameters, 9.5 GB in bf16): `prepare(prompts)` encodes every prompt of a
run once, then releases the encoder, so only the 0.6B transformer and the VAE stay on the accelerator.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minidit import weights
from minidit.attention import AttentionLayer
from minidit.models.pixart import PixArt, load_pixart
from minidit.pipelines import recipe
from minidit.schedulers.ddim import DDIM, DDIMConfig
from minidit.schedulers.dpm_solver import DPMSolver, DPMSolverConfig
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer
from minidit.vae.autoencoder_kl import load_vae, to_uint8

# Aspect-ratio buckets of the 1024 model, "height / width" -> [height, width] in pixels (diffusers'
# ASPECT_RATIO_1024_BIN). The 512 and 256 models use the same buckets scaled by 1/2 and 1/4.
ASPECT_RATIO_BINS_1024 = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}
BINNED_SAMPLE_SIZES = (128, 64, 32)  # the latent sizes diffusers has buckets for (1024, 512 and 256 px)
DEFAULT_T5_LENGTH = 120  # PixArtAlphaPipeline's max_sequence_length


def bucket(height: int, width: int, sample_size: int) -> tuple[int, int]:
    """The bucket diffusers maps a requested size to: the one whose height / width is nearest."""
    scale = sample_size / 128  # the tables are for latents of 128 (1024 px), 64 (512 px) and 32 (256 px)
    ratio = height / width
    nearest = min(ASPECT_RATIO_BINS_1024, key=lambda r: abs(float(r) - ratio))
    h, w = ASPECT_RATIO_BINS_1024[nearest]
    return int(h * scale), int(w * scale)


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (B, 3, h, w) images to cover (height, width), then crop the centre, as the diffusers pipeline does."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    images = F.interpolate(images, size=(int(h * ratio), int(w * ratio)), mode="bilinear", align_corners=False)
    top, left = (images.shape[-2] - height) // 2, (images.shape[-1] - width) // 2
    return images[..., top:top + height, left:left + width]


class PixArtRecipe:
    """PixArt-α for the analysis: a Hub-layout folder -> tokenizer, T5, backbone, scheduler, VAE."""

    name = "PixArt-α"
    options = ("height", "width", "max_sequence_length", "cross_attention")
    schedulers = ("dpm-solver++", "ddim")
    default_scheduler = "dpm-solver++"
    default_steps = 20  # PixArtAlphaPipeline's num_inference_steps
    default_guidance = 4.5  # PixArtAlphaPipeline's guidance_scale
    decodes = True

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, max_sequence_length: int | None = None, cross_attention: bool = False):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.model: PixArt = load_pixart(folder / "transformer", dtype=dtype, device=device)
        self.cross_attention = cross_attention
        self.scheduler_config = weights.read_json(folder / "scheduler" / "scheduler_config.json")
        self.tokenizer = T5Tokenizer(folder / "tokenizer")
        self.text_encoder = load_t5(folder / "text_encoder", dtype=recipe.t5_dtype(dtype), device=device)
        self.vae = load_vae(folder / "vae", dtype=dtype, device=device)
        self.vae_scale = recipe.latent_scale(self.vae)
        self.max_sequence_length = recipe.text_length(max_sequence_length, DEFAULT_T5_LENGTH, None, self.name)
        sample_size = self.model.config.sample_size
        binned = sample_size in BINNED_SAMPLE_SIZES  # any size: diffusers maps it to the nearest bucket
        multiple = 1 if binned else self.vae_scale * self.model.config.patch_size
        self.requested = recipe.image_size(height, width, sample_size * self.vae_scale, multiple, self.name)
        self.resolution = bucket(*self.requested, sample_size) if binned else self.requested  # what the model runs at
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> T5 states, mask (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    default_prompts, parse_prompt = recipe.text_prompts, recipe.as_given  # TEXT_PROMPTS; any text, as given

    prepare = recipe.prepare_t5  # every prompt and "" encoded once, then T5 released
    batch_key = recipe.same_batch  # every prompt padded to max_sequence_length

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states (1, Lt, 4096) in the backbone's dtype and the attention mask (1, Lt)."""
        return recipe.t5_with_mask(self.tokenizer, self.text_encoder, text, self.max_sequence_length, self.dtype,
                                   self.device)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        return recipe.from_cache(self.embeddings, text, self.device, self._encode, self.text_encoder is None)

    # ---- sampling ----------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, steps: int) -> DPMSolver | DDIM:
        if name == "ddim":
            return DDIM(DDIMConfig.from_hub(self.scheduler_config), steps)
        return DPMSolver(DPMSolverConfig.from_hub(self.scheduler_config), steps)

    branches = recipe.uncond_cond  # [uncond; cond] with guidance

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers(cross=self.cross_attention)

    def manifest_fields(self) -> dict:
        return {"resolution": list(self.resolution), "frames": None, "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, scheduler: DPMSolver | DDIM, guidance: float) -> torch.Tensor:
        """Final latents (P, 4, h / 8, w / 8) at the bucket's size (h, w), from the noise of `seed`."""
        cfg = self.model.config
        h, w = self.resolution
        noise = recipe.prompt_noise(len(prompts), (cfg.in_channels, h // self.vae_scale, w // self.vae_scale), seed,
                                    self.dtype, self.device)
        text, mask = recipe.text_batch(self.encode, prompts, guidance)  # [uncond; cond] with guidance
        micro = {}
        if cfg.use_additional_conditions:
            micro = {"resolution": torch.tensor([[h, w]] * len(text), dtype=self.dtype, device=self.device),
                     "aspect_ratio": torch.tensor([[h / w]] * len(text), dtype=self.dtype, device=self.device)}

        def epsilon(x: torch.Tensor, t: int) -> torch.Tensor:
            timesteps = torch.full((len(x),), t, device=self.device)
            return self.model(x, timesteps, text, mask, **micro)[:, : cfg.in_channels]  # learned sigma dropped

        return scheduler.sample(recipe.with_guidance(epsilon, guidance), noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 (B, H, W, 3) images at the requested size."""
        return to_uint8(resize_and_crop(self.vae.decode(latents).float(), *self.requested))
