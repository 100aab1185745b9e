"""Text-to-video sampling for Mochi 1 preview: prompt -> T5 -> flow-matching Euler with guidance -> video latents.

Follows diffusers' MochiPipeline, which is how the Hub checkpoint `genmo/mochi-1-preview` is used:
- the prompt is used as given; T5 tokens: `</s>` appended, padded to 256, run **with** the attention mask, and the
  transformer gets the mask too (padded tokens are no keys); the unconditional branch is the T5 encoding of ""
  (negative prompt, its own mask); the batch is [uncond; cond];
- frames: 19 by default, 6k + 1 for the VAE's 6x temporal compression: (F - 1) / 6 + 1 latent frames; 480x848 by
  default, multiples of 16 (8x VAE, 2x2 patches). NOTE(official): the pipeline hard-codes the VAE's factors 8 and 6
  rather than reading the VAE's config, and so does this recipe;
- the noise is drawn as (1, 12, latent frames, H/8, W/8) from a CPU generator in float32, then cast to the
  latents' dtype;
- sampling: flow-matching Euler on genmo's linear-quadratic schedule, 64 steps by default (FlowMatchEuler, schedule
  "mochi", with the repository's scheduler config: invert_sigmas). Every step: t = 1000 (1 - sigma) in the latents'
  dtype for the whole batch (NOTE(official): 0 at pure noise), the model output cast to float32, guidance
  v_u + 4.5 (v_c - v_u) in float32, the Euler step in float32, the latents cast back to their dtype.

Weights. `--model mochi` downloads the transformer's bf16 variant (`transformer/diffusion_pytorch_model.bf16-*` and
its index: 20 GB instead of the fp32 files' 40; the analysis runs in bf16 on a GPU, where the fp32 files would be
cast to the same values), T5-XXL (`text_encoder/`), the tokenizer, the scheduler config and vae/config.json (not
read yet: no VAE). `--weights DIR` takes the Hub layout with the fp32 transformer files (read where present) or the
bf16 variant, or genmo's `dit.safetensors` at the folder's root (when transformer/ holds no weights; its config from
transformer/config.json where that exists, else the official one).

Mochi's VAE is not implemented yet: runs keep the final latents (--save-latents). T5-XXL is released after
`prepare(prompts)`.
"""

from pathlib import Path

import numpy as np
import torch

from minidit import weights
from minidit.attention import AttentionLayer
from minidit.errors import MiniditError
from minidit.models.mochi import GENMO_FILE, VARIANT, MochiConfig, MochiTransformer, load_mochi
from minidit.pipelines import recipe
from minidit.schedulers.flow import FlowMatchConfig, FlowMatchEuler
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer

DEFAULT_FRAMES = 19  # MochiPipeline's num_frames
DEFAULT_HEIGHT, DEFAULT_WIDTH = 480, 848  # MochiPipeline's default_height and default_width
DEFAULT_T5_LENGTH = 256  # MochiPipeline's max_sequence_length
VAE_SPATIAL, VAE_TEMPORAL = 8, 6  # MochiPipeline's vae_spatial_scale_factor and vae_temporal_scale_factor
PATCH = 2  # MochiPipeline's patch_size: a latent side must be even


def load_transformer(folder: Path, dtype: torch.dtype, device: str) -> MochiTransformer:
    """The transformer of a Mochi repository folder: transformer/ (the fp32 files, else the bf16 variant), else
    genmo's dit.safetensors at the root."""
    hub = folder / "transformer"
    if weights.has_weights(hub) or weights.has_weights(hub, VARIANT):
        return load_mochi(hub, dtype=dtype, device=device)
    if (folder / GENMO_FILE).is_file():
        config = MochiConfig.from_hub(weights.read_json(hub / "config.json")) if (hub / "config.json").is_file() \
            else None
        return load_mochi(folder / GENMO_FILE, dtype=dtype, device=device, config=config)
    raise MiniditError(f"{folder} holds no Mochi transformer: expected transformer/ with the fp32 shards "
                       f"(diffusion_pytorch_model-0000k-of-00005.safetensors) or the bf16 variant "
                       f"(diffusion_pytorch_model.bf16-0000k-of-00003.safetensors) and its index, or genmo's "
                       f"{GENMO_FILE} at the folder's root")


