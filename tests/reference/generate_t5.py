"""Reference fixtures for the T5 v1.1 encoder and tokenizer tests, computed with transformers as the oracle.

Run by hand when the reference changes (needs the reference extra: transformers, plus protobuf, which
transformers needs to read a sentencepiece model):

    python tests/reference/generate_t5.py

It writes, under tests/fixtures/t5/ (≈0.7 MB; the run is deterministic):

    tiny/text_encoder/        a tiny T5EncoderModel (checkpoints.md §13.1 widths: D 32, d_ff 64, Dh 8, 4 heads,
                              2 blocks, gated-gelu) with seeded random weights, in the layout of PixArt-α's
                              text_encoder/: config.json in the Hub's (transformers 4) form, three shards
                              model-0000k-of-00003.safetensors + model.safetensors.index.json, `shared.weight` only
    tiny/tokenizer/           a sentencepiece unigram model trained here on CORPUS, in the layout of PixArt-α's
                              tokenizer/: spiece.model (T5's nmt_nfkc normaliser, <pad> 0, </s> 1, <unk> 2, no <s>,
                              200 pieces), added_tokens.json (100 <extra_id_k>), special_tokens_map.json,
                              tokenizer_config.json (the slow T5Tokenizer's, with added_tokens_decoder)
    tied/text_encoder/        the same weights as one model.safetensors holding both `shared.weight` and its tied
                              copy `encoder.embed_tokens.weight`, as some older exports do
    t5-v1_1-xxl/config.json   the full-size config (checkpoints.md §11.1), no weights
    xxl_keys.json             the XXL encoder's tensor names and shapes (transformers' T5EncoderModel on meta,
                              less the tied `encoder.embed_tokens.weight`: the 219 keys of the Hub files)
    reference.safetensors     encoder inputs (ids with padding, mask) and last_hidden_state in fp32 and bf16,
                              with and without the mask; the relative position buckets for -300..300
    tokenizer_cases.json      ids and masks from transformers' T5Tokenizer (max_length 120, PixArt's call) for
                              varied texts, and for the four kinds of text where transformers 5 differs from
                              the slow sentencepiece tokenizer (see minidit/text/t5_tokenizer.py)
    VERSIONS.json             the library versions that produced the expected outputs

The encoder's vocabulary (384) holds the tokenizer's 300 ids plus padding rows, as the real 32128 holds 32100.
Its weights are transformers' initialisation (seeded) with the layer norms and the relative position table
redrawn, so that a norm or bias wired to the wrong place changes the output.

Functions here are also used by the tests' "live" cases; transformers is imported inside them.
"""

import io
import json
import sys
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "t5"
TINY, TIED, XXL = FIXTURES / "tiny", FIXTURES / "tied", FIXTURES / "t5-v1_1-xxl"
REFERENCE = FIXTURES / "reference.safetensors"
CASES = FIXTURES / "tokenizer_cases.json"

SEED = 20240601
SPIECE_PIECES = 200
EXTRA_IDS = 100
TINY_CONFIG = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=384)
XXL_CONFIG = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128)
SHARD_SIZE = "60KB"  # three shards plus the index, as PixArt's text_encoder ships (2 or 4 shards there)
MAX_LENGTH = 120  # PixArt-α's
ENCODER_LENGTH = 140  # > 128 + 8, so that the capped log buckets of the relative position bias are used
BUCKET_RANGE = 300

CORPUS = [
    "A photograph of an astronaut riding a horse on the moon.",
    "a small cactus wearing a straw hat and neon sunglasses in the Sahara desert",
    "An oil painting of a lighthouse at dusk, waves crashing, 4k, highly detailed!",
    "Café au lait, crème brûlée and a naïve façade: déjà vu in Zürich.",
    "Ein Fuchs springt über den Zaun; die Straße ist nass.",
    "東京の夜景、ネオンの光と雨。",
    "Пейзаж с горами и рекой на закате.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, 10, 42, 3.14159, 2024-05-17, 1,000,000 and 50%.",
    "Punctuation (parentheses) [brackets] {braces} <angle> \"quotes\" 'single' - dash -- em — ellipsis… ?!;:",
    "Symbols: $5 @home #tag & more * stars + plus = equals / slash \\ backslash | pipe ~ tilde ^ caret _ underscore",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "a cat sitting on a wooden table next to a cup of coffee, morning light, bokeh",
    "portrait of a woman with red hair, freckles, green eyes, studio lighting, 85mm",
    "a futuristic city skyline with flying cars and tall glass towers at sunset",
    "watercolor illustration of a fox in a snowy forest, soft pastel colors",
    "Tiếng Việt: phở bò, bánh mì và cà phê sữa đá.",
]

