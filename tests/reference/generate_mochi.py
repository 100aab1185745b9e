"""Reference fixtures for the Mochi tests, computed with diffusers' MochiTransformer3DModel as the oracle.

Run by hand when the reference changes (needs the reference extra; reuses generate_captures' attention-call
watcher):

    python tests/reference/generate_mochi.py

It writes, under tests/fixtures/mochi/ (the run is deterministic):

    mochi-1-preview/transformer/
                           the Hub's diffusers layout (checkpoints.md §8.1), tiny: fp32 shards plus the index, and
                           config.json in the Hub form (the §8.2 key set, 396 bytes at full size). The real depth
                           (48 blocks, the last one context_pre_only) at width 16 (2 heads of 8), text width 24
                           (different, so that no test passes with one stream sized by the other's width), T5 width
                           32, so that an analysis of the folder has the real model's layers.
    reference.safetensors  transformer cases (inputs and outputs: 1 to 5 latent frames, square and non-square grids,
                           padded text, timesteps 0 to 1000) and K/V/A captured inside diffusers' attention processor
    fullsize.json          the full-size transformer built by diffusers on the meta device: parameter count, key
                           names and shapes
    VERSIONS.json          the library versions that produced the expected outputs

Functions here are also used by the tests' "live" cases; diffusers is imported inside functions.
"""

import functools
import json
import shutil
from pathlib import Path

import generator_tools as tools
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "mochi"
REFERENCE = FIXTURES / "reference.safetensors"
FOLDER = FIXTURES / "mochi-1-preview"
TRANSFORMER = FOLDER / "transformer"
_CAPTURES = tools.generator("generate_captures")  # its attention-call watcher

SEED = 20241022
WEIGHT_STD = 0.2  # random weights of this size make every layer (modulations and RoPE frequencies too) move the output
# weights scaled down so that the RMSNorms see inputs whose mean square is near their eps (QK-norm 1e-5, the
# blocks' output norms 1e-6): a wrong eps then moves the output well past the fixture tolerance
SMALL_INPUTS = {"to_q.weight": 5e-3, "to_k.weight": 5e-3, "add_q_proj.weight": 5e-3, "add_k_proj.weight": 5e-3,
                "ff.net.2.weight": 1e-3, "ff_context.net.2.weight": 1e-3}
DIFFUSERS_VERSION = "0.32.0.dev0"  # what the Mochi repository's JSON files were written with

# checkpoints.md §8.2: transformer/config.json of genmo/mochi-1-preview (396 B); every argument present
HUB_TRANSFORMER = {
    "_class_name": "MochiTransformer3DModel", "_diffusers_version": DIFFUSERS_VERSION, "activation_fn": "swiglu",
    "attention_head_dim": 128, "in_channels": 12, "max_sequence_length": 256, "num_attention_heads": 24,
    "num_layers": 48, "out_channels": None, "patch_size": 2, "pooled_projection_dim": 1536, "qk_norm": "rms_norm",
    "text_embed_dim": 4096, "time_embed_dim": 256}
HUB_SIZE = 396
# tiny: width 16 (2 heads of 8), text stream 24 (not 16, so that a text output projection, modulation or FFN (inner
# 4 * 24 * 2 // 3 = 64, diffusers' rule) sized by the visual width fails), T5 width 32 (8 pooling heads of 4); the
# real depth and channels
TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "pooled_projection_dim": 24, "text_embed_dim": 32,
        "time_embed_dim": 4, "max_sequence_length": 8}
TRANSFORMER_SHARDS = 5  # the Hub's fp32 transformer/ has five shards

# transformer cases: (latent frames T, latent H, W, timesteps of the batch of 2, valid text tokens per row of 8);
# the pipeline's timesteps are 1000 (1 - sigma), floats, and T5 pads on the right
TEXT_LENGTH = 8
MODEL_CASES = {
    "3-frames": (3, 6, 8, (0.0, 999.0), (5, 8)),
    "1-frame-square": (1, 8, 8, (500.0, 17.5), (8, 1)),  # 1 valid token: the empty prompt's "</s>"
    "tall-5-frames": (5, 10, 4, (250.25, 1000.0), (3, 6)),
}
CAPTURE_CASE = "3-frames"  # batch row 0 (5 of 8 text tokens valid)
CAPTURE_LAYERS = (0, 1, 46, 47)  # stored (the live test compares every layer); 47 is context_pre_only


