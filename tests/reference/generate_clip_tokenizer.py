"""Reference fixtures for the CLIP tokenizer tests: the real CLIP vocabulary, and transformers' ids as the oracle.

Run by hand when the reference changes (needs the reference extra, transformers, and pip with access to PyPI):

    python tests/reference/generate_clip_tokenizer.py [--wheel open_clip_torch-3.3.0-py3-none-any.whl]

The vocabulary. OpenAI's BPE merges ship inside the `open_clip_torch` wheel as `open_clip/bpe_simple_vocab_16e6.txt.gz`
(a header line, then 262,145 merges, of which CLIP uses the first 48,894). The wheel is fetched with
`pip download open_clip_torch==OPEN_CLIP_VERSION --no-deps` into a temporary folder (or read from --wheel), the
gz is checked against its SHA-256, and the Hub's two files are rebuilt from it as OpenAI's `simple_tokenizer.py`
builds its vocabulary and as transformers 4's `CLIPTokenizer.save_pretrained` wrote them into SD3's and FLUX's
`tokenizer/` folders (checkpoints.md §3.1, §4.1, §11.4):

    vocab.json    49,408 entries: the 256 byte symbols, the same with `</w>`, the 48,894 merges joined, then
                  `<|startoftext|>` 49406 and `<|endoftext|>` 49407; written `indent=2, sort_keys=True,
                  ensure_ascii=False` plus a newline: 1,059,962 bytes (the Hub shows 1.06 MB)
    merges.txt    `#version: 0.2`, then the 48,894 merges, one `a b` a line, each line ending in a newline:
                  524,619 bytes (the Hub shows 525 kB)

It writes, under tests/fixtures/clip_tokenizer/ (≈1.8 MB; the run is deterministic):

    tokenizer/      SD3-medium's (and FLUX.1's) CLIP-L tokenizer folder: vocab.json, merges.txt,
                    special_tokens_map.json (588 B) and tokenizer_config.json (705 B): pad `<|endoftext|>`
    tokenizer_2/    SD3-medium's bigG tokenizer folder: special_tokens_map.json (576 B) and tokenizer_config.json
                    (856 B): pad `!`, which is also an added token (id 0); vocab.json and merges.txt are relative
                    symbolic links to ../tokenizer/ (the Hub's files are identical, and two copies would double
                    the fixture to 3.2 MB)
    cases.json      ids and masks from transformers' CLIPTokenizer with SD3's call (max_length 77,
                    padding="max_length", truncation) for TEXTS on four folders: tokenizer, tokenizer_2, bare
                    (vocab.json and merges.txt alone: transformers' defaults) and tokenizer loaded with
                    pad_token="!"; for RANDOM_COUNT seeded random strings (max_length RANDOM_LENGTH) on
                    tokenizer and tokenizer_2; and for the DIVERGENT texts (unpadded ids, on tokenizer), each with
                    a text the reference reads as minidit reads it
    VERSIONS.json   the library versions that produced the expected outputs, the wheel and the gz's SHA-256

The four config files are reconstructions: their serialized sizes equal the sizes checkpoints.md §3.1 gives for
SD3-medium's files to the byte (588, 705, 576, 856), which pins the `normalized` flags (true for
`<|startoftext|>`, false for `<|endoftext|>` and `!`).

transformers 5.23 has one CLIPTokenizer, backed by `tokenizers`; `CLIPTokenizerFast` resolves to the same class.
Both names are called here and must agree (they do, being one class). That is what SD3's and FLUX's pipelines
load (`CLIPTokenizer` in diffusers' pipeline_stable_diffusion_3.py and pipeline_flux.py).

Functions here are also used by the tests' "live" cases; transformers is imported inside them.
"""

import argparse
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "clip_tokenizer"
CASES = FIXTURES / "cases.json"
FOLDERS = ("tokenizer", "tokenizer_2")

OPEN_CLIP_VERSION = "3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # OpenAI's: a 49152-entry BPE vocabulary, less the byte symbols and two specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
VOCAB_BYTES, MERGES_BYTES = 1_059_962, 524_619
CONFIG_BYTES = {("tokenizer", "special_tokens_map.json"): 588, ("tokenizer", "tokenizer_config.json"): 705,
                ("tokenizer_2", "special_tokens_map.json"): 576, ("tokenizer_2", "tokenizer_config.json"): 856}
RANDOM_COUNT, RANDOM_LENGTH, SEED = 200, 40, 20240612