LONG_PROMPT = ("A breathtaking ultra-detailed matte painting of an ancient floating city above a misty ocean at golden "
               "hour, with waterfalls pouring from its edges, flocks of white birds circling the towers, tiny "
               "figures walking along rope bridges, glowing lanterns in every window, dramatic volumetric clouds, "
               "cinematic lighting, 8k resolution, trending on artstation, by a master of fantasy landscapes")

TOKENIZER_TEXTS = [
    "A small cactus wearing a straw hat and neon sunglasses in the Sahara desert.",
    "a small cactus wearing a straw hat and neon sunglasses in the sahara desert.",  # PixArt lower-cases
    LONG_PROMPT,  # truncated at 119 pieces + </s>
    "",
    " ",
    "a   cat\t\tsitting\n\non  a   mat  ",
    "   leading and trailing spaces   ",
    "Café au lait, crème brûlée in Zürich — 東京の夜景 Пейзаж на закате",
    "Tiếng Việt: phở bò",  # composed (NFC), as typed
    "unknown characters: 😀😀 👍🏽 🇫🇷 ∑∫ and Ωmega",
    "$5 @home #tag & more * (stars) [x] {y} <z> \"q\" 'r' ~^_|\\ ✓ …",
    "compatibility forms: ①②③ ＡＢＣ ｶﾀｶﾅ ﬁ ™ ㎏ Ⅻ ½",
    "no-break\u00a0space, ideographic\u3000space, zero\u200bwidth, soft\u00adhyphen",
    "numbers 0 1 42 3.14159 2024-05-17 1,000,000 50% -7 +3 1e-6",
    "special tokens </s> in <pad> the <unk> text <extra_id_0>. and <extra_id_99>x <extra_id_10><extra_id_1>",
    "</s>",
    "not special: <extra_id_100> <EXTRA_ID_0> < /s> <s> </ s>",
]

# Where transformers 5's T5Tokenizer (tokenizers' Unigram) differs from the slow sentencepiece tokenizer.
DIVERGENT_TEXTS = [
    "next\u0085line",  # U+0085: a word boundary for tokenizers, an unknown character for sentencepiece
    "Tie\u0302\u0301ng Vie\u0323\u0302t",  # fully decomposed (NFD) Vietnamese: tokenizers drops the second mark
    "\uff1c/s\uff1e and \uff1cpad\uff1e",  # fullwidth brackets: NFKC gives "</s>", which tokenizers' Unigram matches
    "bridges, a birds lll",  # "lll" = "l"+"ll" = "ll"+"l": equal scores, the tie falls the other way
]


# ---- the Hub files' content ----------------------------------------------------------------------------

def hub_text_encoder_config(values: dict) -> dict:
    """`text_encoder/config.json` in the form the pipeline repos ship (checkpoints.md §11.1; transformers 4)."""
    return {"_name_or_path": "DeepFloyd/t5-v1_1-xxl", "architectures": ["T5EncoderModel"], "d_ff": 10240,
            "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
            "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
            "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
            "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
            "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.33.0.dev0",
            "use_cache": True, "vocab_size": 32128, **values}


def tokenizer_files(num_pieces: int) -> dict[str, dict]:
    """added_tokens.json, special_tokens_map.json and tokenizer_config.json as transformers 4's slow T5Tokenizer
    writes them (the sentinels with lstrip/rstrip, as PixArt's tokenizer_config.json lists them)."""
    extra = [f"<extra_id_{k}>" for k in range(EXTRA_IDS)]
    ids = {token: num_pieces + EXTRA_IDS - 1 - k for k, token in enumerate(extra)}
    token = lambda content, strip: {"content": content, "lstrip": strip, "normalized": False,  # noqa: E731
                                    "rstrip": strip, "single_word": False, "special": True}
    decoder = {"0": token("<pad>", False), "1": token("</s>", False), "2": token("<unk>", False)}
    decoder |= {str(i): token(t, True) for t, i in sorted(ids.items(), key=lambda item: item[1])}
    return {
        "added_tokens.json": ids,
        "special_tokens_map.json": {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>",
                                    "unk_token": "<unk>"},
        "tokenizer_config.json": {"added_tokens_decoder": decoder, "additional_special_tokens": extra,
                                  "clean_up_tokenization_spaces": True, "eos_token": "</s>", "extra_ids": EXTRA_IDS,
                                  "legacy": True, "model_max_length": 1000000000000000019884624838656,
                                  "pad_token": "<pad>", "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer",
                                  "unk_token": "<unk>"},
    }


