"""The recipe contract, `Recipe`: all that analyze.py, the analysis engine and the API ask of a model family's
recipe (dit.py, pixart.py, sd3.py, flux.py, latte.py, cogvideox.py, mochi.py, opensora.py: each has these members
and inherits nothing); then what they share."""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from minidit.attention import AttentionLayer
from minidit.errors import MiniditError
from minidit.schedulers.cogvideox_ddim import CogVideoXDDIM
from minidit.schedulers.ddim import DDIM
from minidit.schedulers.dpm_solver import DPMSolver
from minidit.schedulers.flow import FlowMatchEuler
from minidit.schedulers.rflow import RFlow
from minidit.vae.autoencoder_kl import AutoencoderKLDecoder

Scheduler = DDIM | DPMSolver | FlowMatchEuler | CogVideoXDDIM | RFlow
# Every option a recipe may take: a keyword argument of its constructor, and the analyze.py flag of the same name
# (max_sequence_length is --max-sequence-length). Not given (None) means the model's default.
OPTIONS = ("convention", "height", "width", "frames", "max_sequence_length", "cross_attention", "dynamic_cfg")


class Recipe(Protocol):
    """A model family sampled as its reference pipeline does; the ClassVars are read before building (loading) one."""

    name: ClassVar[str]  # the family, in messages
    options: ClassVar[tuple[str, ...]]  # the OPTIONS its constructor takes; analyze.py refuses the other flags
    schedulers: ClassVar[tuple[str, ...]]  # the --scheduler names it can make
    default_scheduler: ClassVar[str]
    decodes: ClassVar[bool]  # whether decode() exists (--save-images); False while a decoder is missing (a 3D VAE)
    default_steps: int  # the reference pipeline's defaults, which may depend on the weights (FLUX schnell)
    default_guidance: float  # <= 1: the conditional branch alone
    model: torch.nn.Module  # the backbone, where the recorder attaches
    device: str

    def __init__(self, folder: Path, *, dtype: torch.dtype, device: str) -> None: ...  # + its options, as keywords
    def default_prompts(self) -> list[str]: ...  # a run's prompts when no prompt file is given
    def parse_prompt(self, prompt: str) -> object: ...  # as the model takes it (DiT: a class id), or an error
    def make_scheduler(self, name: str, steps: int) -> Scheduler: ...
    def branches(self, guidance: float) -> tuple[str, ...]: ...  # the batch's halves in order ("cond" alone)
    def attention_layers(self) -> list[AttentionLayer]: ...  # the recorded layers, in the model's order
    def manifest_fields(self) -> dict: ...  # manifest.json's "resolution", "frames" (None: images), and what else the
    # samples depend on: DiT's "convention", the T5 length "max_sequence_length", CogVideoX's "dynamic_cfg"
    def prepare(self, prompts: list[str]) -> None: ...  # before a run's prompts: e.g. encode them, free the encoders
    def batch_key(self, prompt: str) -> object: ...  # prompts sampled in one batch share it (Latte: its text length)
    def generate(self, prompts: list[str], seed: int, scheduler: Scheduler, guidance: float) -> torch.Tensor: ...
    # ^ the prompts' final latents (P, ...), sampled in one batch, each prompt from the noise of `seed`
    def decode(self, latents: torch.Tensor) -> np.ndarray: ...  # uint8 images (B, H, W, 3), videos (B, T, H, W, 3)


# ---- shared by the recipes -------------------------------------------------------------------------------------

def initial_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """The reference pipelines' draw: torch.randn of `shape` from a CPU generator seeded with `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def prompt_noise(prompts: int, shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                 device: str | torch.device) -> torch.Tensor:
    """The initial latents of a batch of `prompts` prompts, (prompts, *shape): each prompt's is the reference
    pipeline's draw for one sample from `seed` (the study gives every prompt the same seed), so a prompt's
    sample does not depend on the batch it runs in."""
    return initial_noise((1, *shape), seed, dtype, device).expand(prompts, *shape).contiguous()


def same_batch(self: Recipe, prompt: str) -> None:
    """batch_key of the recipes whose prompts can share any batch (their inputs have the same shapes)."""
    return None


def guided(uncond: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + g (cond - uncond)."""
    return uncond + guidance * (cond - uncond)