def hub_transformer_config(tiny: bool = True) -> dict:
    return {**HUB_TRANSFORMER, **(TINY if tiny else {})}


def build_transformer():
    """diffusers' Mochi transformer from the tiny Hub config form, with seeded random weights."""
    diffusers = tools.quiet_diffusers()
    config = {k: v for k, v in hub_transformer_config().items() if not k.startswith("_")}
    torch.manual_seed(SEED)
    model = diffusers.MochiTransformer3DModel.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, WEIGHT_STD)
        for name, p in model.named_parameters():  # inputs of the RMSNorms as small as their eps (see SMALL_INPUTS)
            p.mul_(next((f for suffix, f in SMALL_INPUTS.items() if name.endswith(suffix)), 1.0))
    return model


@functools.cache
def load_transformer():
    """The written folder's transformer through diffusers' own loading, in fp32; loaded once (main writes the folder
    first)."""
    return tools.quiet_diffusers().MochiTransformer3DModel.from_pretrained(TRANSFORMER,
                                                                           torch_dtype=torch.float32).eval()


def model_inputs(case: str) -> dict[str, torch.Tensor]:
    frames, h, w, timesteps, valid = MODEL_CASES[case]
    generator = torch.Generator().manual_seed(SEED + list(MODEL_CASES).index(case))
    mask = torch.stack([torch.arange(TEXT_LENGTH) < n for n in valid]).long()  # (2, Lt), 1 = token
    return {"x": torch.randn(2, 12, frames, h, w, generator=generator), "t": torch.tensor(timesteps),
            "text": torch.randn(2, TEXT_LENGTH, TINY["text_embed_dim"], generator=generator), "mask": mask}


@torch.no_grad()
def reference_forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # MochiRoPE's float32 autocast region warns on the CPU
        warnings.simplefilter("ignore", UserWarning)
        return model(inputs["x"], inputs["text"], inputs["t"], inputs["mask"], return_dict=False)[0]


# ---- capture points -----------------------------------------------------------------------------------------

class Recording:
    """MochiAttnProcessor2_0 run unchanged and watched. The processor runs one F.scaled_dot_product_attention per
    batch row over [visual; valid text] tokens, so with a batch of one: K/img and V/img are that call's first L
    tokens (after the projection, head split, RMS QK-norm and RoPE); K/txt and V/txt are the text projections of
    all Lt tokens (norm_added_k's and add_v_proj's outputs, heads split), checked against the call's valid ones;
    A/img is to_out[0]'s output, A/txt to_add_out's (absent in the last block), over all Lt text tokens."""

    def __init__(self, original, layer: str, store: dict):
        self.original, self.layer, self.store = original, layer, store

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        assert hidden_states.shape[0] == 1, "captures are taken with a batch of one"
        outputs: dict[str, torch.Tensor] = {}
        watched = {"k_txt": attn.norm_added_k, "v_txt": attn.add_v_proj, "a_img": attn.to_out[0]}
        if hasattr(attn, "to_add_out"):
            watched["a_txt"] = attn.to_add_out

        def keep(name):
            return lambda m, i, out: outputs.__setitem__(name, out.detach().clone())

        hooks = [m.register_forward_hook(keep(name)) for name, m in watched.items()]
        try:
            with _CAPTURES._AttentionCalls() as calls:
                result = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            for hook in hooks:
                hook.remove()
        assert len(calls.kv) == 1 and outputs.keys() == watched.keys(), self.layer
        L, valid = hidden_states.shape[1], attention_mask[0].bool()
        k, v = calls.kv[0]  # (1, Nh, L + valid, Dh)
        k_txt = outputs["k_txt"].transpose(1, 2)  # (1, Nh, Lt, Dh)
        v_txt = outputs["v_txt"].unflatten(2, (attn.heads, -1)).transpose(1, 2)
        assert torch.equal(k[:, :, L:], k_txt[:, :, valid]) and torch.equal(v[:, :, L:], v_txt[:, :, valid])
        prefix = f"{self.layer}/"
        self.store |= {prefix + "K/img": k[:, :, :L].contiguous(), prefix + "V/img": v[:, :, :L].contiguous(),
                       prefix + "K/txt": k_txt.contiguous(), prefix + "V/txt": v_txt.contiguous(),
                       prefix + "A/img": outputs["a_img"]}
        if "a_txt" in outputs:
            self.store[prefix + "A/txt"] = outputs["a_txt"]
        assert torch.equal(result[0], outputs["a_img"]), self.layer  # dropout the identity
        return result