def train_spiece() -> bytes:
    """A T5-style sentencepiece unigram model trained on CORPUS (deterministic: one thread, fixed corpus)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, model_type="unigram", vocab_size=SPIECE_PIECES,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc", character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return model.getvalue()


# ---- the oracles (also used live by tests/test_t5.py) ---------------------------------------------------

def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def reference_encoder(folder: Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    transformers = _quiet_transformers()
    model = transformers.T5EncoderModel.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


@torch.no_grad()
def reference_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def reference_tokenizer(folder: Path):
    return _quiet_transformers().T5Tokenizer.from_pretrained(folder)


def reference_tokenize(tokenizer, texts: list[str], max_length: int = MAX_LENGTH) -> tuple[list, list]:
    """PixArtAlphaPipeline's call (diffusers `encode_prompt`)."""
    out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="pt")
    return out.input_ids.tolist(), out.attention_mask.tolist()


def reference_buckets(relative_position: torch.Tensor) -> torch.Tensor:
    from transformers.models.t5.modeling_t5 import T5Attention

    return T5Attention._relative_position_bucket(relative_position, bidirectional=True, num_buckets=32,
                                                 max_distance=128)


def reference_keys(config: dict) -> dict[str, list[int]]:
    """Tensor names and shapes of transformers' T5EncoderModel built on meta, less the tied copies it does not save."""
    transformers = _quiet_transformers()
    with torch.device("meta"):
        model = transformers.T5EncoderModel(transformers.T5Config(**config))
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    return {k: list(v.shape) for k, v in model.state_dict().items() if k not in tied}


# ---- writing the fixtures ------------------------------------------------------------------------------

def tiny_model():
    transformers = _quiet_transformers()
    config = transformers.T5Config(**hub_text_encoder_config(TINY_CONFIG))
    torch.manual_seed(SEED)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.normal_(0, 1.0)
    return model


def write_json(path: Path, content: dict, one_line_per_key: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if one_line_per_key:
        text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in content.items()) + "\n}"
    else:
        text = json.dumps(content, indent=2)
    path.write_text(text + "\n", encoding="utf-8")


