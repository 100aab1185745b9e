"""Text-to-image sampling for FLUX.1 [dev] and [schnell] and undistilled FLUX models (flux-tiny): prompt -> CLIP-L
pooled + T5 -> flow-matching Euler on 2x2-packed latents -> 16-channel VAE (or, in pixel space, the RGB itself).

Follows diffusers' FluxPipeline, which is how the Hub checkpoints are used:
- the prompt is used as given (no lower-casing or stripping; CLIP's tokenizer lower-cases on its own);
- CLIP-L: 77 tokens padded with `<|endoftext|>`; only its pooled vector (no projection) is used;
- T5: `</s>` appended, padded to 512 tokens (dev) or 256 (no guidance embedder: schnell, as BFL's code and the
  diffusers docs say; the pipeline's own default stays 512), or to the tokenizer_2 folder's `model_max_length`
  where that is shorter (flux-tiny: 16, what it was trained with); run **without** the attention mask; text ids
  are zeros (Lt, 3);
- guidance, told by the transformer's `guidance_embeds`:
  - dev (distilled guidance): the scale is an input of the model (3.5), one batch branch ("cond"), no CFG;
  - no guidance embedder (schnell, flux-tiny): `--guidance` is FluxPipeline's `true_cfg_scale` with the negative
    prompt "": above 1, v = v_u + s (v_c - v_u), where v_u has the negative prompt's T5 states *and* pooled
    vector, the same zero text ids and no guidance input. FluxPipeline runs the two branches as two calls (cond
    first); here the backbone runs once per step on the batch [uncond; cond], as SD3's recipe does, so that the
    recorder sees one call per step with one half per branch (the two agree up to float rounding, see
    tests/test_flux_pipeline.py);
- the defaults of a model without a guidance embedder follow from its folder: a scheduler config with no dynamic
  shifting and shift 1.0 is timestep-distilled (schnell): 4 steps, guidance 0.0 (the diffusers docs and BFL's
  code); any other (an undistilled FLUX such as flux-tiny, trained with the dev schedule): 28 steps, true CFG
  `TRUE_CFG_SCALE`;
- the noise is drawn unpacked, (1, 16, H/8, W/8), from a CPU generator, then packed into 2x2 patches: token
  (r, c) holds the 64 features c16 * 4 + py * 2 + px of latent rows 2r + py, columns 2c + px; image ids are
  (0, r, c);
- pixel space (model_index.json without a "vae" entry, flux-tiny): the "latents" are the RGB image in [-1, 1],
  (1, 3, H, W), packed into (H/2)(W/2) tokens of 12 (in_channels 12); decoding is only the cast to uint8. The
  default size is `PIXEL_SIDE`. FluxPipeline itself needs a VAE, so this is minidit's extension;
- NOTE(official): the timestep t = 1000 sigma is cast to the latents' dtype, then divided by 1000 before the
  model, which multiplies by 1000 again (so in bf16 the model sees bf16-rounded sigmas).

Schedulers (`--scheduler`):
- "flux" (the default): the repository's own scheduler config, FluxPipeline's sigmas linspace(1, 1/N, N), shifted
  with mu from the packed image token count (dev: dynamic shift, mu 1.15 at 1024x1024, 0.5 at 256 tokens, which is
  flux-tiny's 32x32 in pixel space; schnell: shift 1.0, so no shift);
- "sd3": FLUX sampled with SD3's schedule, the paper's ablation. FluxPipeline cannot do this by itself (it always
  passes its own linspace sigmas and mu), so minidit defines it: SD3-medium's scheduler config (fixed shift 3.0,
  no dynamic shift) driven as StableDiffusion3Pipeline drives it (`set_timesteps(N)`, schedule "sd3" of
  minidit/schedulers/flow.py); everything else (model inputs, timestep cast) stays FluxPipeline's.

T5-XXL is the largest part (4.8B parameters, 9.5 GB in bf16): `prepare(prompts)` encodes every prompt of a run
(and, without a guidance embedder, the negative prompt "") once, then releases both text encoders.
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
PIXEL_SIDE = 32  # the default side in pixel space: flux-tiny's 32x32 RGB
TRUE_CFG_SCALE = 3.0  # the default --guidance (true CFG) of an undistilled FLUX: flux-tiny's best (its model card)
FLUX_STEPS = 28  # FluxPipeline's num_inference_steps (dev, and an undistilled FLUX)
SCHNELL_STEPS = 4  # a timestep-distilled FLUX (schnell)
PACK = 2  # latents are packed in 2x2 patches
TIMESTEP_SCALE = 1000  # FluxPipeline divides the scheduler's t = 1000 sigma by this before the model


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): 2x2 patches, channel outermost within a token (FluxPipeline's order)."""
    return rearrange(latents, "B C (H py) (W px) -> B (H W) (C py px)", py=PACK, px=PACK)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, (h/2)(w/2), 4C) -> (B, C, h, w), the inverse of `pack`."""
    return rearrange(tokens, "B (H W) (C py px) -> B C (H py) (W px)", H=h // PACK, W=w // PACK, py=PACK, px=PACK)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(0, row, column) of every packed token, row-major: ((h/2)(w/2), 3), for the 3-axis RoPE."""
    rows, cols = torch.meshgrid(torch.arange(h // PACK), torch.arange(w // PACK), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def t5_length(tokenizer_folder: Path, guidance_embeds: bool) -> int:
    """The default T5 length: T5_LENGTH, or the tokenizer's `model_max_length` where that is a shorter int (a model
    trained with fewer tokens; the Hub tokenizers say 512 or a huge placeholder)."""
    config = tokenizer_folder / "tokenizer_config.json"
    limit = weights.read_json(config).get("model_max_length") if config.is_file() else None
    default = T5_LENGTH[guidance_embeds]
    return limit if type(limit) is int and 0 < limit < default else default


def timestep_distilled(config: FlowMatchConfig) -> bool:
    """schnell's scheduler: no dynamic shifting and shift 1.0 (an unshifted 4-step schedule)."""
    return not config.use_dynamic_shifting and config.shift == 1.0


class FluxRecipe:
    """FLUX.1 dev / schnell / undistilled for the analysis: a Hub-layout folder -> tokenizers, CLIP-L, T5, backbone,
    VAE (none in pixel space)."""

    name = "FLUX"
    options = ("height", "width", "max_sequence_length")
    schedulers = ("flux", "sd3")  # each also names its schedule in minidit/schedulers/flow.py
    default_scheduler = "flux"
    # FLUX.1-dev's FluxPipeline defaults; an instance without a guidance embedder sets its own (module docstring)
    default_steps = FLUX_STEPS
    default_guidance = 3.5
    decodes = True

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, max_sequence_length: int | None = None):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.model: FluxTransformer = load_flux(folder / "transformer", dtype=dtype, device=device)
        self.distilled = self.model.config.guidance_embeds  # dev: distilled guidance; else --guidance is true CFG
        scheduler_file = weights.read_json(folder / "scheduler" / "scheduler_config.json")
        self.scheduler_config = FlowMatchConfig.from_hub(scheduler_file)
        if not self.distilled and timestep_distilled(self.scheduler_config):
            self.default_steps, self.default_guidance = SCHNELL_STEPS, 0.0  # the diffusers docs and BFL's code
        elif not self.distilled:  # undistilled (flux-tiny): FluxPipeline's steps, true CFG
            self.default_steps, self.default_guidance = FLUX_STEPS, TRUE_CFG_SCALE
        self.tokenizer = CLIPTokenizer(folder / "tokenizer")
        self.tokenizer_2 = T5Tokenizer(folder / "tokenizer_2")
        self.text_encoder = load_clip(folder / "text_encoder", dtype=dtype, device=device)
        self.text_encoder_2 = load_t5(folder / "text_encoder_2", dtype=recipe.t5_dtype(dtype), device=device)
        self.pixel_space = "vae" not in weights.read_json(folder / "model_index.json")  # flux-tiny draws RGB
        self.vae = None if self.pixel_space else load_vae(folder / "vae", dtype=dtype, device=device)
        self.vae_scale = 1 if self.vae is None else recipe.latent_scale(self.vae)  # pixels per latent cell
        self.max_sequence_length = recipe.text_length(
            max_sequence_length, t5_length(folder / "tokenizer_2", self.distilled), MAX_T5_LENGTH, self.name)
        side = PIXEL_SIDE if self.pixel_space else DEFAULT_SIDE
        self.resolution = recipe.image_size(height, width, side, self.vae_scale * PACK, self.name)
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> T5 states, pooled (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    default_prompts, parse_prompt = recipe.text_prompts, recipe.as_given  # TEXT_PROMPTS; any text, as given
    batch_key = recipe.same_batch  # every prompt's text has the same length (padded)

    def prepare(self, prompts: list[str]) -> None:
        """Encode every prompt (and, for true CFG, the negative prompt) once, then release CLIP and T5."""
        texts = prompts if self.distilled else [recipe.NEGATIVE_PROMPT, *prompts]
        recipe.encode_and_release(self, texts, ("text_encoder", "text_encoder_2"), "CLIP + T5")

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

    def latent_size(self) -> tuple[int, int]:
        """(h, w): the latent grid of the requested size (H/8, W/8; in pixel space H, W)."""
        return self.resolution[0] // self.vae_scale, self.resolution[1] // self.vae_scale

    def make_scheduler(self, name: str, steps: int) -> FlowMatchEuler:
        cfg = SD3_SCHEDULER if name == "sd3" else self.scheduler_config
        h, w = self.latent_size()
        tokens = (h // PACK) * (w // PACK)  # packed image tokens: FluxPipeline's image_seq_len, in both spaces
        return FlowMatchEuler(cfg, steps, image_seq_len=tokens, schedule=name)

    def true_cfg_scale(self, guidance: float) -> float:
        """The true-CFG scale of the batch [uncond; cond] (<= 1: "cond" alone). dev's guidance goes into the model."""
        return 0.0 if self.distilled else guidance

    def branches(self, guidance: float) -> tuple[str, ...]:
        return recipe.uncond_cond(self, self.true_cfg_scale(guidance))  # [uncond; cond] with true CFG

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers()

    def manifest_fields(self) -> dict:
        return {"resolution": list(self.resolution), "frames": None, "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, scheduler: FlowMatchEuler, guidance: float) -> torch.Tensor:
        """Final latents (P, C, h, w) at the requested size (H, W), from the noise of `seed`: C = in_channels / 4
        (16; in pixel space 3), (h, w) = `latent_size()`."""
        h, w = self.latent_size()
        noise = recipe.prompt_noise(len(prompts), (self.model.config.in_channels // PACK**2, h, w), seed, self.dtype,
                                    self.device)
        cfg_scale = self.true_cfg_scale(guidance)
        text, pooled = recipe.text_batch(self.encode, prompts, cfg_scale)  # [uncond; cond] with true CFG
        img_ids = image_ids(h, w).to(self.device, self.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype)  # both branches: Lt zeros
        g = torch.full((1,), guidance, device=self.device) if self.distilled else None  # float32, as FluxPipeline

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            # NOTE(official): t cast to the latents' dtype, then / 1000; the model multiplies by 1000 again
            timestep = torch.full((len(x),), t, device=self.device).to(x.dtype) / TIMESTEP_SCALE
            return self.model(x, timestep, text, pooled, img_ids, txt_ids, g)

        return unpack(scheduler.sample(recipe.with_guidance(velocity, cfg_scale), pack(noise)), h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 (B, H, W, 3) images: the latents through the VAE, or already pixels in pixel space."""
        return to_uint8(latents if self.vae is None else self.vae.decode(latents).float())