def t5_dtype(dtype: torch.dtype) -> torch.dtype:
    """NOTE(official): T5 v1.1 overflows in fp16; with an fp16 backbone the encoder runs in bf16."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def latent_scale(vae: AutoencoderKLDecoder) -> int:
    """Pixels per latent cell of a VAE decoder: 8 for the SD VAEs."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_size(height: int | None, width: int | None, default: int, multiple: int, name: str) -> tuple[int, int]:
    """--height and --width (the model's `default` side where not given), positive multiples of `multiple`."""
    size = (default if height is None else height, default if width is None else width)
    if min(size) < multiple or any(side % multiple for side in size):
        what = "positive" if multiple == 1 else f"positive multiples of {multiple}"
        raise MiniditError(f"--height and --width must be {what} for {name}, got {size}")
    return size


def video_frames(frames: int | None, default: int, temporal: int, name: str) -> int:
    """--frames (the model's `default` where not given): temporal k + 1 frames, k >= 0 (a causal video VAE keeps the
    first frame and compresses every `temporal` frames after it into one latent frame: CogVideoX 4, Mochi 6)."""
    frames = default if frames is None else frames
    if frames < 1 or (frames - 1) % temporal:
        examples = ", ".join(str(temporal * k + 1) for k in range(4))
        raise MiniditError(f"--frames must be {temporal}k+1 for {name} ({examples}, ...; default {default}), got "
                           f"{frames}: its VAE compresses {temporal} frames into one latent frame after the first")
    return frames


def text_length(length: int | None, default: int, maximum: int | None, name: str) -> int:
    """--max-sequence-length (`default` where not given), from 1 to `maximum` tokens (None: no maximum)."""
    length = default if length is None else length
    if length < 1 or maximum is not None and length > maximum:
        what = "at least 1" if maximum is None else f"between 1 and {maximum}"
        raise MiniditError(f"--max-sequence-length must be {what} for {name}, got {length}")
    return length


# ---- text-to-image: prompts encoded once, guidance on the batch [uncond; cond] -----------------------------------

# The prompts of a text-to-image run when no --prompts file is given (PixArt, SD3, FLUX)
TEXT_PROMPTS = (
    "a red fox sitting in fresh snow at dawn, soft light",
    "an astronaut riding a horse on the moon, photorealistic",
    "a bowl of ramen with a soft-boiled egg, top view",
    "a watercolor painting of a lighthouse on a rocky coast",
    "a futuristic city skyline at night with neon signs, rain",
    "a close-up portrait of an old fisherman with a grey beard",
    "a cozy reading room with bookshelves and a fireplace",
    "a macro photo of a dew-covered spider web in a garden",
)
# The prompts of a video run when no --prompts file is given: scenes with motion (CogVideoX, Open-Sora, Mochi)
VIDEO_PROMPTS = (
    "a red fox running through fresh snow in a pine forest, slow motion",
    "waves crashing on a rocky coast at sunset, aerial view",
    "a chef tossing vegetables in a wok over a high flame",
    "a hot air balloon rising over green hills at dawn",
    "a cat chasing a ball of yarn across a wooden floor",
    "rain falling on a busy city street at night, neon reflections",
    "a paper boat drifting down a small stream in autumn",
    "a hummingbird hovering at a red flower, close-up",
)
NEGATIVE_PROMPT = ""  # the unconditional branch (PixArt, SD3) is the encoding of the empty prompt
Encoding = tuple[torch.Tensor, ...]  # a prompt's text tensors, e.g. T5 states and their mask
Predict = Callable[[torch.Tensor, float], torch.Tensor]  # the backbone's output for latents x at scheduler time t


