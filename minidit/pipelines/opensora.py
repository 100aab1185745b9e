"""Text-to-video sampling for Open-Sora 1.2: prompt -> T5 -> STDiT3 with RFlow and guidance -> video latents.

Follows the official text-to-video path of hpcaitech/Open-Sora at v1.2.0 (there is no library pipeline):
`scripts/inference.py` with `configs/opensora-v1-2/inference/sample.py`, and `RFLOW.sample`:
- the prompt gets the suffix " aesthetic score: 6.5." (unless it has one), then the caption cleaning, twice
  (minidit/text/captions.py: lower-cased, URLs, HTML and stray punctuation removed);
- T5 (DeepFloyd/t5-v1_1-xxl): `</s>` appended, padded to 300 tokens, run with the attention mask;
- the unconditional branch is the model's learned null caption (not an encoded empty prompt), with the prompt's
  own text mask (NOTE(official)); the batch is [cond; uncond], guidance 7.0 on the first 4 of the 8 output
  channels;
- 51 frames at 240 x 426 ("240p", aspect "9:16", Open-Sora's name for height : width), fps 24 (120 for an image),
  30 RFlow steps with the timestep transform by size and length (minidit/schedulers/rflow.py);
- latent size: 8x smaller in height and width (rounded down), 17 frames -> 5 latent frames (the remainder r
  frames -> ceil(r / 4)), so 51 frames -> 15.
NOTE(official): the script draws the noise with the global seed on the GPU, in the run's dtype; minidit draws it
from a CPU generator seeded with --seed (the same numbers on every device), in the run's dtype.
NOTE(official): T5 runs in float32 whatever the run's dtype (the script builds it without one); its states are cast
to the transformer's dtype inside STDiT3.

Weights come from two repositories, which minidit assembles into one folder (see minidit/pipelines/__init__.py):
    transformer/    hpcai-tech/OpenSora-STDiT-v3: config.json, model.safetensors (fp32, 4.8 GB)
    text_encoder/   DeepFloyd/t5-v1_1-xxl (gated): config.json, the encoder's weights (.bin shards on its main
                    branch; safetensors also read), spiece.model and the tokenizer's json files
Open-Sora's VAE (an SDXL VAE per frame and a temporal VAE) is not implemented yet: runs keep the final latents
(--save-latents). T5 is released after `prepare(prompts)`.
"""

from pathlib import Path

import numpy as np
import torch

from minidit.attention import AttentionLayer
from minidit.errors import MiniditError
from minidit.models.opensora import STDiT3, load_opensora
from minidit.pipelines import recipe
from minidit.schedulers.rflow import FRAMES_PER_CHUNK, LATENT_FRAMES_PER_CHUNK, RFlow
from minidit.text.captions import clean_caption
from minidit.text.t5 import load_t5
from minidit.text.t5_tokenizer import T5Tokenizer

DEFAULT_FRAMES = 51  # "2s" in Open-Sora's names
DEFAULT_SIZE = (240, 426)  # "240p" at aspect ratio "9:16" (height, width)
FPS, IMAGE_FPS = 24, 120  # the sample config's fps (frame_interval 1); IMG_FPS for a single frame
AESTHETIC_SCORE = 6.5  # the sample config's `aes`
VAE_SCALE = 8  # pixels per latent cell (the SDXL VAE)


def with_aesthetic_score(prompt: str, score: float = AESTHETIC_SCORE) -> str:
    """The suffix scripts/inference.py adds before cleaning, unless the prompt states a score already."""
    return prompt if "aesthetic score:" in prompt else f"{prompt} aesthetic score: {score:.1f}."


