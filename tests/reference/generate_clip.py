"""Reference fixtures for the CLIP text encoder tests, computed with transformers as the oracle.

Run by hand when the reference changes (needs the reference extra: transformers):

    python tests/reference/generate_clip.py

It writes, under tests/fixtures/clip/ (the run is deterministic):

    sd3/text_encoder/     a tiny CLIP-L/14-like CLIPTextModelWithProjection (quick GELU), as SD3-medium's
                          text_encoder/: config.json in the Hub's transformers-4.x form (legacy eos_token_id 2),
                          one model.safetensors in fp16
    sd3/text_encoder_2/   a tiny OpenCLIP-bigG/14-like CLIPTextModelWithProjection (exact GELU), as SD3-medium's
                          text_encoder_2/: the same form, one model.safetensors in fp16 (checkpoints.md §3.1: a
                          single ~1.39 GB file, not shards)
    flux/text_encoder/    a tiny CLIP-L/14-like CLIPTextModel (no projection), as FLUX.1-dev's text_encoder/: one
                          model.safetensors in bf16 (checkpoints.md §4.1 says "16-bit"; bf16 ⚠️ unverified). Its keys
                          carry the `text_model.` prefix, re-added here: transformers ≥ 5.6 saves CLIPTextModel
                          without it (checkpoints.md §11.4), the Hub files have it
    reference.safetensors `input_ids` (8 rows of 77, see `input_ids`) and, per folder `{name}` and dtype `{tag}`
                          (fp32, and the file's own 16-bit dtype): `{name}/{tag}/last_hidden_state`,
                          `.../penultimate` (hidden_states[-2]), `.../pooled` (pooler_output) and, with a
                          projection, `.../text_embeds`; `{name}/eos/pooled`: fp32 pooler_output with the config's
                          eos_token_id set to the tiny end-of-text id instead of the legacy 2 (the other pooling rule)
    fullsize.json         per Hub folder (SD3 text_encoder, text_encoder_2, FLUX text_encoder): its config.json in
                          the transformers-4.x form with the full-size values (checkpoints.md §11.2, §11.3), the
                          class, the parameter count of transformers' model built on meta (123,650,304 /
                          694,659,840 / 123,060,480) and the tensor names and shapes of the Hub files
    VERSIONS.json         the library versions that produced the expected outputs

The tiny vocabulary (1000) scales the real one (49408) down keeping its top: <|endoftext|> is the last id (999,
as 49407) and <|startoftext|> the one before (998, as 49406); padding is either <|endoftext|> (SD3's tokenizer,
FLUX's) or id 0 (`!`, SD3's tokenizer_2). The configs keep the Hub's legacy bos/eos/pad ids (0, 2, 1), so the
reference pools at argmax(input_ids). The weights are transformers' initialisation (seeded) with every LayerNorm
and bias redrawn away from (1, 0) and the embeddings made larger, so that a norm, bias or position wired to the
wrong place changes the output. Each model is rounded to its file's dtype before the outputs are computed, so
the stored files define it exactly.

Functions here are also used by the tests' "live" cases; transformers is imported inside them.
"""

import json
from pathlib import Path

import generator_tools as tools
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "clip"
REFERENCE = FIXTURES / "reference.safetensors"

SEED = 20240608
LENGTH = 77  # CLIP's context, the pipelines' max_length
VOCAB = 1000
EOS, BOS = VOCAB - 1, VOCAB - 2  # as 49407 and 49406
PREFIX = "text_model."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TAGS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def hub_config(architecture: str, values: dict, torch_dtype: str, version: str) -> dict:
    """`text_encoder*/config.json` in the form transformers 4.x writes it, with the Hub's legacy token ids
    (checkpoints.md §11.2; key set as transformers 4.x's CLIPTextConfig.to_dict, not byte-exact)."""
    config = {"architectures": [architecture], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
              "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
              "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
              "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
              "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": torch_dtype,
              "transformers_version": version, "vocab_size": 49408}
    return dict(sorted({**config, **values}.items()))


CLIP_L = {}  # the hub_config defaults are CLIP-L/14's
CLIP_BIGG = {"hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
             "num_hidden_layers": 32, "projection_dim": 1280}
SD3_VERSION, FLUX_VERSION = "4.41.0.dev0", "4.43.3"  # ⚠️ the transformers versions the files name (content only)