class MochiRecipe:
    """Mochi 1 preview for the analysis: a Hub-layout folder -> tokenizer, T5, transformer, scheduler."""

    name = "Mochi 1 preview"
    options = ("height", "width", "frames", "max_sequence_length")
    schedulers = ("mochi",)  # flow-matching Euler on the linear-quadratic schedule
    default_scheduler = "mochi"
    default_steps = 64  # MochiPipeline's num_inference_steps
    default_guidance = 4.5  # MochiPipeline's guidance_scale
    decodes = False  # the VAE (AutoencoderKLMochi) is not implemented yet

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, frames: int | None = None, max_sequence_length: int | None = None):
        self.folder, self.dtype, self.device = folder, dtype, device
        # the options first: they do not depend on the weights, which take minutes to load at full size
        self.frames = recipe.video_frames(frames, DEFAULT_FRAMES, VAE_TEMPORAL, self.name)
        self.resolution = recipe.image_size(DEFAULT_HEIGHT if height is None else height,
                                            DEFAULT_WIDTH if width is None else width, 0, VAE_SPATIAL * PATCH,
                                            self.name)
        self.max_sequence_length = recipe.text_length(max_sequence_length, DEFAULT_T5_LENGTH, None, self.name)
        self.scheduler_config = FlowMatchConfig.from_hub(
            weights.read_json(folder / "scheduler" / "scheduler_config.json"))
        self.model = load_transformer(folder, dtype, device)
        self.tokenizer = T5Tokenizer(folder / "tokenizer")
        self.text_encoder = load_t5(folder / "text_encoder", dtype=recipe.t5_dtype(dtype), device=device)
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> T5 states, mask (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    default_prompts, parse_prompt = recipe.video_prompts, recipe.as_given  # VIDEO_PROMPTS; any text, as given
    batch_key = recipe.same_batch  # every prompt's text has the same length (padded)

    prepare = recipe.prepare_t5  # every prompt and "" encoded once, then T5 released

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states (1, Lt, 4096) in the backbone's dtype and the attention mask (1, Lt), Lt = max_sequence_length."""
        return recipe.t5_with_mask(self.tokenizer, self.text_encoder, text, self.max_sequence_length, self.dtype,
                                   self.device, clean=False)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        return recipe.from_cache(self.embeddings, text, self.device, self._encode, self.text_encoder is None)

    # ---- sampling ----------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, steps: int) -> FlowMatchEuler:
        return FlowMatchEuler(self.scheduler_config, steps, schedule="mochi")

    branches = recipe.uncond_cond  # [uncond; cond] with guidance

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers()

    def manifest_fields(self) -> dict:
        return {"resolution": list(self.resolution), "frames": self.frames,
                "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, scheduler: FlowMatchEuler, guidance: float) -> torch.Tensor:
        """Final latents (P, 12, (F - 1) / 6 + 1, H / 8, W / 8) for F frames at H x W, from the noise of `seed`."""
        latent_frames = (self.frames - 1) // VAE_TEMPORAL + 1
        h, w = (side // VAE_SPATIAL for side in self.resolution)
        shape = (self.model.config.in_channels, latent_frames, h, w)
        # NOTE(official): MochiPipeline draws the noise in float32 and casts it to the latents' dtype after
        x = recipe.prompt_noise(len(prompts), shape, seed, torch.float32, self.device).to(self.dtype)
        text, mask = recipe.text_batch(self.encode, prompts, guidance)  # [uncond; cond] with guidance
        for i, t in enumerate(scheduler.timesteps):
            batch = torch.cat([x, x]) if guidance > 1 else x
            # NOTE(official): t = 1000 (1 - sigma), 0 at pure noise, in the latents' dtype
            timestep = torch.full((len(batch),), t, dtype=self.dtype, device=self.device)
            v = self.model(batch, text, timestep, mask).float()  # NOTE(official): guidance and the step in float32
            if guidance > 1:
                v = recipe.guided(*v.chunk(2), guidance)
            x = scheduler.step(v, i, x).to(self.dtype)
        return x

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        raise MiniditError("Mochi's VAE (AutoencoderKLMochi) is not implemented in minidit yet (a later issue), so it "
                           "cannot write images or videos: run with --save-latents instead of --save-images to keep "
                           "the final latents")
