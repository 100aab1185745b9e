"""CLIP tokenizer (SD3's tokenizer and tokenizer_2, FLUX's tokenizer): minidit against transformers, real vocabulary.

The folders in fixtures/clip_tokenizer/ hold OpenAI's real 49,408-entry vocabulary, rebuilt by
tests/reference/generate_clip_tokenizer.py from the merges open_clip ships, with SD3's config files. Each
comparison runs against:
- "fixture": the ids and masks stored by the generator (transformers 5.23.0, see fixtures/clip_tokenizer/VERSIONS.json);
- "live": transformers' CLIPTokenizer loaded now from the same folders (skipped without transformers).
Every expected id comes from the reference; the call is SD3's and FLUX's (padding="max_length", max_length=77,
truncation=True).

Which reference. SD3's and FLUX's pipelines load `CLIPTokenizer` (diffusers' pipeline_stable_diffusion_3.py and
pipeline_flux.py). In transformers 5 that is the only CLIP tokenizer, backed by the `tokenizers` library, and
`CLIPTokenizerFast` is another name for it: the generator calls both and they agree on every case. transformers 4's
slow, pure-Python CLIPTokenizer (SD3's release) is gone; run by hand on these fixtures (transformers 4.57.1), it
differs on 6 of the 35 texts below, without ftfy as with it, and on 59% (without) and 67% (with ftfy) of the 200
random strings, which are dense in rare characters:
- without ftfy (BERT's BasicTokenizer): each CJK ideograph is its own word ("東京" -> "東</w>", "京</w>"); format
  and control characters are deleted (the ZWJ inside emoji sequences, U+200B, U+00AD, U+0000, U+0007,
  U+001C..U+001F, U+FFFD), and U+0085, U+000B, U+000C with them instead of separating words;
- with ftfy: HTML entities unescaped, curly quotes straightened (so "it’s" has the contraction "'s"), fullwidth
  letters and ligatures folded ("ＡＢＣ" -> "abc", "ﬁ" -> "fi"), U+0085 read as a Windows-1252 "…", U+0000,
  U+0007, U+000B and U+001C..U+001F deleted;
- both: a word-final capital sigma becomes "ς" (Python's `str.lower`), not "σ"; "<|ENDOFTEXT|>" in any case
  becomes id 49407 (OpenAI's tokenizer does the same), where transformers 5 spells it out ("<", "|</w>", ...).
transformers 4's CLIPTokenizerFast (tokenizers 0.22.1) agrees with transformers 5 on all 35 texts and differs on 5
(tokenizer) and 4 (tokenizer_2) random strings, each with a written-out "<|ENDOFTEXT|>" directly followed by a
character that is neither a letter nor a digit.
minidit follows transformers 5 exactly, except where the Unicode tables differ (`test_known_differences`).
"""

import json
import shutil
import subprocess
import sys
import unicodedata
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import ROOT, installed, reference_generator

from minidit.errors import MiniditError
from minidit.text.clip_tokenizer import BYTE_SYMBOLS, CLIPTokenizer, normalize, split_words

FIXTURES = ROOT / "tests" / "fixtures" / "clip_tokenizer"
TOKENIZER, TOKENIZER_2 = FIXTURES / "tokenizer", FIXTURES / "tokenizer_2"
BOS_ID, EOS_ID, BANG_ID = 49406, 49407, 0  # checkpoints.md §11.4: <|startoftext|>, <|endoftext|>, "!"
HUB_BYTES = {"vocab.json": 1_059_962, "merges.txt": 524_619}  # the Hub shows 1.06 MB and 525 kB (checkpoints.md §3.1)
CONFIG_BYTES = {("tokenizer", "special_tokens_map.json"): 588, ("tokenizer", "tokenizer_config.json"): 705,
                ("tokenizer_2", "special_tokens_map.json"): 576, ("tokenizer_2", "tokenizer_config.json"): 856}

