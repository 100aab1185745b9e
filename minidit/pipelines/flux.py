"""Text-to-image sampling for FLUX.1 [dev] and [schnell]: prompt -> CLIP-L pooled + T5 -> flow-matching Euler on
2x2-packed latents -> 16-channel VAE.

Follows diffusers' FluxPipeline, which is how the Hub checkpoints are used:
- the prompt is used as given (no lower-casing or stripping; CLIP's tokenizer lower-cases on its own);
- CLIP-L: 77 tokens padded with `<|endoftext|>`; only its pooled vector (no projection) is used;
- T5: `</s>` appended, padded to 512 tokens (dev) or 256 (schnell, as BFL's code and the diffusers docs say; the
  pipeline's own default stays 512), run **without** the attention mask; text ids are zeros (Lt, 3);
- no classifier-free guidance batch: dev takes the guidance scale as an input (distilled guidance, 3.5),
  schnell takes none (guidance 0.0, 4 steps);
- the noise is drawn unpacked, (1, 16, H/8, W/8), from a CPU generator, then packed into 2x2 patches: token
  (r, c) holds the 64 features c16 * 4 + py * 2 + px of latent rows 2r + py, columns 2c + px; image ids are
  (0, r, c);
- NOTE(official): the timestep t = 1000 sigma is cast to the latents' dtype, then divided by 1000 before the
  model, which multiplies by 1000 again (so in bf16 the model sees bf16-rounded sigmas).

Schedulers (`--scheduler`):
- "flux" (the default): the repository's own scheduler config, FluxPipeline's sigmas linspace(1, 1/N, N), shifted
  with mu from the image size (dev: dynamic shift; schnell: shift 1.0, so no shift);
- "sd3": FLUX sampled with SD3's schedule, the paper's ablation. FluxPipeline cannot do this by itself (it always
  passes its own linspace sigmas and mu), so minidit defines it: SD3-medium's scheduler config (fixed shift 3.0,
  no dynamic shift) driven as StableDiffusion3Pipeline drives it (`set_timesteps(N)`, schedule "sd3" of
  minidit/schedulers/flow.py); everything else (model inputs, timestep cast) stays FluxPipeline's.

T5-XXL is the largest part (4.8B parameters, 9.5 GB in bf16): `prepare(prompts)` encodes every prompt of a run
once, then releases both text encoders.
"""

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from minidit import weights
from minidit.attention import AttentionLayer
from minidit.models.flux import FluxTransformer, load_flux
from minidit.pipelines import recipe
from minidit.schedulers import flow
from minidit.schedulers.flow import FlowMatchConfig, FlowMatchEuler
from minidit.text.clip import load_clip
from minidit.text.clip_tokenizer import MAX_LENGTH as CLIP_LENGTH
from minidit.text.clip_tokenizer import CLIPTokenizer
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer
from minidit.vae.autoencoder_kl import load_vae, to_uint8