# The three Hub folders: class, file dtype, full-size values, tiny values (Dh 8 instead of 64; d_ff = 4 D as in both)
FOLDERS = {
    "sd3/text_encoder": ("CLIPTextModelWithProjection", "float16", SD3_VERSION, CLIP_L,
                         dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                              projection_dim=32, vocab_size=VOCAB)),
    "sd3/text_encoder_2": ("CLIPTextModelWithProjection", "float16", SD3_VERSION, CLIP_BIGG,
                           dict(hidden_act="gelu", hidden_size=40, intermediate_size=160, num_attention_heads=5,
                                num_hidden_layers=3, projection_dim=40, vocab_size=VOCAB)),
    "flux/text_encoder": ("CLIPTextModel", "bfloat16", FLUX_VERSION, CLIP_L,
                          dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                               projection_dim=32, vocab_size=VOCAB)),
}
FULLSIZE_PARAMETERS = {"sd3/text_encoder": 123_650_304, "sd3/text_encoder_2": 694_659_840,
                       "flux/text_encoder": 123_060_480}  # checkpoints.md §11.2, §11.3, §12.1
FULLSIZE_TENSORS = {"sd3/text_encoder": 197, "sd3/text_encoder_2": 517, "flux/text_encoder": 196}  # §11.4
PRESET_NAMES = {"sd3/text_encoder": "clip-vit-large-patch14", "sd3/text_encoder_2": "clip-vit-bigG-14",
                "flux/text_encoder": "clip-vit-large-patch14"}


def tiny_config(name: str) -> dict:
    architecture, dtype, version, full, tiny = FOLDERS[name]
    return hub_config(architecture, {**full, **tiny}, dtype, version)


def fullsize_config(name: str) -> dict:
    architecture, dtype, version, full, _ = FOLDERS[name]
    return hub_config(architecture, full, dtype, version)


def input_ids() -> torch.Tensor:
    """(8, 77) rows as CLIPTokenizer makes them, <|startoftext|> text <|endoftext|> padding:

    0, 1  the same 5-token text padded with <|endoftext|> (SD3 tokenizer, FLUX) and with 0 (SD3 tokenizer_2)
    2     20 tokens, one of them 0 (`!` inside the prompt), padded with 0
    3     75 tokens: no padding, <|endoftext|> at position 76
    4, 5  the empty prompt (SD3's negative prompt) padded both ways: <|endoftext|> at position 1
    6     40 tokens padded with <|endoftext|>
    7     77 text tokens with neither special token: the two pooling rules pick different positions here
    """
    generator = torch.Generator().manual_seed(SEED)
    text = lambda n: torch.randint(1, BOS, (n,), generator=generator).tolist()  # noqa: E731
    row = lambda tokens, pad: [BOS, *tokens, EOS] + [pad] * (LENGTH - len(tokens) - 2)  # noqa: E731
    five, twenty = text(5), text(20)
    twenty[7] = 0
    rows = [row(five, EOS), row(five, 0), row(twenty, 0), row(text(75), EOS), row([], EOS), row([], 0),
            row(text(40), EOS), text(LENGTH)]
    return torch.tensor(rows)


# ---- the oracles (also used live by tests/test_clip.py) -------------------------------------------------

def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def reference_model(folder: Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                    **config_overrides):
    """The class config.json names, loaded from the Hub-layout folder as the pipelines load it."""
    transformers = _quiet_transformers()
    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model = cls.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation, **config_overrides)
    return model.eval()


@torch.no_grad()
def reference_outputs(model, input_ids: torch.Tensor) -> dict:
    """hidden_states (all N + 1), last_hidden_state, penultimate, pooled and, with a projection, text_embeds."""
    base = model.text_model if hasattr(model, "text_projection") else model
    out = base(input_ids=input_ids, output_hidden_states=True)
    result = {"hidden_states": out.hidden_states, "last_hidden_state": out.last_hidden_state,
              "penultimate": out.hidden_states[-2], "pooled": out.pooler_output}
    if hasattr(model, "text_projection"):
        full = model(input_ids=input_ids)  # SD3's call: text_embeds from the class's own forward
        assert torch.equal(full.last_hidden_state, out.last_hidden_state)
        result["text_embeds"] = full.text_embeds
    return result