LIVE = pytest.mark.skipif(not installed("transformers"), reason="transformers is not installed: the live CLIP "
                          "tokenizer cases are skipped (the stored-fixture cases still run)")
LIVE_PIPELINES = pytest.mark.skipif(not installed("diffusers"), reason="diffusers is not installed")
LIVE_REGEX = pytest.mark.skipif(not installed("regex"), reason="the regex package is not installed")
# OpenAI's simple_tokenizer.py pattern, which transformers' CLIPTokenizer also splits words with
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SOURCES = [pytest.param("fixture"), pytest.param("live", marks=LIVE)]
VARIANTS = ["tokenizer", "tokenizer_2", "bare", "tokenizer+pad!"]

G = reference_generator("generate_clip_tokenizer")


@cache
def stored_cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Variant name -> (folder, keyword arguments), as the generator defines them; `bare` is built here."""
    return G.variants(G.bare_folder(tmp_path_factory.mktemp("clip-bare")))


@cache
def tokenizer(folder: Path, pad_token: str | None = None) -> CLIPTokenizer:
    return CLIPTokenizer(folder, pad_token=pad_token)


@cache
def live_tokenizer(folder: Path, pad_token: str | None = None):
    return G.reference_tokenizer(folder, **({"pad_token": pad_token} if pad_token else {}))


def expected(source: str, folder: Path, kwargs: dict, stored: list[dict], texts: list[str], max_length: int):
    if source == "fixture":
        return [c["input_ids"] for c in stored], [c["attention_mask"] for c in stored]
    return G.reference_tokenize(live_tokenizer(folder, **kwargs), texts, max_length)


def assert_rows(texts, ids, mask, expected_ids, expected_mask):
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (len(texts), len(expected_ids[0]))
    for row, text in enumerate(texts):
        assert ids[row].tolist() == expected_ids[row], text
        assert mask[row].tolist() == expected_mask[row], text


# ---- parity ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("source", SOURCES)
def test_parity(source, variant, folders):
    """35 texts (contractions, numbers, punctuation, "!", accents, NFD, CJK, Cyrillic, Greek, emoji, Unicode
    spaces, control characters, special tokens written out, empty, truncation at 75 tokens) in one batch, on SD3's
    tokenizer/ and tokenizer_2/, on vocab.json + merges.txt alone, and with pad_token="!" passed explicitly."""
    folder, kwargs = folders[variant]
    cases = stored_cases()
    ids, mask = tokenizer(folder, **kwargs)(cases["texts"], cases["max_length"])
    assert_rows(cases["texts"], ids, mask, *expected(source, folder, kwargs, cases["expected"][variant],
                                                     cases["texts"], cases["max_length"]))


@pytest.mark.parametrize("variant", ["tokenizer", "tokenizer_2"])
@pytest.mark.parametrize("source", SOURCES)
def test_parity_on_random_text(source, variant, folders):
    """200 seeded random strings from a pool of letters, digits, symbols, contractions, CJK, emoji, every kind of
    space, control characters and written-out special tokens in all cases; max_length 40, so many are cut."""
    folder, kwargs = folders[variant]
    random = stored_cases()["random"]
    assert random["texts"] == G.random_texts()
    ids, mask = tokenizer(folder, **kwargs)(random["texts"], random["max_length"])
    assert_rows(random["texts"], ids, mask, *expected(source, folder, kwargs, random["expected"][variant],
                                                      random["texts"], random["max_length"]))


@LIVE
def test_slow_and_fast_names_agree():
    """What the generator asserts on its cases: in transformers 5 `CLIPTokenizerFast` gives CLIPTokenizer's ids."""
    texts = stored_cases()["texts"]
    slow, fast = G.reference_tokenizer(TOKENIZER_2), G.reference_tokenizer(TOKENIZER_2, fast=True)
    assert G.reference_tokenize(slow, texts) == G.reference_tokenize(fast, texts)