def capture_inputs() -> dict[str, torch.Tensor]:
    return {k: v[:1] for k, v in model_inputs(CAPTURE_CASE).items()}


@torch.no_grad()
def reference_captures() -> dict[str, torch.Tensor]:
    """"<layer>/<K|V|A>/<img|txt>" -> diffusers' tensor at that capture point, for every layer of one forward."""
    model, inputs = load_transformer(), capture_inputs()
    plain = reference_forward(model, inputs)
    store: dict[str, torch.Tensor] = {}
    modules = _CAPTURES.attention_modules(model)
    originals = {name: m.processor for name, m in modules.items()}
    for name, m in modules.items():
        m.processor = Recording(originals[name], name, store)
    try:
        watched = reference_forward(model, inputs)
    finally:
        for name, m in modules.items():
            m.processor = originals[name]
    assert torch.equal(watched, plain), "watching the processors changed the output"
    assert {key.split("/")[0] for key in store} == set(modules), "a layer did not run"
    assert len(modules) == model.config.num_layers
    return store


# ---- writing the folder -------------------------------------------------------------------------------------------

def write_transformer(model) -> None:
    """The Hub's files: fp32 shards plus the index; config.json in the Hub form."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(TRANSFORMER, safe_serialization=True, max_shard_size=size * 11 // 10 // TRANSFORMER_SHARDS)
    tools.write_sorted_json(TRANSFORMER / "config.json", hub_transformer_config())
    files = sorted(p.name for p in TRANSFORMER.glob("*.safetensors"))
    assert files == [f"diffusion_pytorch_model-0000{i}-of-0000{TRANSFORMER_SHARDS}.safetensors"
                     for i in range(1, TRANSFORMER_SHARDS + 1)], files
    assert (TRANSFORMER / "diffusion_pytorch_model.safetensors.index.json").is_file()


def fullsize_table() -> dict:
    """The full-size Mochi transformer on the meta device: parameter count, key names and shapes."""
    diffusers = tools.quiet_diffusers()
    config = {k: v for k, v in hub_transformer_config(tiny=False).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = diffusers.MochiTransformer3DModel.from_config(config)
    return {"mochi-1-preview": {"parameters": sum(p.numel() for p in model.parameters()),
                                "keys": {k: list(v.shape) for k, v in model.state_dict().items()}}}


def main() -> None:
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)
    assert len(json.dumps(hub_transformer_config(tiny=False), indent=2, sort_keys=True)) + 1 == HUB_SIZE

    model = build_transformer()
    write_transformer(model)
    loaded = load_transformer()
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name
    tensors = {}
    for case in MODEL_CASES:
        inputs = model_inputs(case)
        tensors |= {f"model/{case}/{k}": v for k, v in inputs.items()}
        tensors[f"model/{case}/out"] = reference_forward(loaded, inputs)
    keep = {f"transformer_blocks.{i}.attn1" for i in CAPTURE_LAYERS}
    tensors |= {f"captures/{k}": v for k, v in reference_captures().items() if k.split("/")[0] in keep}

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, REFERENCE)
    (FIXTURES / "fullsize.json").write_text(json.dumps(fullsize_table()) + "\n")
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", tools.versions("diffusers", "torch", "safetensors"))
    print(f"wrote {FIXTURES} ({REFERENCE.stat().st_size / 1e3:.0f} kB reference): " + ", ".join(
        f"{k} {tuple(v.shape)}" for k, v in tensors.items() if k.endswith("/out")))


if __name__ == "__main__":
    main()