def reference_keys(config: dict) -> tuple[int, dict[str, list[int]]]:
    """Parameter count, and the names and shapes of the Hub files (the `text_model.` prefix restored), of
    transformers' class built on meta from a Hub config."""
    transformers = _quiet_transformers()
    cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = cls(transformers.CLIPTextConfig(**config))
    return sum(p.numel() for p in model.parameters()), {k: list(v.shape) for k, v in hub_state_dict(model).items()}


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict with the key names of the Hub files: CLIPTextModel's re-prefixed with `text_model.`."""
    sd = model.state_dict()
    if hasattr(model, "text_model"):  # CLIPTextModelWithProjection keeps the prefix
        return sd
    assert not any(k.startswith(PREFIX) for k in sd), "this transformers already writes the prefix"
    return {PREFIX + k: v for k, v in sd.items()}


# ---- writing the fixtures ------------------------------------------------------------------------------

def tiny_model(name: str, seed: int):
    transformers = _quiet_transformers()
    config = tiny_config(name)
    torch.manual_seed(seed)
    model = getattr(transformers, config["architectures"][0])(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "layer_norm" in key and key.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif key.endswith("bias"):
                p.normal_(0, 0.1)
            elif "embedding" in key:
                p.normal_(0, 0.5)
    return model


def write_folder(name: str, model) -> None:
    """config.json and model.safetensors as the Hub has them: prefixed keys, the file's dtype, no position_ids."""
    from safetensors.torch import save_file

    folder = FIXTURES / name
    dtype = DTYPES[FOLDERS[name][1]]
    tools.write_json(folder / "config.json", tiny_config(name))
    sd = {k: v.to(dtype).contiguous() for k, v in hub_state_dict(model).items()}
    assert all(k.startswith(PREFIX) or k == "text_projection.weight" for k in sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def write_fullsize() -> None:
    """fullsize.json: one entry per Hub folder, the key table one tensor per line."""
    entries = []
    for name in FOLDERS:
        config = fullsize_config(name)
        count, keys = reference_keys(config)
        assert count == FULLSIZE_PARAMETERS[name] and len(keys) == FULLSIZE_TENSORS[name], (name, count, len(keys))
        table = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
        entries.append(f' {json.dumps(name)}: {{\n  "preset": {json.dumps(PRESET_NAMES[name])},\n'
                       f'  "config": {json.dumps(config)},\n  "parameters": {count},\n'
                       f'  "keys": {{\n{table}\n  }}\n }}')
    (FIXTURES / "fullsize.json").write_text("{\n" + ",\n".join(entries) + "\n}\n", encoding="utf-8")


def main() -> None:
    import shutil

    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)

    ids = input_ids()
    tensors = {"input_ids": ids}
    for i, name in enumerate(FOLDERS):
        write_folder(name, tiny_model(name, SEED + i))
        folder, file_dtype = FIXTURES / name, DTYPES[FOLDERS[name][1]]
        for dtype in (torch.float32, file_dtype):
            reference = reference_model(folder, dtype)
            loaded = hub_state_dict(reference)
            stored = {k: v.to(dtype) for k, v in load_safetensors(folder / "model.safetensors").items()}
            assert loaded.keys() == stored.keys() and all(torch.equal(loaded[k], stored[k]) for k in stored)
            out = reference_outputs(reference, ids)
            assert len(out["hidden_states"]) == tiny_config(name)["num_hidden_layers"] + 1
            if dtype == torch.float32:  # the sdpa and eager paths of the oracle agree
                eager = reference_outputs(reference_model(folder, dtype, "eager"), ids)
                for key in ("last_hidden_state", "pooled"):
                    assert torch.allclose(out[key], eager[key], atol=1e-5), (name, key)
            for key in ("last_hidden_state", "penultimate", "pooled", "text_embeds"):
                if key in out:
                    tensors[f"{name}/{TAGS[dtype]}/{key}"] = out[key].contiguous()
        # the other pooling rule: the same weights with the current eos_token_id instead of the legacy 2
        pooled = reference_outputs(reference_model(folder, eos_token_id=EOS), ids)["pooled"]
        legacy = tensors[f"{name}/fp32/pooled"]
        assert torch.equal(pooled[:7], legacy[:7]) and not torch.equal(pooled[7], legacy[7])
        tensors[f"{name}/eos/pooled"] = pooled.contiguous()
    save_file(tensors, REFERENCE, metadata={"generator": "tests/reference/generate_clip.py"})

    write_fullsize()
    tools.write_json(FIXTURES / "VERSIONS.json", tools.versions("transformers", "torch", "safetensors"))
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB)")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


if __name__ == "__main__":
    main()
