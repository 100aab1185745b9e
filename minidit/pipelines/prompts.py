"""Text encodings computed once per prompt and kept in host memory, so that a text-to-image recipe can release its
text encoders before sampling (T5-XXL alone is 9.5 GB in bf16). Used by the PixArt, SD3 and FLUX recipes:

    encode_once(self.embeddings, [negative, *prompts], self._encode, "T5")   # in prepare(), then drop the encoders
    text, mask = from_cache(self.embeddings, prompt, self.device, self._encode)
"""

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

Encoding = tuple[torch.Tensor, ...]


def encode_once(cache: dict[str, Encoding], texts: Iterable[str], encode: Callable[[str], Encoding],
                desc: str) -> None:
    """Encode every text not yet in `cache` (a progress bar when there are several) and keep it on the host."""
    todo = [text for text in dict.fromkeys(texts) if text not in cache]
    for text in tqdm(todo, desc=desc, disable=None if len(todo) > 1 else True):
        cache[text] = tuple(v.cpu() for v in encode(text))


def from_cache(cache: dict[str, Encoding], text: str, device: str | torch.device,
               encode: Callable[[str], Encoding]) -> Encoding:
    """The cached encoding of `text` on `device`, or a fresh one when it was not prepared."""
    if text in cache:
        return tuple(v.to(device) for v in cache[text])
    return encode(text)


def free_accelerator_memory() -> None:
    """Return the released encoders' memory to the GPU (the caching allocator keeps it otherwise)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