LONG_PROMPT = ("A breathtaking ultra-detailed matte painting of an ancient floating city above a misty ocean at golden "
               "hour, with waterfalls pouring from its edges, flocks of white birds circling the towers, tiny "
               "figures walking along rope bridges, glowing lanterns in every window, dramatic volumetric clouds, "
               "cinematic lighting, 8k resolution, trending on artstation, by a master of fantasy landscapes, highly "
               "detailed, sharp focus, shot on 35mm film")  # 85 tokens

TEXTS = [
    "A photograph of an astronaut riding a horse on the moon.",
    "a cat sitting on a wooden table next to a cup of coffee, morning light, bokeh",
    "THE QUICK BROWN FOX Jumps Over The Lazy Dog",
    "don't won't it's I'm you're we've they'll she'd DON'T It'S",  # the regex's contractions, upper case too
    "'sun' 'tis rock'n'roll O'Neil's ''s 're-enter",  # a contraction is taken wherever the apostrophe starts one
    "numbers 0 1 42 3.14159 2024-05-17 1,000,000 50% -7 +3 1e-6 x2 3d 1080p 4k",  # one word per digit
    "fractions and marks: ½ ² ① Ⅻ ٣ ໕",  # \p{N} beyond 0-9
    "Punctuation (parentheses) [brackets] {braces} <angle> \"quotes\" - dash -- em — ellipsis… ?;: ... ,,,",
    "symbols: $5 @home #tag & more * stars + = / \\ | ~ ^ _ ` state-of-the-art well_known e-mail",
    "hello!!! wow! !important !! ! a!b",  # "!" is an added token (id 0) in SD3's tokenizer_2
    "Café au lait, crème brûlée, naïve façade, déjà vu in Zürich; Ærøskøbing; Straße",
    "decomposed: Cafe\u0301 cre\u0300me Tie\u0302\u0301ng Vie\u0323\u0302t q\u0301",  # NFC composes what it can
    "東京の夜景、ネオンの光と雨。 서울의 밤 北京烤鸭",
    "Пейзаж на закате; ΟΔΟΣ ΣΟΦΟΣ; İstanbul; ǅemal",  # final sigma, dotted capital I, a title-case letter
    "emoji: 😀 👍🏽 🇫🇷 ❤️ 👨‍👩‍👧 a🐱b",
    "  a   cat\t\tsitting\n\non  a   mat  ",
    "nbsp\u00a0x ideo\u3000x em\u2003x ls\u2028x ps\u2029x nel\u0085x ff\x0cx vt\x0bx cr\rx",  # Unicode White_Space
    "not space: zw\u200bx shy\u00adx fs\x1cx gs\x1dx rs\x1ex us\x1fx nul\x00x bel\x07x rep\ufffdx",
    "&amp; &lt;3 &quot;html&quot; “smart” ‘quotes’ it’s",  # no HTML unescaping, no quote straightening
    "compatibility forms: ＡＢＣ ｶﾀｶﾅ ﬁ ™ ㎏ ℌ",  # no NFKC
    "",
    " ",
    "\n\t ",
    "a",
    "a <|endoftext|> b",
    "<|startoftext|>hello<|endoftext|>",
    "x<|endoftext|>y<|endoftext|><|endoftext|>",
    "<|ENDOFTEXT|> and <|StartOfText|> and <|endoftext |>",  # only normalized added tokens match after lower-casing
    "<|startoftext|",
    LONG_PROMPT,  # cut at 75 tokens
    LONG_PROMPT + " " + LONG_PROMPT,
    "a " * 74,  # 74 tokens: no cut, one pad
    "a " * 75,  # exactly 75: no pad
    "a " * 76,  # one too many
    "!" * 100,
]

# Where minidit cannot follow transformers 5 (see minidit/text/clip_tokenizer.py): each text with an equivalent text
# that the reference reads as minidit reads the first one.
DIVERGENT = [
    # tokenizers' NFC tables predate these combining marks, so it does not put them in canonical order; Python does
    ("marks x\u08d0\u0651 y\u0366\u1ac4", "marks x\u0651\u08d0 y\u1ac4\u0366"),
    # nor does it compose this Dives Akuru vowel sign (U+11935 U+11930 -> U+11938)
    ("dives akuru \U00011935\U00011930", "dives akuru \U00011938"),
    # a CJK ideograph of Unicode 15.0: a letter for tokenizers' regex, unassigned (not a letter) for Python 3.11's
    # unicodedata (Unicode 14.0), so the word is cut around it there; Python 3.12 and later agree with tokenizers
    ("a\U00031350b", "a \U00031350 b"),
]

