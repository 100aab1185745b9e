"""T5 tokenizer: the `sentencepiece` model `tokenizer/spiece.model` plus T5's special tokens, padded to a fixed length.

This is what the diffusion pipelines do with the prompt (PixArt-α with max_length 120):

    tokenizer(prompt, padding="max_length", max_length=L, truncation=True, add_special_tokens=True)

that is: pieces of the text, cut to L - 1, then `</s>` (id 1), then `<pad>` (id 0) up to L; the mask is 1 on the
pieces and `</s>`. The vocabulary is the sentencepiece pieces (32000 for T5: `<pad>` 0, `</s>` 1, `<unk>` 2, ...)
followed by 100 sentinels, `<extra_id_0>` the last id (32099) and `<extra_id_99>` the first (32000). The special
strings `<pad>`, `</s>`, `<unk>` and `<extra_id_k>` written in a prompt become their ids, as in transformers.

Which T5Tokenizer this follows. The pipelines were released with transformers 4's slow `T5Tokenizer` (PixArt's
`model_index.json` names it; the models were trained with it): sentencepiece itself, in its `legacy` mode where
the text after a special token gets sentencepiece's leading "▁" again. That is what this module does, with
`sentencepiece` alone. In transformers 5 `T5Tokenizer` is another class: a `tokenizers` (Rust) Unigram built from
spiece.model, which is what PixArtAlphaPipeline runs under transformers 5. It gives the same ids, padding and
truncation, except on four kinds of text (tests/test_t5.py pins each one):
- U+0085 (NEXT LINE): transformers 5 splits words on it; sentencepiece keeps it, an unknown piece (id 2);
- combining marks in some graphemes: tokenizers normalises a grapheme of under 6 bytes through its shortest
  normalisable prefix, dropping the rest, and a longer one character by character. So decomposed (NFD) "ệ" =
  e + U+0323 + U+0302 becomes "ẹ", and NFD "é" followed by a skin-tone modifier stays "e" + U+0301.
  sentencepiece composes both ("ệ", "é");
- text that NFKC turns into a special token, e.g. fullwidth "＜/s＞": transformers 5 matches "</s>" (id 1) inside
  the normalised text; sentencepiece never produces control pieces from text;
- ties: sentencepiece finds the best split of the whole text, transformers 5 of each word alone, and where two
  splits score the same (a run such as "lll" = "l" + "ll" = "ll" + "l") the rounding of the running sum picks
  one. On random text with such runs about 1 prompt in 300 differs (measured on the test vocabulary).
Other quirks, the same in all three: runs of whitespace collapse; text is NFKC-normalised (sentencepiece's
`nmt_nfkc` table inside spiece.model); consecutive unknown characters give one `<unk>`; the prompt is not
lower-cased here (PixArt's pipeline lower-cases and strips it before tokenizing: a pipeline step).

Shapes: texts (B strings) -> input_ids (B, L) int64, attention_mask (B, L) int64.
"""

import json
import re
from pathlib import Path

import torch

from minidit.errors import MiniditError

DEFAULT_EXTRA_IDS = 100  # transformers' T5Tokenizer default; tokenizer_config.json may say otherwise


class T5Tokenizer:
    def __init__(self, folder: str | Path):
        """Read a Hub-layout `tokenizer/` folder: spiece.model, and tokenizer_config.json / added_tokens.json if any."""
        import sentencepiece

        folder = Path(folder)
        model = folder / "spiece.model"
        if not model.is_file():
            raise MiniditError(f"{model} is missing: pass the pipeline's tokenizer/ folder (it holds spiece.model)")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
        self.pad_id, self.eos_id, unk_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()
        if min(self.pad_id, self.eos_id, unk_id) < 0:
            raise MiniditError(f"{model} has no <pad>, </s> or <unk> piece: it is not a T5 sentencepiece model")
        config = _optional_json(folder / "tokenizer_config.json")
        n, extra_ids = self.sp.get_piece_size(), int(config.get("extra_ids", DEFAULT_EXTRA_IDS))
        self.special = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, unk_id)}
        self.special |= {f"<extra_id_{k}>": n + extra_ids - 1 - k for k in range(extra_ids)}
        self.special |= _optional_json(folder / "added_tokens.json")  # the Hub's own list, where it ships one
        self.vocab_size = max(n - 1, *self.special.values()) + 1
        # longest first, so that <extra_id_10> is not read as <extra_id_1> followed by "0>"
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without `</s>` and padding."""
        ids = []
        for part in self._split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                # NOTE(official): legacy mode: each piece of text between special tokens is encoded on its own,
                # so it starts with sentencepiece's "▁" again ("</s>." -> "</s>", "▁", ".").
                ids += self.sp.encode(part)
        return ids

    def __call__(self, texts: str | list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both (B, max_length): cut to max_length - 1 pieces, `</s>`, padding."""
        if max_length < 1:
            raise MiniditError(f"max_length must be at least 1 (room for </s>), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: max_length - 1] + [self.eos_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask


def _optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniditError(f"{path} is not valid JSON ({e}); download the tokenizer again") from None