@LIVE_PIPELINES
def test_pipelines_load_clip_tokenizer():
    """SD3's tokenizer and tokenizer_2 and FLUX's tokenizer are transformers' CLIPTokenizer, the reference here."""
    import inspect

    import transformers
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    sd3 = inspect.signature(StableDiffusion3Pipeline.__init__).parameters
    flux = inspect.signature(FluxPipeline.__init__).parameters
    assert sd3["tokenizer"].annotation is sd3["tokenizer_2"].annotation is transformers.CLIPTokenizer
    assert flux["tokenizer"].annotation is transformers.CLIPTokenizer


@pytest.mark.parametrize("source", SOURCES)
def test_known_differences(source):
    """Where the Unicode tables of `tokenizers` and of Python differ, minidit reads each DIVERGENT text as the
    reference reads its stored equivalent (see minidit/text/clip_tokenizer.py): newer combining marks put in
    canonical order and a newer composite composed here only, and a Unicode 15 ideograph that Python 3.11 does not
    know (Python 3.12 and later know it, and then agree with transformers)."""
    tok = tokenizer(TOKENIZER)
    for case in stored_cases()["divergent"]:
        theirs, equivalent = case["input_ids"], case["equivalent_input_ids"]
        if source == "live":
            reference = live_tokenizer(TOKENIZER)
            theirs, equivalent = (reference(t).input_ids for t in (case["text"], case["equivalent"]))
        ours = [BOS_ID, *tok.encode(case["text"]), EOS_ID]
        unknown = [ch for ch in case["text"] if unicodedata.category(ch) == "Cn"]
        if case["text"] == "a\U00031350b" and not unknown:
            assert ours == theirs, case["text"]
        else:
            assert ours == equivalent and ours != theirs, case["text"]


# ---- layout -----------------------------------------------------------------------------------------------

def test_layout():
    """Start, at most 75 tokens, end, pad; the mask covers the end token; the two SD3 folders pad differently."""
    cases = stored_cases()
    long_text = G.LONG_PROMPT
    tok, tok_2 = tokenizer(TOKENIZER), tokenizer(TOKENIZER_2)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok_2.pad_id) == (BOS_ID, EOS_ID, EOS_ID, BANG_ID)
    assert tok.vocab_size == tok_2.vocab_size == 49408
    ids, mask = tok([long_text, ""])
    assert len(tok.encode(long_text)) > 75 and mask[0].all()
    assert ids[0].tolist() == [BOS_ID, *tok.encode(long_text)[:75], EOS_ID]
    assert ids[1, :2].tolist() == [BOS_ID, EOS_ID] and mask[1].tolist() == [1, 1] + [0] * 75
    assert (ids[1, 2:] == EOS_ID).all() and (tok_2([""])[0][0, 2:] == BANG_ID).all()
    # "!" is an added token of SD3's tokenizer_2 (id 0); tokenizer reads it with BPE, as the reference does
    row = cases["texts"].index("hello!!! wow! !important !! ! a!b")
    assert cases["expected"]["tokenizer_2"][row]["input_ids"].count(BANG_ID) > 8
    assert BANG_ID not in cases["expected"]["tokenizer"][row]["input_ids"]
    with pytest.raises(MiniditError, match="max_length"):
        tok("a cat", max_length=1)