def latent_frames(frames: int) -> int:
    """Open-Sora's VAE: every 17 frames -> 5 latent frames; the remaining r frames -> ceil(r / 4)."""
    chunks, rest = divmod(frames, FRAMES_PER_CHUNK)
    return chunks * LATENT_FRAMES_PER_CHUNK + -(-rest // 4)


class OpenSoraRecipe:
    """Open-Sora 1.2 for the analysis: an assembled folder (transformer/, text_encoder/) -> T5, STDiT3, RFlow."""

    name = "Open-Sora 1.2"
    options = ("height", "width", "frames", "max_sequence_length", "cross_attention")
    schedulers = ("rflow",)
    default_scheduler = "rflow"
    default_steps = 30  # the sample config's num_sampling_steps
    default_guidance = 7.0  # its cfg_scale
    decodes = False  # Open-Sora's VAE is not implemented yet

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str, height: int | None = None,
                 width: int | None = None, frames: int | None = None, max_sequence_length: int | None = None,
                 cross_attention: bool = False):
        self.folder, self.dtype, self.device = folder, dtype, device
        for part in ("transformer", "text_encoder"):
            if not (folder / part).is_dir():
                raise MiniditError(f"{folder / part} is missing: Open-Sora's folder holds transformer/ "
                                   f"(hpcai-tech/OpenSora-STDiT-v3) and text_encoder/ (DeepFloyd/t5-v1_1-xxl)")
        self.model: STDiT3 = load_opensora(folder / "transformer", dtype=dtype, device=device)
        self.cross_attention = cross_attention
        self.tokenizer = T5Tokenizer(folder / "text_encoder")  # DeepFloyd's repository holds both
        self.text_encoder = load_t5(folder / "text_encoder", dtype=torch.float32, device=device)
        self.frames = DEFAULT_FRAMES if frames is None else frames
        if self.frames != 1 and self.frames < FRAMES_PER_CHUNK:
            raise MiniditError(f"--frames must be 1 (an image) or at least {FRAMES_PER_CHUNK} for {self.name} (its "
                               f"VAE and timestep transform work in chunks of {FRAMES_PER_CHUNK} frames; default "
                               f"{DEFAULT_FRAMES}), got {self.frames}")
        size = (DEFAULT_SIZE[0] if height is None else height, DEFAULT_SIZE[1] if width is None else width)
        if min(size) < 2 * VAE_SCALE:
            raise MiniditError(f"--height and --width must be at least {2 * VAE_SCALE} pixels for {self.name} (one "
                               f"2x2 patch of latent cells), got {size}")
        self.resolution = size
        limit = self.model.config.model_max_length  # the null caption's rows
        self.max_sequence_length = recipe.text_length(max_sequence_length, limit, limit, self.name)
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> T5 states, mask (host)

    # ---- prompts and text --------------------------------------------------------------------------------

    default_prompts, parse_prompt = recipe.video_prompts, recipe.as_given  # VIDEO_PROMPTS; any text, as given
    batch_key = recipe.same_batch  # every prompt's text has the same length (padded)

    def prepare(self, prompts: list[str]) -> None:
        """Encode every prompt once, then release T5 to free its memory (19 GB in float32)."""
        recipe.encode_and_release(self, prompts)  # no negative prompt: the null caption is learned

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt as T5 sees it (suffix, cleaning) -> float32 states (1, Lt, 4096) and the mask (1, Lt)."""
        return recipe.t5_with_mask(self.tokenizer, self.text_encoder, clean_caption(with_aesthetic_score(prompt)),
                                   self.max_sequence_length, torch.float32, self.device, clean=False)

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return recipe.from_cache(self.embeddings, prompt, self.device, self._encode, self.text_encoder is None)

    def text(self, prompts: list[str], guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's text input and mask: the prompts'; with guidance, the batch [cond; uncond] whose
        uncond half is the learned null caption (cut to the same length) with each prompt's mask."""
        states, mask = (torch.cat(parts) for parts in zip(*(self.encode(p) for p in prompts)))
        if guidance <= 1:
            return states, mask
        null = self.model.null_text(len(prompts))[:, :states.shape[1]].to(states.dtype)
        return torch.cat([states, null]), torch.cat([mask, mask])

    # ---- sampling ----------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, steps: int) -> RFlow:
        # NOTE(official): the script builds the sizes in the run's dtype, so bf16 runs transform with bf16 ratios
        return RFlow(steps, height=self.resolution[0], width=self.resolution[1], num_frames=self.frames,
                     dtype=self.dtype)

    def branches(self, guidance: float) -> tuple[str, ...]:
        return ("cond", "uncond") if guidance > 1 else ("cond",)

    def attention_layers(self) -> list[AttentionLayer]:
        return self.model.attention_layers(cross=self.cross_attention)

    def manifest_fields(self) -> dict:
        return {"resolution": list(self.resolution), "frames": self.frames,
                "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, scheduler: RFlow, guidance: float) -> torch.Tensor:
        """Final latents (P, 4, T, H / 8, W / 8) in float32, T the latent frames, from the noise of `seed`."""
        channels = self.model.config.in_channels
        h, w = (side // VAE_SCALE for side in self.resolution)
        noise = recipe.prompt_noise(len(prompts), (channels, latent_frames(self.frames), h, w), seed, self.dtype,
                                    self.device)
        text, mask = self.text(prompts, guidance)
        fps = IMAGE_FPS if self.frames == 1 else FPS
        sizes = [torch.full((len(text),), float(v), dtype=self.dtype, device=self.device)
                 for v in (fps, *self.resolution)]

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            batch = torch.cat([x, x]) if guidance > 1 else x
            timestep = torch.full((len(batch),), t, device=self.device)
            v = self.model(batch, timestep, text, mask, *sizes)[:, :channels]  # float32; the rest is unused
            if guidance <= 1:
                return v
            cond, uncond = v.chunk(2)
            return recipe.guided(uncond, cond, guidance)

        return scheduler.sample(velocity, noise)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        raise MiniditError("Open-Sora's VAE (an SDXL VAE per frame and a temporal VAE) is not implemented in minidit "
                           "yet (a later issue), so it cannot write videos: run with --save-latents instead of "
                           "--save-images to keep the final latents")