RANDOM_POOL = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ .,;:!?'\"()[]{}<>/\\-_+=*&%$#@~^|`0123456789")
               + list("éèêëàâäôöûüçñßœæøåÉÀ東京の夜景ネオンПейзажΩΣς∑∫√✓…—–«»¿¡½①ＡｶﾀﬁⅫ㎏™İǅ")
               + ["😀", "👍🏽", "🇫🇷", "❤️", "'s", "'t", "'re", "'ll", "n't", "'S", "’s", "!!", "...", "e\u0301",
                  "q\u0301", "\t", "\n", "\r", "  ", "\u00a0", "\u3000", "\u2028", "\u0085", "\x1c", "\x1f", "\u200b",
                  "\u00ad", "\x00", BOS, EOS, "<|ENDOFTEXT|>", "<|StartOfText|>", "<|", "|>", "endoftext"])


def random_texts(count: int = RANDOM_COUNT, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(RANDOM_POOL) for _ in range(rng.randint(0, 40))) for _ in range(count)]


# ---- the Hub files ----------------------------------------------------------------------------------------

def byte_symbols() -> list[str]:
    """The 256 byte symbols in OpenAI's order: the printable Latin-1 bytes as themselves, then the rest as
    U+0100 onwards (this order is the order of the first 256 ids)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(rest))]


def read_bpe_merges(wheel: Path | None = None) -> list[tuple[str, str]]:
    """The first NUM_MERGES merges of open_clip's bpe_simple_vocab_16e6.txt.gz (downloads the wheel if not given)."""
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", f"open_clip_torch=={OPEN_CLIP_VERSION}",
                            "--no-deps", "--quiet", "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(BPE_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    assert digest == BPE_SHA256, f"{BPE_MEMBER} in {wheel.name} has SHA-256 {digest}, expected {BPE_SHA256}"
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1: NUM_MERGES + 1]]  # line 0 is a version header
    assert len(merges) == NUM_MERGES and all(len(m) == 2 for m in merges)
    return merges


def hub_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408 and vocab[BOS] == 49406 and vocab[EOS] == 49407 and vocab["!"] == 0
    return vocab


def added_token(content: str, normalized: bool, special: bool | None = True) -> dict:
    entry = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    return entry if special is None else entry | {"special": special}


def hub_config_files(pad: str) -> dict[str, dict]:
    """special_tokens_map.json and tokenizer_config.json of SD3-medium's tokenizer/ (pad <|endoftext|>) and
    tokenizer_2/ (pad "!"), as transformers 4 saved them."""
    decoder = {"0": added_token("!", False)} if pad == "!" else {}
    decoder |= {"49406": added_token(BOS, True), "49407": added_token(EOS, False)}
    return {
        "special_tokens_map.json": {"bos_token": added_token(BOS, True, None),
                                    "eos_token": added_token(EOS, False, None),
                                    "pad_token": added_token(pad, False, None),
                                    "unk_token": added_token(EOS, False, None)},
        "tokenizer_config.json": {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": BOS,
                                  "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": EOS,
                                  "errors": "replace", "model_max_length": MAX_LENGTH, "pad_token": pad,
                                  "tokenizer_class": "CLIPTokenizer", "unk_token": EOS},
    }


def write_json(path: Path, content: dict, **options) -> None:
    path.write_text(json.dumps(content, indent=2, **options) + "\n", encoding="utf-8")