def t5_with_mask(tokenizer, text_encoder, text: str, length: int, dtype: torch.dtype, device: str | torch.device,
                 *, clean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """PixArt's, Latte's, Mochi's and Open-Sora's T5 input: `length` tokens run with the attention mask, the text
    lower-cased and stripped first with `clean` (what PixArt's and Latte's clean_caption does without bs4 and ftfy;
    Mochi's pipeline uses the prompt as given, Open-Sora's recipe cleans it itself). T5 states (1, Lt, 4096) in
    `dtype`, and the mask (1, Lt)."""
    ids, mask = tokenizer([text.lower().strip() if clean else text], length)
    states = text_encoder(ids.to(device), mask.to(device))
    return states.to(dtype), mask.to(device)


def encode_once(cache: dict[str, Encoding], texts: Iterable[str], encode: Callable[[str], Encoding],
                desc: str) -> None:
    """Encode every text not yet in `cache` (a progress bar when there are several) and keep it on the host, so
    that the recipe can release its text encoders before sampling (T5-XXL alone is 9.5 GB in bf16)."""
    todo = [text for text in dict.fromkeys(texts) if text not in cache]
    for text in tqdm(todo, desc=desc, disable=None if len(todo) > 1 else True):
        cache[text] = tuple(v.cpu() for v in encode(text))


def encode_and_release(self: Recipe, texts: list[str], encoders: tuple[str, ...] = ("text_encoder",),
                       desc: str = "T5") -> None:
    """prepare() of the text recipes: every text encoded once by the recipe's `_encode` into its `embeddings` (on the
    host), then its text encoders (these attributes) released, so that only the backbone stays on the accelerator."""
    encode_once(self.embeddings, texts, self._encode, desc)
    for name in encoders:
        setattr(self, name, None)
    torch.cuda.empty_cache()  # else the caching allocator keeps the encoders' memory


def prepare_t5(self: Recipe, prompts: list[str]) -> None:
    """prepare() of the T5 recipes whose unconditional branch is the empty prompt (PixArt, Latte, CogVideoX, Mochi)."""
    encode_and_release(self, [NEGATIVE_PROMPT, *prompts])


def from_cache(cache: dict[str, Encoding], text: str, device: str | torch.device, encode: Callable[[str], Encoding],
               released: bool) -> Encoding:
    """The cached encoding of `text` on `device`, or a fresh one when it was not prepared (the encoders are kept)."""
    if text in cache:
        return tuple(v.to(device) for v in cache[text])
    if released:
        raise MiniditError(f"the text encoders were released after prepare(); {text!r} was not among its prompts")
    return encode(text)


# default_prompts, parse_prompt (any text) and branches (of the batches below) of the text-to-image and video recipes
def text_prompts(self: Recipe) -> list[str]:
    return list(TEXT_PROMPTS)


def video_prompts(self: Recipe) -> list[str]:
    return list(VIDEO_PROMPTS)


def as_given(self: Recipe, prompt: str) -> str:
    return prompt


def uncond_cond(self: Recipe, guidance: float) -> tuple[str, ...]:
    return ("uncond", "cond") if guidance > 1 else ("cond",)


def text_batch(encode: Callable[[str], Encoding], prompts: list[str], guidance: float) -> Encoding:
    """The prompts' encodings, each tensor stacked over the prompts; with guidance, in the batch
    [negative prompt x P; prompts]."""
    texts = prompts if guidance <= 1 else [NEGATIVE_PROMPT] * len(prompts) + prompts
    return tuple(torch.cat(parts) for parts in zip(*(encode(text) for text in texts)))


def with_guidance(predict: Predict, guidance: float) -> Predict:
    """`predict` run on [x; x] against a `text_batch`, its halves combined by `guided`; alone without guidance."""
    if guidance <= 1:
        return predict

    def guided_predict(x: torch.Tensor, t: float) -> torch.Tensor:
        uncond, cond = predict(torch.cat([x, x]), t).chunk(2)
        return guided(uncond, cond, guidance)

    return guided_predict
