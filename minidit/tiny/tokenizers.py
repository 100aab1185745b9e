"""Tokenizers built from a caption set, in the Hub files of the real ones, so minidit's own tokenizer code (and
transformers') reads them unchanged:

- `write_clip_tokenizer`: a byte-level BPE in OpenAI CLIP's files (vocab.json, merges.txt, the two JSON configs of
  FLUX.1-dev's `tokenizer/`): the 512 byte symbols in CLIP's order, the merges learned here on the captions' words
  (most frequent pair first, until every word is one token), then `<|startoftext|>` and `<|endoftext|>` as the two
  highest ids, as in CLIP-L, so the legacy argmax pooling (eos_token_id 2 in the config) finds the end of text;
- `write_t5_tokenizer`: a sentencepiece unigram model trained on the captions with T5's conventions (`<pad>` 0,
  `</s>` 1, `<unk>` 2, no `<s>`, the nmt_nfkc normalisation, a dummy prefix), plus 100 sentinels, in the files of
  FLUX.1-dev's `tokenizer_2/` except tokenizer.json (the fast tokenizer's file, which transformers derives from
  spiece.model; minidit reads spiece.model).
"""

import collections
import io
import json
from pathlib import Path

from minidit.text.clip_tokenizer import BOS, BYTE_SYMBOLS, END_OF_WORD, EOS, normalize, split_words

CLIP_MAX_LENGTH = 77
T5_EXTRA_IDS = 100


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- CLIP: byte-level BPE ------------------------------------------------------------------------------

def learn_bpe(texts: list[str]) -> list[tuple[str, str]]:
    """Merges, best first: the most frequent adjacent pair (ties: the first in sorted order) over the words of
    `texts`, each word as byte symbols with `</w>` glued to the last, until every word is a single symbol."""
    counts = collections.Counter(w for text in texts for w in split_words(normalize(text)))
    words = {w: [BYTE_SYMBOLS[b] for b in w.encode("utf-8")] for w in counts}
    for symbols in words.values():
        symbols[-1] += END_OF_WORD
    merges = []
    while True:
        pairs = collections.Counter()
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, symbols in words.items():
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i:i + 2]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[w] = merged


def _added_token(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write_clip_tokenizer(texts: list[str], folder: Path) -> int:
    """vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json; returns the vocabulary size."""
    symbols = sorted(BYTE_SYMBOLS)  # CLIP's order: the printable bytes (themselves) first, then U+0100...
    merges = learn_bpe(texts)
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merge result repeats a vocabulary entry"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *(" ".join(m) for m in merges)]) + "\n",
                                       encoding="utf-8")
    # BOS is an added token looked for after normalisation, EOS before it (as in FLUX.1-dev's files)
    special = {"bos_token": _added_token(BOS, True), "eos_token": _added_token(EOS, False),
               "pad_token": _added_token(EOS, False), "unk_token": _added_token(EOS, False)}
    _write_json(folder / "special_tokens_map.json", special)
    decoder = {str(vocab[t]): {**_added_token(t, t == BOS), "special": True} for t in (BOS, EOS)}
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": BOS,
        "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": EOS, "errors": "replace",
        "model_max_length": CLIP_MAX_LENGTH, "pad_token": EOS, "tokenizer_class": "CLIPTokenizer", "unk_token": EOS})
    return len(vocab)


# ---- T5: sentencepiece unigram -------------------------------------------------------------------------

def write_t5_tokenizer(texts: list[str], folder: Path, *, vocab_size: int, max_length: int) -> int:
    """spiece.model, special_tokens_map.json, tokenizer_config.json (`model_max_length` = the sequence length the
    model was trained with); returns the vocabulary size with the sentinels (the T5 embedding's rows)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc", character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    sentinels = [f"<extra_id_{k}>" for k in range(T5_EXTRA_IDS)]
    _write_json(folder / "special_tokens_map.json", {"additional_special_tokens": sentinels, "eos_token": "</s>",
                                                     "pad_token": "<pad>", "unk_token": "<unk>"})
    specials = {0: "<pad>", 1: "</s>", 2: "<unk>"} | {pieces + T5_EXTRA_IDS - 1 - k: s for k, s in enumerate(sentinels)}
    decoder = {str(i): {"content": s, "lstrip": s.startswith("<extra"), "normalized": False,
                        "rstrip": s.startswith("<extra"), "single_word": False, "special": True}
               for i, s in sorted(specials.items())}
    _write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": decoder, "additional_special_tokens": sentinels, "clean_up_tokenization_spaces": True,
        "eos_token": "</s>", "extra_ids": T5_EXTRA_IDS, "legacy": True, "model_max_length": max_length,
        "pad_token": "<pad>", "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"})
    return pieces + T5_EXTRA_IDS
