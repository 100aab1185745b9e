"""CLIP tokenizer: OpenAI's byte-level BPE from a Hub `tokenizer/` folder (vocab.json, merges.txt), in plain Python.

SD3 tokenizes each prompt twice with it (`tokenizer` for CLIP-L, `tokenizer_2` for OpenCLIP bigG), FLUX once (CLIP-L).
The pipelines' call is

    tokenizer(prompt, padding="max_length", max_length=77, truncation=True)

which gives `<|startoftext|>` (49406), at most 75 BPE tokens, `<|endoftext|>` (49407), then the pad token up to 77;
the attention mask is 1 up to and including `<|endoftext|>`. The pad token is the folder's: SD3's `tokenizer/` and
FLUX's pad with `<|endoftext|>` (49407), SD3's `tokenizer_2/` with `!` (id 0), as OpenCLIP pads with zeros.

The files (checkpoints.md §11.4). vocab.json maps 49408 strings to ids: the 256 byte symbols (below), the same with
`</w>` (end of word), the 48894 merge results in merge order, then `<|startoftext|>` and `<|endoftext|>`.
merges.txt is a `#version: 0.2` line, then one merge `a b` per line, best (lowest rank) first.
special_tokens_map.json and tokenizer_config.json name the special tokens; tokenizer_config.json's
`added_tokens_decoder` lists the "added tokens" that are matched in the raw text before anything else.

Which CLIPTokenizer this follows. Three implementations exist and they differ on some text:
- OpenAI's `simple_tokenizer.py` and open_clip (what CLIP-L and bigG were trained with): ftfy.fix_text, HTML
  unescaping, whitespace collapsed, `str.lower()`; special tokens only through the regex below.
- transformers 4's slow (Python) CLIPTokenizer, which SD3 was released with: with ftfy installed, ftfy.fix_text,
  whitespace collapsed, `str.lower()`; without ftfy (its usual state: ftfy is no dependency), BERT's BasicTokenizer
  instead: control and format characters (U+200B, U+00AD, ...) deleted, a space put around every CJK ideograph
  (so "東京" is two words), NFC, `str.lower()`.
- transformers 4's CLIPTokenizerFast and transformers 5's CLIPTokenizer (in transformers 5 the only one;
  `CLIPTokenizerFast` is a name for the same class): the `tokenizers` library, with no ftfy in any case.
This module follows the last: it is what SD3's and FLUX's pipelines run under transformers 5, the version minidit's
reference tests pin. tests/test_clip_tokenizer.py lists where transformers 4's slow tokenizer differs. Step by step:
1. added tokens: those with `normalized: false` (`<|endoftext|>`, and SD3's `!` in `tokenizer_2`) are cut out of
   the raw text first and become their ids, so in SD3's `tokenizer_2` every "!" is id 0 rather than BPE's "!</w>";
2. normalization of the rest: NFC, then lower case character by character (so a final capital sigma becomes "σ",
   not Python's word-final "ς"); whitespace only separates words, so collapsing it changes nothing;
3. added tokens with `normalized: true` (`<|startoftext|>` in the Hub files) are cut out of the normalized text;
4. words: the regex of OpenAI's CLIP,
       <\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+
   i.e. at each non-space character the first alternative that matches: a special token written out (left over
   when step 1 or 3 did not take it, e.g. "<|ENDOFTEXT|>" lower-cased), a contraction, a run of letters, ONE
   digit, or a run of other characters. `\\s`, `\\p{L}` and `\\p{N}` are Unicode's White_Space, letter and number
   classes (Oniguruma's, which transformers uses; Python's `str.isspace` also counts U+001C..U+001F). Written here
   as a scanner over `unicodedata.category`, so minidit needs no `regex` package. NOTE(official): transformers'
   byte-level step then splits a written-out special token again, into "<|", its name, "|>";
5. each word as UTF-8 bytes, each byte as one printable character (`BYTE_SYMBOLS`), `</w>` glued to the last one;
6. BPE: merge the adjacent pair with the lowest rank in merges.txt, until no pair has one; look the pieces up.
Where the Unicode tables differ, so do the ids (tests/test_clip_tokenizer.py pins each kind). `tokenizers`' NFC
tables are older than Python's: 98 combining marks of recent Unicode versions (e.g. U+08D0, U+1AC4) are put in
canonical order here and not there, and one recent composite (U+11938) is composed here only. Its regex classes are
newer than Python 3.11's `unicodedata` (Unicode 14.0; the regex knows Unicode 16.0's letters): the 9300 code points
assigned since (e.g. CJK extension H) are "other" characters here and letters or numbers there, until a newer
Python. Ordinary prompts hold none of these.

Shapes: texts (B strings) -> input_ids (B, L) int64, attention_mask (B, L) int64, L = 77 by default.
"""

