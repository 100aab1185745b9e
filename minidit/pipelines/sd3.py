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

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minidit import weights
from minidit.attention import AttentionLayer
from minidit.errors import MiniditError
from minidit.models.sd3 import SD3Transformer, load_sd3
from minidit.pipelines import TEXT_PROMPTS
from minidit.pipelines.dit import initial_noise
from minidit.pipelines.prompts import encode_once, free_accelerator_memory, from_cache
from minidit.schedulers import flow
from minidit.schedulers.flow import FlowMatchConfig, FlowMatchEuler
from minidit.text.clip import load_clip
from minidit.text.clip_tokenizer import MAX_LENGTH as CLIP_LENGTH
from minidit.text.clip_tokenizer import CLIPTokenizer
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer
from minidit.vae.autoencoder_kl import load_vae, to_uint8

NEGATIVE_PROMPT = ""
FLUX_SCHEDULER = flow.PRESETS["black-forest-labs/FLUX.1-dev"]
DEFAULT_T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length
MAX_T5_LENGTH = 512  # NOTE(official): StableDiffusion3Pipeline refuses longer T5 sequences


class SD3Recipe:
    """SD3-medium for the analysis: a Hub-layout folder -> three tokenizers and text encoders, MMDiT, VAE."""

    schedulers = ("sd3", "flux")
    default_scheduler = "sd3"
    default_steps = 28  # StableDiffusion3Pipeline's num_inference_steps
    default_guidance = 7.0  # StableDiffusion3Pipeline's guidance_scale

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, max_sequence_length: int | None = None):
        self.folder, self.dtype, self.device = folder, dtype, device
        self.model: SD3Transformer = load_sd3(folder / "transformer", dtype=dtype, device=device)
        self.scheduler_config = weights.read_json(folder / "scheduler" / "scheduler_config.json")
        self.tokenizer = CLIPTokenizer(folder / "tokenizer")  # pads with <|endoftext|>
        self.tokenizer_2 = CLIPTokenizer(folder / "tokenizer_2")  # pads with "!" (id 0)
        self.tokenizer_3 = T5Tokenizer(folder / "tokenizer_3")
        self.text_encoder = load_clip(folder / "text_encoder", dtype=dtype, device=device)
        self.text_encoder_2 = load_clip(folder / "text_encoder_2", dtype=dtype, device=device)
        # NOTE(official): T5 v1.1 overflows in fp16; with an fp16 backbone the encoder runs in bf16.
        t5_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
        self.text_encoder_3 = load_t5(folder / "text_encoder_3", dtype=t5_dtype, device=device)
        self.vae = load_vae(folder / "vae", dtype=dtype, device=device)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent cell: 8
        self.max_sequence_length = DEFAULT_T5_LENGTH if max_sequence_length is None else max_sequence_length
        if not 1 <= self.max_sequence_length <= MAX_T5_LENGTH:
            raise MiniditError(f"--max-sequence-length must be between 1 and {MAX_T5_LENGTH} for SD3, got "
                               f"{self.max_sequence_length}")
        side = self.model.config.sample_size * self.vae_scale  # 128 latents x 8 = 1024
        self.resolution = (side if height is None else height, side if width is None else width)
        multiple = self.vae_scale * self.model.config.patch_size
        if min(self.resolution) < multiple or any(s % multiple for s in self.resolution):
            raise MiniditError(f"--height and --width must be positive multiples of {multiple} for SD3, got "
                               f"{self.resolution}")
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> text tokens, pooled (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    def default_prompts(self) -> list[str]:
        return list(TEXT_PROMPTS)

    def parse_prompt(self, prompt: str) -> str:
        return prompt

    def prepare(self, prompts: list[str]) -> None:
        """Encode every prompt (and the empty negative prompt) once, then release the three text encoders."""
        encode_once(self.embeddings, [NEGATIVE_PROMPT, *prompts], self._encode, "CLIP-L + bigG + T5")
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        free_accelerator_memory()

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (1, 77 + Lt, 4096) and the pooled vector (1, 2048), in the backbone's dtype."""
        if self.text_encoder is None:
            raise MiniditError(f"the text encoders were released after prepare(); {text!r} was not among its prompts")
        clip_l = self.text_encoder(self.tokenizer([text], CLIP_LENGTH)[0].to(self.device))
        clip_g = self.text_encoder_2(self.tokenizer_2([text], CLIP_LENGTH)[0].to(self.device))
        t5_ids, _ = self.tokenizer_3([text], self.max_sequence_length)
        t5 = self.text_encoder_3(t5_ids.to(self.device)).to(self.dtype)  # NOTE(official): no attention mask
        clip = torch.cat([clip_l.penultimate, clip_g.penultimate], dim=-1).to(self.dtype)  # (1, 77, 768 + 1280)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero-padded to T5's width: (1, 77, 4096)
        pooled = torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1)  # (1, 2048)
        return torch.cat([clip, t5], dim=1), pooled.to(self.dtype)

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        return from_cache(self.embeddings, text, self.device, self._encode)

    # ---- sampling ----------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, steps: int) -> FlowMatchEuler:
        if name == "flux":
            return FlowMatchEuler(FLUX_SCHEDULER, steps, image_seq_len=flow.image_seq_len(*self.resolution),
                                  schedule="flux")
        return FlowMatchEuler(FlowMatchConfig.from_hub(self.scheduler_config), steps,
                              image_seq_len=flow.image_seq_len(*self.resolution), schedule="sd3")

    def scheduler_manifest(self, scheduler: FlowMatchEuler) -> dict:
        return {"name": scheduler.name, "schedule": scheduler.schedule, "mu": scheduler.mu,
                "config": asdict(scheduler.cfg)}

    def branches(self, guidance: float) -> tuple[str, ...]:
        return ("uncond", "cond") if guidance > 1 else ("cond",)

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers()

    @torch.no_grad()
    def generate(self, prompt: str, seed: int, scheduler: FlowMatchEuler, guidance: float) -> torch.Tensor:
        """Final latents (1, 16, H / 8, W / 8) at the requested size (H, W), from the noise of `seed`."""
        h, w = (side // self.vae_scale for side in self.resolution)
        noise = initial_noise((1, self.model.config.in_channels, h, w), seed, self.dtype, self.device)
        text, pooled = self.encode(prompt)
        guided = guidance > 1
        if guided:
            negative, negative_pooled = self.encode(NEGATIVE_PROMPT)
            text, pooled = torch.cat([negative, text]), torch.cat([negative_pooled, pooled])  # [uncond; cond]

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            xx = torch.cat([x, x]) if guided else x
            timestep = torch.full((len(xx),), t, dtype=torch.float32, device=self.device)  # 1000 sigma, float32
            v = self.model(xx, timestep, text, pooled)
            if not guided:
                return v
            uncond, cond = v.chunk(2)
            return uncond + guidance * (cond - uncond)

        return scheduler.sample(velocity, noise)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 (B, H, W, 3) images."""
        return to_uint8(self.vae.decode(latents).float())