SD3_SCHEDULER = flow.PRESETS["stabilityai/stable-diffusion-3-medium-diffusers"]
MAX_T5_LENGTH = 512  # NOTE(official): FluxPipeline refuses longer T5 sequences
T5_LENGTH = {True: 512, False: 256}  # guidance_embeds (dev) -> T5 tokens; schnell was distilled with 256
DEFAULT_SIDE = 1024  # FluxPipeline: default_sample_size 128 latents x 8
PACK = 2  # latents are packed in 2x2 patches
TIMESTEP_SCALE = 1000  # FluxPipeline divides the scheduler's t = 1000 sigma by this before the model


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, 16, h, w) -> (B, (h/2)(w/2), 64): 2x2 patches, channel outermost within a token (FluxPipeline's order)."""
    return rearrange(latents, "B C (H py) (W px) -> B (H W) (C py px)", py=PACK, px=PACK)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, (h/2)(w/2), 64) -> (B, 16, h, w), the inverse of `pack`."""
    return rearrange(tokens, "B (H W) (C py px) -> B C (H py) (W px)", H=h // PACK, W=w // PACK, py=PACK, px=PACK)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(0, row, column) of every packed token, row-major: ((h/2)(w/2), 3), for the 3-axis RoPE."""
    rows, cols = torch.meshgrid(torch.arange(h // PACK), torch.arange(w // PACK), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


class FluxRecipe:
    """FLUX.1 dev / schnell for the analysis: a Hub-layout folder -> tokenizers, CLIP-L, T5, backbone, VAE."""

    name = "FLUX"
    options = ("height", "width", "max_sequence_length")
    schedulers = ("flux", "sd3")  # each also names its schedule in minidit/schedulers/flow.py
    default_scheduler = "flux"
    # FLUX.1-dev's FluxPipeline defaults; an instance holding schnell (no guidance embedder) sets 4 and 0.0
    default_steps = 28
    default_guidance = 3.5

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, max_sequence_length: int | None = None):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.model: FluxTransformer = load_flux(folder / "transformer", dtype=dtype, device=device)
        self.distilled = self.model.config.guidance_embeds  # dev: distilled guidance; schnell: none
        if not self.distilled:  # schnell: 4 steps, guidance 0 (the diffusers docs and BFL's code)
            self.default_steps, self.default_guidance = 4, 0.0
        self.scheduler_config = weights.read_json(folder / "scheduler" / "scheduler_config.json")
        self.tokenizer = CLIPTokenizer(folder / "tokenizer")
        self.tokenizer_2 = T5Tokenizer(folder / "tokenizer_2")
        self.text_encoder = load_clip(folder / "text_encoder", dtype=dtype, device=device)
        self.text_encoder_2 = load_t5(folder / "text_encoder_2", dtype=recipe.t5_dtype(dtype), device=device)
        self.vae = load_vae(folder / "vae", dtype=dtype, device=device)
        self.vae_scale = recipe.latent_scale(self.vae)
        self.max_sequence_length = recipe.text_length(max_sequence_length, T5_LENGTH[self.distilled], MAX_T5_LENGTH,
                                                      self.name)
        self.resolution = recipe.image_size(height, width, DEFAULT_SIDE, self.vae_scale * PACK, self.name)
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> T5 states, pooled (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    default_prompts, parse_prompt = recipe.text_prompts, recipe.as_given  # TEXT_PROMPTS; any text, as given

    def prepare(self, prompts: list[str]) -> None:
        """Encode every prompt once, then release CLIP and T5 to free their memory."""
        recipe.encode_once(self.embeddings, prompts, self._encode, "CLIP + T5")
        self.text_encoder = self.text_encoder_2 = None
        torch.cuda.empty_cache()  # else the caching allocator keeps the encoders' memory

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states (1, Lt, 4096) and the pooled CLIP-L vector (1, 768), in the backbone's dtype."""
        clip_ids, _ = self.tokenizer([text], CLIP_LENGTH)
        pooled = self.text_encoder(clip_ids.to(self.device)).pooled
        t5_ids, _ = self.tokenizer_2([text], self.max_sequence_length)
        states = self.text_encoder_2(t5_ids.to(self.device))  # NOTE(official): no attention mask
        return states.to(self.dtype), pooled.to(self.dtype)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        return recipe.from_cache(self.embeddings, text, self.device, self._encode, self.text_encoder is None)

    # ---- sampling ----------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, steps: int) -> FlowMatchEuler:
        cfg = SD3_SCHEDULER if name == "sd3" else FlowMatchConfig.from_hub(self.scheduler_config)
        return FlowMatchEuler(cfg, steps, image_seq_len=flow.image_seq_len(*self.resolution), schedule=name)

    def branches(self, guidance: float) -> tuple[str, ...]:
        return ("cond",)  # dev's guidance is an input of the model, not a second batch half

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers()

    def manifest_fields(self) -> dict:
        return {"resolution": list(self.resolution), "frames": None}

    @torch.no_grad()
    def generate(self, prompt: str, seed: int, scheduler: FlowMatchEuler, guidance: float) -> torch.Tensor:
        """Final latents (1, 16, H / 8, W / 8) at the requested size (H, W), from the noise of `seed`."""
        h, w = (side // self.vae_scale for side in self.resolution)
        noise = recipe.initial_noise((1, self.model.config.in_channels // PACK**2, h, w), seed, self.dtype, self.device)
        text, pooled = self.encode(prompt)
        img_ids = image_ids(h, w).to(self.device, self.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype)
        g = torch.full((1,), guidance, device=self.device) if self.distilled else None  # float32, as FluxPipeline

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            # NOTE(official): t cast to the latents' dtype, then / 1000; the model multiplies by 1000 again
            timestep = torch.full((1,), t, device=self.device).to(x.dtype) / TIMESTEP_SCALE
            return self.model(x, timestep, text, pooled, img_ids, txt_ids, g)

        return unpack(scheduler.sample(velocity, pack(noise)), h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.vae.decode(latents).float())