import functools
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from minidit.errors import MiniditError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # CLIP's position table
# transformers' CLIPTokenizer defaults, used where the folder names no special token
DEFAULT_SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # in the regex's order
SPACE_CATEGORIES = {"Zs", "Zl", "Zp"}
SPACE_CONTROLS = set("\t\n\x0b\x0c\r\x85")  # the control characters in Unicode's White_Space
BPE_CACHE_SIZE = 1 << 16  # distinct words remembered; a prompt set rarely has more


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte value 0..255, as GPT-2 and CLIP define it.

    Bytes that are printable Latin-1 characters other than space and soft hyphen stand for themselves; the other
    68 bytes, in increasing order, take the characters U+0100, U+0101, ... (so the space byte is "Ġ").
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}
    return [symbols[b] for b in range(256)]


BYTE_SYMBOLS = _byte_symbols()


def _is_space(ch: str) -> bool:
    return ch in SPACE_CONTROLS or unicodedata.category(ch) in SPACE_CATEGORIES


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "N"


def split_words(text: str) -> list[str]:
    """Step 4: the words of normalized text, as CLIP's regex and transformers' byte-level split find them."""
    words, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if _is_space(ch):
            i += 1
            continue
        special = next((s for s in (BOS, EOS) if text.startswith(s, i)), None)
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if special:
            words += ["<|", special[2:-2], "|>"]  # NOTE(official): the byte-level split cuts it in three
            j = i + len(special)
        elif contraction:
            j = i + len(contraction)
        elif _is_letter(ch):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(ch):
            j = i + 1
        else:
            j = i + 1
            while j < n and not (_is_space(text[j]) or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        if not special:
            words.append(text[i:j])
        i = j
    return words


def normalize(text: str) -> str:
    """Step 2: NFC, then each character lower-cased on its own (as `tokenizers`' Lowercase does)."""
    return "".join(ch.lower() for ch in unicodedata.normalize("NFC", text))


@dataclass(frozen=True)
class AddedToken:
    """A string matched as a whole before BPE; `normalized` says whether it is looked for after normalization."""

    content: str
    id: int
    normalized: bool


class CLIPTokenizer:
    def __init__(self, folder: str | Path, pad_token: str | None = None):
        """Read a Hub-layout `tokenizer/` folder: vocab.json, merges.txt, and special_tokens_map.json /
        tokenizer_config.json where present. `pad_token` (a string of the vocabulary, e.g. "!") overrides the
        folder's pad token, as `CLIPTokenizer.from_pretrained(folder, pad_token=...)` does."""
        folder = Path(folder)
        self.vocab = _read_vocab(folder / "vocab.json")
        self.ranks = _read_merges(folder / "merges.txt", self.vocab)
        config = _optional_json(folder / "tokenizer_config.json")
        added = _added_tokens(config, folder)
        special = _special_tokens(config, _optional_json(folder / "special_tokens_map.json"))
        if pad_token is not None:
            special["pad_token"] = (pad_token, False)  # a new special token, as transformers makes it
        for name, (content, normalized) in special.items():
            if content in added:
                continue
            if content not in self.vocab:
                raise MiniditError(f"{folder}: the {name} {content!r} is not in vocab.json; pass a token of the "
                                   "vocabulary (SD3 pads with '<|endoftext|>' or '!')")
            added[content] = AddedToken(content, self.vocab[content], normalized)
        self.added = added
        ids = {name: added[content].id for name, (content, _) in special.items()}
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self.vocab_size = max(max(self.vocab.values()), *(t.id for t in added.values())) + 1
        self._bpe = functools.lru_cache(maxsize=BPE_CACHE_SIZE)(self._merge_word)

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """Steps 5-6 for one word: its BPE token ids."""
        symbols = [BYTE_SYMBOLS[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # every occurrence of the pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.vocab[s] for s in symbols)

    def _split_added(self, text: str, normalized: bool) -> list[str | AddedToken]:
        """Cut the added tokens of one kind out of text, leftmost first and longest first at one place."""
        tokens = sorted((t for t in self.added.values() if t.normalized == normalized), key=lambda t: -len(t.content))
        parts, start, i = [], 0, 0
        while i < len(text):
            token = next((t for t in tokens if text.startswith(t.content, i)), None)
            if token is None:
                i += 1
                continue
            parts += [text[start:i], token]
            i = start = i + len(token.content)
        return [p for p in [*parts, text[start:]] if p != ""]

    def encode(self, text: str) -> list[int]:
        """The token ids of one text, without `<|startoftext|>`, `<|endoftext|>`, truncation or padding."""
        ids = []
        for raw in self._split_added(text, normalized=False):
            if isinstance(raw, AddedToken):
                ids.append(raw.id)
                continue
            for part in self._split_added(normalize(raw), normalized=True):
                if isinstance(part, AddedToken):
                    ids.append(part.id)
                else:
                    for word in split_words(part):
                        ids += self._bpe(word)
        return ids

    def __call__(self, texts: str | list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both (B, max_length): `<|startoftext|>`, at most max_length - 2 tokens,
        `<|endoftext|>`, then the pad token; the mask is 1 up to and including `<|endoftext|>`."""
        if max_length < 2:
            raise MiniditError(f"max_length must be at least 2 (<|startoftext|> and <|endoftext|>), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text)[: max_length - 2], self.eos_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask


# ---- reading the folder ---------------------------------------------------------------------------------

def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise MiniditError(f"{path} is missing: pass the pipeline's tokenizer/ folder (it holds vocab.json and "
                           "merges.txt)")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniditError(f"{path} is not valid JSON ({e}); download the tokenizer again") from None
    if not (isinstance(vocab, dict) and vocab and all(isinstance(i, int) and i >= 0 for i in vocab.values())):
        raise MiniditError(f"{path} is not a vocabulary: expected one JSON object mapping tokens to ids")
    missing = [s for s in BYTE_SYMBOLS + [s + END_OF_WORD for s in BYTE_SYMBOLS] if s not in vocab]
    if missing:
        raise MiniditError(f"{path} lacks {len(missing)} of the 512 byte symbols (e.g. {missing[0]!r}): it is "
                           "not a CLIP byte-level BPE vocabulary")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int]) -> dict[tuple[str, str], int]:
    """merges.txt as {(a, b): rank}, rank 0 the first merge after the `#version` line."""
    if not path.is_file():
        raise MiniditError(f"{path} is missing: pass the pipeline's tokenizer/ folder (it holds vocab.json and "
                           "merges.txt)")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise MiniditError(f"{path} is not UTF-8 text ({e}); download the tokenizer again") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    ranks = {}
    for number, line in enumerate(lines, start=2):
        if not line:
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not all(pair):
            raise MiniditError(f"{path}, line {number}: expected a merge 'a b', got {line!r}")
        if any(s not in vocab for s in (*pair, pair[0] + pair[1])):
            raise MiniditError(f"{path}, line {number}: the merge {line!r} uses or makes a token that vocab.json "
                               "lacks: vocab.json and merges.txt are from different tokenizers")
        ranks.setdefault(pair, len(ranks))
    if not ranks:
        raise MiniditError(f"{path} holds no merges")
    return ranks


def _added_tokens(config: dict, folder: Path) -> dict[str, AddedToken]:
    """tokenizer_config.json's `added_tokens_decoder`: {id: {"content", "normalized", ...}}."""
    added = {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit()):
            raise MiniditError(f"{folder}/tokenizer_config.json: added_tokens_decoder[{key!r}] is not "
                               "{'content': ..., ...} under an integer id")
        if any(entry.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
            raise MiniditError(f"{folder}/tokenizer_config.json: the added token {entry['content']!r} sets lstrip, "
                               "rstrip or single_word, which CLIP's files never do and minidit does not implement")
        normalized = entry.get("normalized", not entry.get("special", False))  # tokenizers' default
        added[entry["content"]] = AddedToken(entry["content"], int(key), bool(normalized))
    return added


def _special_tokens(config: dict, special_map: dict) -> dict[str, tuple[str, bool]]:
    """{name: (content, normalized)} for bos, eos, unk and pad.

    As transformers 5 reads them: tokenizer_config.json, overridden by special_tokens_map.json only when the config
    has no `added_tokens_decoder` (then a dict entry carries its `normalized` flag). A token not yet an added token
    becomes one, matched in the raw text (`normalized` false)."""
    sources = [config] if "added_tokens_decoder" in config else [config, special_map]
    special = {}
    for name, default in DEFAULT_SPECIAL_TOKENS.items():
        value = default
        for source in sources:
            value = source.get(name) or value
        content, normalized = (value.get("content"), value.get("normalized", False)) if isinstance(value, dict) \
            else (value, False)
        if not isinstance(content, str) or not content:
            raise MiniditError(f"the {name} in tokenizer_config.json / special_tokens_map.json is not a string: "
                               f"{value!r}")
        special[name] = (content, bool(normalized))
    return special


def _optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniditError(f"{path} is not valid JSON ({e}); download the tokenizer again") from None
    if not isinstance(content, dict):
        raise MiniditError(f"{path} is not a JSON object")
    return content