def test_hub_files():
    """vocab.json and merges.txt have the Hub's sizes; tokenizer_2 shares them and differs in its config files,
    whose sizes are SD3-medium's to the byte."""
    for name, size in HUB_BYTES.items():
        assert (TOKENIZER / name).stat().st_size == size
        assert (TOKENIZER_2 / name).read_bytes() == (TOKENIZER / name).read_bytes()
    for (folder, name), size in CONFIG_BYTES.items():
        assert (FIXTURES / folder / name).stat().st_size == size
    vocab = json.loads((TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert sorted(vocab[s] for s in BYTE_SYMBOLS) == list(range(256))


@LIVE_REGEX
def test_words_match_clips_regex():
    """Step 4 on its own against OpenAI's pattern run by the `regex` package (whose \\s, \\p{L} and \\p{N} are
    Unicode's, as Oniguruma's): every fixture text, after normalization; a written-out special token is the one
    word that transformers' byte-level step cuts again, into "<|", its name, "|>"."""
    import regex

    pattern = regex.compile(CLIP_PATTERN)
    cases = stored_cases()
    for text in cases["texts"] + cases["random"]["texts"]:
        text = normalize(text)
        expected = []
        for word in pattern.findall(text):
            expected += ["<|", word[2:-2], "|>"] if word in ("<|startoftext|>", "<|endoftext|>") else [word]
        assert split_words(text) == expected, text


def test_bpe_cache():
    tok = CLIPTokenizer(TOKENIZER)
    tok.encode("a photograph of a photograph")
    info = tok._bpe.cache_info()
    assert (info.misses, info.hits) == (3, 2)  # "a", "photograph", "of" once each, then "a" and "photograph" again


# ---- bad folders ------------------------------------------------------------------------------------------

def copy_folder(tmp_path: Path, *names: str) -> Path:
    for name in names:
        shutil.copy(TOKENIZER / name, tmp_path / name)
    return tmp_path


def test_missing_files(tmp_path):
    with pytest.raises(MiniditError, match="vocab.json is missing"):
        CLIPTokenizer(tmp_path)
    copy_folder(tmp_path, "vocab.json")
    with pytest.raises(MiniditError, match="merges.txt is missing"):
        CLIPTokenizer(tmp_path)


@pytest.mark.parametrize("content, message", [
    ("{\"a\": 0,", "vocab.json is not valid JSON"),
    ("[\"a\", \"b\"]", "not a vocabulary"),
    ("{\"a\": \"zero\"}", "not a vocabulary"),
    ("{\"a\": 0}", "lacks 511 of the 512 byte symbols"),
])
def test_malformed_vocab(tmp_path, content, message):
    copy_folder(tmp_path, "merges.txt")
    (tmp_path / "vocab.json").write_text(content)
    with pytest.raises(MiniditError, match=message):
        CLIPTokenizer(tmp_path)


@pytest.mark.parametrize("content, message", [
    ("#version: 0.2\ni n\nt h e\n", "line 3: expected a merge"),
    ("#version: 0.2\ni  n\n", "line 2: expected a merge"),
    ("#version: 0.2\nzz qq\n", "line 2: the merge 'zz qq' uses or makes a token that vocab.json lacks"),
    ("#version: 0.2\n", "holds no merges"),
    (b"#version: 0.2\n\xff\xfe\n", "not UTF-8"),
])
def test_malformed_merges(tmp_path, content, message):
    copy_folder(tmp_path, "vocab.json")
    path = tmp_path / "merges.txt"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(MiniditError, match=message):
        CLIPTokenizer(tmp_path)


def test_bad_special_tokens(tmp_path):
    copy_folder(tmp_path, "vocab.json", "merges.txt")
    with pytest.raises(MiniditError, match="pad_token '<pad>' is not in vocab.json"):
        CLIPTokenizer(tmp_path, pad_token="<pad>")
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["49407"]["lstrip"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MiniditError, match="lstrip, rstrip or single_word"):
        CLIPTokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(MiniditError, match="tokenizer_config.json is not valid JSON"):
        CLIPTokenizer(tmp_path)


# ---- minidit never needs transformers ------------------------------------------------------------------

def test_runs_without_reference_libraries():
    code = ("import sys\n"
            "for name in ('transformers', 'tokenizers', 'regex', 'ftfy'):\n"
            "    sys.modules[name] = None\n"
            "from minidit.text.clip_tokenizer import CLIPTokenizer\n"
            f"ids, mask = CLIPTokenizer({str(TOKENIZER_2)!r})(['A cat! 東京 😀'])\n"
            "print(ids[0, :12].tolist(), int(mask.sum()))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    ids = tokenizer(TOKENIZER_2)(["A cat! 東京 😀"])[0][0, :12].tolist()
    assert result.stdout.split("]")[0] + "]" == str(ids)