def write_encoder_folders(model) -> None:
    from safetensors.torch import save_file

    folder = TINY / "text_encoder"
    model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    write_json(folder / "config.json", hub_text_encoder_config(TINY_CONFIG))  # the Hub's form, not transformers 5's
    saved = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(saved) == 3 and saved[0] == "model-00001-of-00003.safetensors", saved
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "shared.weight" in index["weight_map"] and "encoder.embed_tokens.weight" not in index["weight_map"]

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert sd["encoder.embed_tokens.weight"].data_ptr() == sd["shared.weight"].data_ptr()  # tied in the oracle
    sd = {k: v.clone() for k, v in sd.items()}  # safetensors refuses shared memory
    (TIED / "text_encoder").mkdir(parents=True)
    save_file(sd, TIED / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    write_json(TIED / "text_encoder" / "config.json", hub_text_encoder_config(TINY_CONFIG))


def write_tokenizer_folder() -> None:
    folder = TINY / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(train_spiece())
    for name, content in tokenizer_files(SPIECE_PIECES).items():
        write_json(folder / name, content)


def encoder_inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of ENCODER_LENGTH: a prompt that fills it, a short padded prompt, and random ids over the whole
    vocabulary (sentinels and unused rows included) with a mask that stops early."""
    ids, mask = reference_tokenize(tokenizer, [LONG_PROMPT + " " + LONG_PROMPT, CORPUS[1]], ENCODER_LENGTH)
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    assert mask[0].all() and mask[1].sum() < ENCODER_LENGTH // 2
    generator = torch.Generator().manual_seed(SEED)
    random_ids = torch.randint(0, TINY_CONFIG["vocab_size"], (1, ENCODER_LENGTH), generator=generator)
    random_mask = (torch.arange(ENCODER_LENGTH) < 77).long()[None]
    return torch.cat([ids, random_ids]), torch.cat([mask, random_mask])


def versions() -> dict:
    import google.protobuf
    import safetensors
    import sentencepiece
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "sentencepiece": sentencepiece.__version__, "protobuf": google.protobuf.__version__,
            "torch": torch.__version__, "safetensors": safetensors.__version__, "python": sys.version.split()[0]}


def main() -> None:
    import shutil

    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)

    # -- tokenizer
    write_tokenizer_folder()
    tokenizer = reference_tokenizer(TINY / "tokenizer")
    assert len(tokenizer) == SPIECE_PIECES + EXTRA_IDS, len(tokenizer)
    assert tokenizer.convert_tokens_to_ids(["<pad>", "</s>", "<unk>", "<extra_id_0>", "<extra_id_99>"]) == [
        0, 1, 2, SPIECE_PIECES + EXTRA_IDS - 1, SPIECE_PIECES]
    ids, masks = reference_tokenize(tokenizer, TOKENIZER_TEXTS)
    assert sum(masks[TOKENIZER_TEXTS.index(LONG_PROMPT)]) == MAX_LENGTH, "the long prompt must be truncated"
    divergent_ids, divergent_masks = reference_tokenize(tokenizer, DIVERGENT_TEXTS)
    case = lambda text, i, m: {"text": text, "input_ids": i, "attention_mask": m}  # noqa: E731
    cases = {"max_length": MAX_LENGTH,
             "cases": [case(*c) for c in zip(TOKENIZER_TEXTS, ids, masks)],
             "divergent": [case(*c) for c in zip(DIVERGENT_TEXTS, divergent_ids, divergent_masks)]}
    CASES.write_text("{\n" + ",\n".join(  # one case per line; texts ASCII-escaped, as some hold invisible characters
        f' "{key}": ' + (json.dumps(value) if not isinstance(value, list) else
                         "[\n" + ",\n".join("  " + json.dumps(c) for c in value) + "\n ]")
        for key, value in cases.items()) + "\n}\n", encoding="utf-8")

    # -- encoder
    model = tiny_model()
    write_encoder_folders(model)
    input_ids, attention_mask = encoder_inputs(tokenizer)
    tensors = {"encoder/input_ids": input_ids, "encoder/attention_mask": attention_mask}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        reference = reference_encoder(TINY / "text_encoder", dtype)
        assert all(p.dtype == dtype for p in reference.parameters())  # no fp32 `wo` outside fp16
        for mask, mtag in ((attention_mask, "masked"), (None, "unmasked")):
            out = reference_hidden_states(reference, input_ids, mask)
            if dtype == torch.float32:  # the sdpa and eager paths of the oracle agree
                eager_model = reference_encoder(TINY / "text_encoder", dtype, "eager")
                eager = reference_hidden_states(eager_model, input_ids, mask)
                assert torch.allclose(out, eager, atol=1e-5), (out - eager).abs().max()
            tensors[f"encoder/{tag}/{mtag}"] = out.contiguous()
    assert not torch.equal(tensors["encoder/fp32/masked"][1], tensors["encoder/fp32/unmasked"][1])
    tied = reference_encoder(TIED / "text_encoder")
    assert torch.equal(reference_hidden_states(tied, input_ids, attention_mask), tensors["encoder/fp32/masked"])
    relative_position = torch.arange(-BUCKET_RANGE, BUCKET_RANGE + 1)
    tensors["buckets/relative_position"] = relative_position
    tensors["buckets/bucket"] = reference_buckets(relative_position)
    save_file(tensors, REFERENCE, metadata={"generator": "tests/reference/generate_t5.py"})

    # -- full size, no weights
    write_json(XXL / "config.json", hub_text_encoder_config(XXL_CONFIG))
    write_json(FIXTURES / "xxl_keys.json", reference_keys(hub_text_encoder_config(XXL_CONFIG)),
               one_line_per_key=True)

    write_json(FIXTURES / "VERSIONS.json", versions())
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