def write_folders(merges: list[tuple[str, str]]) -> None:
    first, second = FIXTURES / FOLDERS[0], FIXTURES / FOLDERS[1]
    first.mkdir(parents=True)
    second.mkdir()
    write_json(first / "vocab.json", hub_vocab(merges), sort_keys=True, ensure_ascii=False)
    (first / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    sizes = [(first / name).stat().st_size for name in ("vocab.json", "merges.txt")]
    assert sizes == [VOCAB_BYTES, MERGES_BYTES], sizes
    for name in ("vocab.json", "merges.txt"):
        os.symlink(Path("..") / FOLDERS[0] / name, second / name)
    for folder, pad in zip(FOLDERS, (EOS, "!")):
        for name, content in hub_config_files(pad).items():
            write_json(FIXTURES / folder / name, content)
            size = (FIXTURES / folder / name).stat().st_size
            assert size == CONFIG_BYTES[folder, name], (folder, name, size)


def bare_folder(target: Path) -> Path:
    """vocab.json and merges.txt alone (no config files): transformers' and minidit's defaults apply."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FIXTURES / FOLDERS[0] / name, target / name)
    return target


# ---- the oracle (also used live by tests/test_clip_tokenizer.py) -----------------------------------------

def reference_tokenizer(folder: Path, fast: bool = False, **kwargs):
    import transformers

    transformers.logging.set_verbosity_error()
    cls = transformers.CLIPTokenizerFast if fast else transformers.CLIPTokenizer
    return cls.from_pretrained(folder, **kwargs)


def reference_tokenize(tokenizer, texts: list[str], max_length: int = MAX_LENGTH) -> tuple[list, list]:
    """SD3's and FLUX's call (diffusers `_get_clip_prompt_embeds`)."""
    out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True)
    return out.input_ids, out.attention_mask


def variants(bare: Path) -> dict[str, tuple[Path, dict]]:
    """Name -> (folder, from_pretrained keyword arguments) of the tokenizers the cases are computed for."""
    return {"tokenizer": (FIXTURES / "tokenizer", {}), "tokenizer_2": (FIXTURES / "tokenizer_2", {}),
            "bare": (bare, {}), "tokenizer+pad!": (FIXTURES / "tokenizer", {"pad_token": "!"})}


def versions(wheel_name: str) -> dict:
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0], "open_clip_torch wheel": wheel_name, "bpe sha256": BPE_SHA256}


def write_cases(cases: dict) -> None:
    """One case per line; texts ASCII-escaped, as some hold invisible characters."""
    def block(value, indent):
        if isinstance(value, dict):
            inner = ",\n".join(f"{indent} {json.dumps(k)}: {block(v, indent + ' ')}" for k, v in value.items())
            return "{\n" + inner + f"\n{indent}}}"
        if isinstance(value, list) and value and isinstance(value[0], (dict, list, str)):
            return "[\n" + ",\n".join(f"{indent} {json.dumps(v)}" for v in value) + f"\n{indent}]"
        return json.dumps(value)
    CASES.write_text(block(cases, "") + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"a local open_clip_torch-{OPEN_CLIP_VERSION} wheel")
    args = parser.parse_args()

    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    write_folders(read_bpe_merges(args.wheel))

    randoms = random_texts()
    cases = {"max_length": MAX_LENGTH, "texts": TEXTS, "expected": {},
             "random": {"max_length": RANDOM_LENGTH, "texts": randoms, "expected": {}}, "divergent": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (folder, kwargs) in variants(bare_folder(Path(tmp) / "bare")).items():
            slow, fast = reference_tokenizer(folder, **kwargs), reference_tokenizer(folder, fast=True, **kwargs)
            ids, masks = reference_tokenize(slow, TEXTS)
            assert (ids, masks) == reference_tokenize(fast, TEXTS), f"{name}: CLIPTokenizer and ...Fast disagree"
            cases["expected"][name] = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, masks)]
            if name in FOLDERS:
                ids, masks = reference_tokenize(slow, randoms, RANDOM_LENGTH)
                assert (ids, masks) == reference_tokenize(fast, randoms, RANDOM_LENGTH), name
                cases["random"]["expected"][name] = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, masks)]
        reference = reference_tokenizer(FIXTURES / "tokenizer")
        for text, equivalent in DIVERGENT:
            rows, masks = reference_tokenize(reference, [text, equivalent])
            ids, equivalent_ids = (row[: sum(mask)] for row, mask in zip(rows, masks))
            assert ids != equivalent_ids, f"transformers now reads {text!r} as minidit does: drop it from DIVERGENT"
            cases["divergent"].append({"text": text, "input_ids": ids, "equivalent": equivalent,
                                       "equivalent_input_ids": equivalent_ids})
    rows = cases["expected"]["tokenizer"]
    assert sum(rows[TEXTS.index(LONG_PROMPT)]["attention_mask"]) == MAX_LENGTH, "the long prompt must be cut"
    assert [sum(rows[TEXTS.index("a " * n)]["attention_mask"]) for n in (74, 75, 76)] == [76, 77, 77]
    write_cases(cases)

    wheel_name = args.wheel.name if args.wheel else f"open_clip_torch-{OPEN_CLIP_VERSION}-py3-none-any.whl"
    write_json(FIXTURES / "VERSIONS.json", versions(wheel_name))
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB): vocab.json {VOCAB_BYTES:,} B, merges.txt {MERGES_BYTES:,} B")


if __name__ == "__main__":
    main()
