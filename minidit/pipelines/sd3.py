"""Text-to-image sampling for Stable Diffusion 3 medium: prompt -> CLIP-L + CLIP-bigG + T5 -> flow-matching Euler
with classifier-free guidance -> 16-channel VAE.

Follows diffusers' StableDiffusion3Pipeline, which is how the Hub checkpoints are used:
- the prompt is used as given (no lower-casing or stripping; the CLIP tokenizers lower-case on their own, T5's
  does not);
- CLIP-L and CLIP-bigG: 77 tokens, padded with `<|endoftext|>` (tokenizer/) and with `!` (tokenizer_2/); each gives
  its penultimate hidden states (before the final LayerNorm) and its projected pooled vector (`text_embeds`);
- text tokens: [CLIP-L; bigG] concatenated on the width (768 + 1280), zero-padded to T5's width (4096), then joined
  with T5's states (256 tokens by default, `</s>` appended, run **without** the attention mask): (B, 77 + 256, 4096);
  pooled = [CLIP-L; bigG] text_embeds: (B, 2048);
- the unconditional branch is the same recipe applied to "" (not zeros); the batch is [uncond; cond] and
  v = v_u + g (v_c - v_u), guidance 7.0, 28 steps;
- the noise is drawn as (1, 16, H/8, W/8) from a CPU generator; the timestep t = 1000 sigma (float32) is expanded to
  the batch and fed to the model as is.

Schedulers (`--scheduler`):
- "sd3" (the default): the repository's scheduler config (fixed shift 3.0) driven by `set_timesteps(N)` (schedule
  "sd3" of minidit/schedulers/flow.py);
- "flux": SD3 sampled with FLUX's schedule, the paper's scheduler ablation: FLUX.1-dev's scheduler config (dynamic
  shift) with FluxPipeline's sigmas linspace(1, 1/N, N) and mu from the image token count (H/16)(W/16). This is
  what StableDiffusion3Pipeline itself does when given that scheduler and those sigmas: it computes mu from its
  latent size by the same rule.

The text encoders are the largest part (T5-XXL 4.8B parameters, bigG 0.7B): `prepare(prompts)` encodes every
prompt of a run once, then releases all three.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minidit import weights
from minidit.attention import AttentionLayer
from minidit.models.sd3 import SD3Transformer, load_sd3
from minidit.pipelines import recipe
from minidit.schedulers import flow
from minidit.schedulers.flow import FlowMatchConfig, FlowMatchEuler
from minidit.text.clip import load_clip
from minidit.text.clip_tokenizer import MAX_LENGTH as CLIP_LENGTH
from minidit.text.clip_tokenizer import CLIPTokenizer
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer
from minidit.vae.autoencoder_kl import load_vae, to_uint8

FLUX_SCHEDULER = flow.PRESETS["black-forest-labs/FLUX.1-dev"]
DEFAULT_T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length
MAX_T5_LENGTH = 512  # NOTE(official): StableDiffusion3Pipeline refuses longer T5 sequences


class SD3Recipe:
    """SD3-medium for the analysis: a Hub-layout folder -> three tokenizers and text encoders, MMDiT, VAE."""

    name = "SD3"
    options = ("height", "width", "max_sequence_length")
    schedulers = ("sd3", "flux")  # each also names its schedule in minidit/schedulers/flow.py
    default_scheduler = "sd3"
    default_steps = 28  # StableDiffusion3Pipeline's num_inference_steps
    default_guidance = 7.0  # StableDiffusion3Pipeline's guidance_scale
    decodes = True

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, max_sequence_length: int | None = None):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.model: SD3Transformer = load_sd3(folder / "transformer", dtype=dtype, device=device)
        scheduler_file = weights.read_json(folder / "scheduler" / "scheduler_config.json")
        self.scheduler_config = FlowMatchConfig.from_hub(scheduler_file)
        self.tokenizer = CLIPTokenizer(folder / "tokenizer")  # pads with <|endoftext|>
        self.tokenizer_2 = CLIPTokenizer(folder / "tokenizer_2")  # pads with "!" (id 0)
        self.tokenizer_3 = T5Tokenizer(folder / "tokenizer_3")
        self.text_encoder = load_clip(folder / "text_encoder", dtype=dtype, device=device)
        self.text_encoder_2 = load_clip(folder / "text_encoder_2", dtype=dtype, device=device)
        self.text_encoder_3 = load_t5(folder / "text_encoder_3", dtype=recipe.t5_dtype(dtype), device=device)
        self.vae = load_vae(folder / "vae", dtype=dtype, device=device)
        self.vae_scale = recipe.latent_scale(self.vae)
        self.max_sequence_length = recipe.text_length(max_sequence_length, DEFAULT_T5_LENGTH, MAX_T5_LENGTH, self.name)
        side, multiple = self.model.config.sample_size * self.vae_scale, self.vae_scale * self.model.config.patch_size
        self.resolution = recipe.image_size(height, width, side, multiple, self.name)  # side: 128 latents x 8 = 1024
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> text tokens, pooled (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    default_prompts, parse_prompt = recipe.text_prompts, recipe.as_given  # TEXT_PROMPTS; any text, as given
    batch_key = recipe.same_batch  # every prompt's text has the same length (padded)

    def prepare(self, prompts: list[str]) -> None:
        """Encode every prompt (and the empty negative prompt) once, then release the three text encoders."""
        recipe.encode_and_release(self, [recipe.NEGATIVE_PROMPT, *prompts],
                                  ("text_encoder", "text_encoder_2", "text_encoder_3"), "CLIP-L + bigG + T5")

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (1, 77 + Lt, 4096) and the pooled vector (1, 2048), in the backbone's dtype."""
        clip_l = self.text_encoder(self.tokenizer([text], CLIP_LENGTH)[0].to(self.device))
        clip_g = self.text_encoder_2(self.tokenizer_2([text], CLIP_LENGTH)[0].to(self.device))
        t5_ids, _ = self.tokenizer_3([text], self.max_sequence_length)
        t5 = self.text_encoder_3(t5_ids.to(self.device)).to(self.dtype)  # NOTE(official): no attention mask
        clip = torch.cat([clip_l.penultimate, clip_g.penultimate], dim=-1).to(self.dtype)  # (1, 77, 768 + 1280)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero-padded to T5's width: (1, 77, 4096)
        pooled = torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1)  # (1, 2048)
        return torch.cat([clip, t5], dim=1), pooled.to(self.dtype)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        return recipe.from_cache(self.embeddings, text, self.device, self._encode, self.text_encoder is None)

    # ---- sampling ----------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, steps: int) -> FlowMatchEuler:
        cfg = FLUX_SCHEDULER if name == "flux" else self.scheduler_config
        return FlowMatchEuler(cfg, steps, image_seq_len=flow.image_seq_len(*self.resolution), schedule=name)

    branches = recipe.uncond_cond  # [uncond; cond] with guidance

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers()

    def manifest_fields(self) -> dict:
        return {"resolution": list(self.resolution), "frames": None, "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, scheduler: FlowMatchEuler, guidance: float) -> torch.Tensor:
        """Final latents (P, 16, H / 8, W / 8) at the requested size (H, W), from the noise of `seed`."""
        h, w = (side // self.vae_scale for side in self.resolution)
        noise = recipe.prompt_noise(len(prompts), (self.model.config.in_channels, h, w), seed, self.dtype,
                                    self.device)
        text, pooled = recipe.text_batch(self.encode, prompts, guidance)  # [uncond; cond] with guidance

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            timestep = torch.full((len(x),), t, dtype=torch.float32, device=self.device)  # 1000 sigma, float32
            return self.model(x, timestep, text, pooled)

        return scheduler.sample(recipe.with_guidance(velocity, guidance), noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.vae.decode(latents).float())
