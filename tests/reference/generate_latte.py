"""Reference fixtures for the Latte-1 tests, computed with diffusers' LatteTransformer3DModel and LattePipeline as
the oracles.

Run by hand when the reference changes (needs the reference extra; reuses tests/fixtures/t5/tiny and
generate_pixart's tiny SD VAE writer):

    python tests/reference/generate_latte.py

It writes, under tests/fixtures/latte/ (the run is deterministic):

    Latte-1/               a whole pipeline folder in the exact Hub layout of maxin-cn/Latte-1, tiny:
                           model_index.json (checkpoints.md §6.1), scheduler/ (the 421-byte version of §6.3, byte
                           size checked), tokenizer/ (the T5 fixture's sentencepiece model), text_encoder/ (the tiny
                           T5 in four shards plus the index, as the Hub has), transformer/ (config.json in the Hub's
                           form: the 503-byte file's keys, size checked at full size, without video_length; one fp32
                           safetensors file), vae/ (a tiny 4-block SD VAE: 8x spatial, like the real one). The
                           transformer has the real depth (28 spatial + 28 temporal blocks) at width 16, so that an
                           analysis of the folder has Latte's 56 (+28 cross) layers.
    reference.safetensors  transformer cases (inputs and outputs), K/V/A captured inside diffusers' attention
                           processors, LattePipeline's final latents, a decoded video; and a "small-variance"
                           case: the same transformer with every gate (and the ungated cross-attention output)
                           scaled by 1e-2 (`small_variance_weights`, applied by the tests to the folder's weights)
                           and a single-frame input whose patch embedding cancels the position table up to noise
                           of std 1e-2, so that the residual stream stays near 1e-2 and every LayerNorm's eps shows
    fullsize.json          the full-size transformer built by diffusers on the meta device: parameter count, key
                           names and shapes
    VERSIONS.json          the library versions that produced the expected outputs

NOTE(official): with this scheduler config (`variance_type: learned_range`) LattePipeline keeps all 8 output channels
and DDIMScheduler.step fails on the shape mismatch (checked below), so the reference pipeline gets the same DDIM
config with `variance_type: fixed_small`, the one change that makes it drop the variance channels (DDIM reads
variance_type nowhere else). The Hub's current 414-byte file may be just that (a guess: "0.30.0" and fixed_small
give 414 bytes).

Functions here are also used by the tests' "live" cases; diffusers and transformers are imported inside functions.
"""

import json
import shutil
from pathlib import Path

import generator_tools as tools
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "latte"
FOLDER = FIXTURES / "Latte-1"
REFERENCE = FIXTURES / "reference.safetensors"
T5_TINY = ROOT / "t5" / "tiny"
_PIXART = tools.generator("generate_pixart")  # its tiny SD VAE writer
_CAPTURES = tools.generator("generate_captures")  # its processor watcher

SEED = 20240523
WEIGHT_STD = 0.2  # random weights of this size make every layer (adaLN included) move the output

# checkpoints.md §6.2: transformer/config.json of maxin-cn/Latte-1 (503 B); video_length is absent
HUB_TRANSFORMER = {
    "_class_name": "LatteTransformer3DModel", "_diffusers_version": "0.30.0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "caption_channels": 4096, "cross_attention_dim": 1152,
    "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False, "norm_eps": 1e-06,
    "norm_type": "ada_norm_single", "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28,
    "out_channels": 8, "patch_size": 2, "sample_size": 64}
# §6.1 (its byte size is not known); the diffusers version written as the transformer's
MODEL_INDEX = {
    "_class_name": "LattePipeline", "_diffusers_version": "0.30.0", "_name_or_path": "diffusers/Latte",
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "LatteTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKL"]}
# §6.3, the 421-byte version (its _diffusers_version is a guess of the right length: some "0.NN.0.dev0")
HUB_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0.dev0", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": False, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "thresholding": False, "timestep_spacing": "leading",
    "trained_betas": None, "variance_type": "learned_range"}
HUB_SIZES = {"transformer": 503, "scheduler": 421}
# tiny: width 16 (2 heads of 8), the T5 width of the tiny T5 fixture (32), a latent side of 8 (64 px); full depth
TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16, "caption_channels": 32,
        "sample_size": 8}
TEXT_SHARDS = 4  # the Hub's text_encoder/ has four shards
VIDEO_LENGTH = 16  # diffusers' default for the absent key: the frames a video must have (or 1)

# transformer cases: latents (B, 4, T, H, W), timesteps, whether row 0 of the text has 4 padded tokens (masked);
# a text mask reaches diffusers' attention only for single frames (see minidit/models/latte.py)
MODEL_CASES = {
    "video/unmasked": ((2, 4, VIDEO_LENGTH, 4, 6), (999, 0), False),  # non-square
    "video/sample-size": ((1, 4, VIDEO_LENGTH, 8, 8), (250,), False),  # the config's own size: the stored 2D table
    "image/masked": ((2, 4, 1, 6, 4), (1, 500), True),
    "image/unmasked": ((2, 4, 1, 6, 4), (1, 500), False),
}
TEXT_LENGTH = 10
PADDED = (4, 0)  # with a mask, the first row has 4 padding tokens, the second none
# capture case: 2 videos of 16 frames of 2 tokens, 3 text tokens; the blocks whose K, V, A are stored
CAPTURE_SHAPE, CAPTURE_TEXT, CAPTURE_T = (2, 4, VIDEO_LENGTH, 2, 4), 3, (700, 40)
CAPTURE_BLOCKS = (0, 13, 27)

# end-to-end pipeline cases: (height, width, frames, guidance); 3 DDIM steps, seed 0
PIPELINE_PROMPT = "  A Small Cabin beside a FROZEN lake, northern lights "
PIPELINE_CASES = {"video": (64, 64, VIDEO_LENGTH, 7.5), "image": (48, 80, 1, 7.5),
                  "no-guidance": (64, 48, VIDEO_LENGTH, 1.0)}
GATE_SCALE, SMALL_STD = 1e-2, 1e-2  # the small-variance case
SMALL_VARIANCE_T = (500, 20)
PIPELINE_STEPS = 3
PIPELINE_SEED = 0
DECODE_SHAPE = (1, 4, VIDEO_LENGTH, 4, 6)  # 16 frames: one chunk of 14 and one of 2


def hub_transformer_config(tiny: bool = True) -> dict:
    return {**HUB_TRANSFORMER, **(TINY if tiny else {})}


def diffusers_config(tiny: bool = True) -> dict:
    return {k: v for k, v in hub_transformer_config(tiny).items() if not k.startswith("_")}


def build_transformer():
    """diffusers' Latte transformer from the Hub config form, with seeded random weights."""
    diffusers = tools.quiet_diffusers()
    torch.manual_seed(SEED)
    model = diffusers.LatteTransformer3DModel.from_config(diffusers_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, WEIGHT_STD)
    return model


def load_transformer(folder: Path = FOLDER / "transformer"):
    diffusers = tools.quiet_diffusers()
    return diffusers.LatteTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()


def model_inputs(case: str) -> dict[str, torch.Tensor]:
    shape, timesteps, masked = MODEL_CASES[case]
    generator = torch.Generator().manual_seed(SEED + 1)  # the masked and unmasked cases: the same draws
    inputs = {"x": torch.randn(shape, generator=generator), "t": torch.tensor(timesteps),
              "text": torch.randn(shape[0], TEXT_LENGTH, TINY["caption_channels"], generator=generator)}
    if masked:
        inputs["text_mask"] = torch.stack([(torch.arange(TEXT_LENGTH) < TEXT_LENGTH - p).long() for p in PADDED])
    return inputs


def capture_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 2)
    return {"x": torch.randn(CAPTURE_SHAPE, generator=generator), "t": torch.tensor(CAPTURE_T),
            "text": torch.randn(CAPTURE_SHAPE[0], CAPTURE_TEXT, TINY["caption_channels"], generator=generator)}


@torch.no_grad()
def reference_forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The transformer's output; a (B, Lt) 0/1 mask is given to diffusers as the boolean mask it can take."""
    mask = inputs.get("text_mask")
    return model(inputs["x"], timestep=inputs["t"], encoder_hidden_states=inputs["text"],
                 encoder_attention_mask=None if mask is None else mask.bool()).sample


@torch.no_grad()
def reference_captures(inputs: dict[str, torch.Tensor], blocks=None) -> dict[str, torch.Tensor]:
    """`<layer>/<tensor>/<stream>` -> diffusers' tensor at that capture point, for one forward on `inputs`, for
    the attention layers of `blocks` (all when None). Latte's attention modules run AttnProcessor2_0, as PixArt's
    do, so generate_captures' watcher applies with PixArt's stream rule (K/V text in a cross-attention)."""
    C = _CAPTURES
    reference = load_transformer()
    plain = reference_forward(reference, inputs)
    store: dict[str, torch.Tensor] = {}
    modules = C.attention_modules(reference)
    originals = {name: m.processor for name, m in modules.items()}
    for name, m in modules.items():
        m.set_processor(C.Recording(originals[name], "pixart", name, 0, store))
    try:
        watched = reference_forward(reference, inputs)
    finally:
        for name, m in modules.items():
            m.set_processor(originals[name])
    assert torch.equal(watched, plain), "watching the processors changed the output"
    assert {key.split("/")[0] for key in store} == set(modules), "a layer did not run"
    keep = lambda layer: blocks is None or int(layer.split(".")[1]) in blocks  # noqa: E731
    return {k: v for k, v in store.items() if keep(k.split("/")[0])}


def small_variance_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with the gate rows (gate_msa, gate_mlp) of adaln_single.linear and of every block's
    scale_shift_table, and the cross-attention's output projection, scaled by GATE_SCALE (pure torch: the tests
    apply it to the fixture folder's weights)."""
    dim = sd["scale_shift_table"].shape[1]
    small = {k: v.clone() for k, v in sd.items()}
    for k, v in small.items():
        if k in ("adaln_single.linear.weight", "adaln_single.linear.bias"):
            for chunk in (2, 5):  # (shift, scale, gate) for attention, then for the FFN
                v[chunk * dim:(chunk + 1) * dim] *= GATE_SCALE
        elif k.endswith(".scale_shift_table"):  # the blocks' (not the final layer's)
            v[[2, 5]] *= GATE_SCALE
        elif ".attn2.to_out.0." in k:
            v *= GATE_SCALE
    return small


def small_variance_inputs(model) -> dict[str, torch.Tensor]:
    """Single frames at the config's size whose patch embedding cancels the 2D sin-cos table up to noise of std
    SMALL_STD: the square patch-embedding matrix (C p p = D) inverted in float64 for every patch."""
    p, c, n = model.config.patch_size, model.config.in_channels, model.config.sample_size // model.config.patch_size
    conv, batch = model.pos_embed.proj, len(SMALL_VARIANCE_T)
    w = conv.weight.double().reshape(conv.weight.shape[0], -1)  # (D, C p p), columns in (c, kh, kw) order
    g = torch.Generator().manual_seed(SEED + 4)
    target = SMALL_STD * torch.randn(batch, n * n, w.shape[0], generator=g, dtype=torch.float64)
    patches = torch.linalg.solve(w, (target - conv.bias.double() - model.pos_embed.pos_embed.double()).mT).mT
    x = patches.reshape(batch, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(batch, c, 1, n * p, n * p)
    text = torch.randn(batch, TEXT_LENGTH, TINY["caption_channels"], generator=g)
    return {"x": x.float(), "t": torch.tensor(SMALL_VARIANCE_T), "text": text}


def small_variance_eps_effects(small, inputs: dict[str, torch.Tensor], expected: torch.Tensor) -> dict[str, float]:
    """How far a LayerNorm eps of 1e-5 instead of 1e-6 moves the small-variance output, per group of norms."""
    groups = {"final": [small.norm_out],
              "spatial": [n for b in small.transformer_blocks for n in (b.norm1, b.norm2)],
              "temporal": [n for b in small.temporal_transformer_blocks for n in (b.norm1, b.norm2)]}
    moved = {}
    for name, norms in groups.items():
        for norm in norms:
            norm.eps = 1e-5
        out = reference_forward(small, inputs)
        for norm in norms:
            norm.eps = 1e-6
        moved[name] = ((out - expected).abs().max() / expected.abs().max().clamp(min=1)).item()
    return moved


def write_transformer(folder: Path, model) -> None:
    from safetensors.torch import save_file

    tools.write_sorted_json(folder / "config.json", hub_transformer_config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def write_text_encoder(folder: Path) -> None:
    """The tiny T5 fixture re-saved in four shards plus the index, with the Hub's config form."""
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(T5_TINY / "text_encoder", torch_dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{size * 3 // 10 // 1000}KB")
    shutil.copy(T5_TINY / "text_encoder" / "config.json", folder / "config.json")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-0000{TEXT_SHARDS}.safetensors" for i in range(1, TEXT_SHARDS + 1)], shards


def write_pipeline_folder(folder: Path, transformer) -> None:
    tools.write_sorted_json(folder / "model_index.json", MODEL_INDEX)
    tools.write_sorted_json(folder / "scheduler" / "scheduler_config.json", HUB_SCHEDULER)
    shutil.copytree(T5_TINY / "tokenizer", folder / "tokenizer")
    write_text_encoder(folder / "text_encoder")
    write_transformer(folder / "transformer", transformer)
    _PIXART.write_vae(folder / "vae")


def load_pipeline(folder: Path = FOLDER, variance_type: str = "fixed_small"):
    """LattePipeline from the folder, its DDIM config's variance_type replaced (see the module's NOTE)."""
    diffusers = tools.quiet_diffusers()
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = diffusers.DDIMScheduler.from_config({**config, "variance_type": variance_type})
    pipe = diffusers.LattePipeline.from_pretrained(folder, scheduler=scheduler, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_pipeline(case: str, folder: Path = FOLDER, variance_type: str = "fixed_small") -> torch.Tensor:
    """LattePipeline's final latents (output_type="latent") for a case, in fp32 on the CPU. clean_caption=False is
    what its default (True) falls back to without bs4 and ftfy: the prompt lower-cased and stripped."""
    height, width, frames, guidance = PIPELINE_CASES[case]
    pipe = load_pipeline(folder, variance_type)
    generator = torch.Generator("cpu").manual_seed(PIPELINE_SEED)
    return pipe(PIPELINE_PROMPT, num_inference_steps=PIPELINE_STEPS, guidance_scale=guidance, video_length=frames,
                height=height, width=width, generator=generator, output_type="latent", clean_caption=False).frames


@torch.no_grad()
def reference_mask_feature(prompt: str, folder: Path = FOLDER) -> tuple[torch.Tensor, torch.Tensor]:
    """LattePipeline.encode_prompt's (prompt, negative "") T5 states for a batch of one, with mask_feature."""
    return load_pipeline(folder).encode_prompt(prompt, negative_prompt="", clean_caption=False, mask_feature=True)


@torch.no_grad()
def reference_decode(latents: torch.Tensor, folder: Path = FOLDER):
    """The pipeline's decoding of (B, 4, T, h, w) latents, as its output_type="pil" frames: uint8 (B, T, H, W, 3)."""
    import numpy as np

    pipe = load_pipeline(folder)
    video = pipe.decode_latents(latents, latents.shape[2])  # (B, 3, T, H, W), decode_chunk_size 14
    frames = pipe.video_processor.postprocess_video(video=video, output_type="pil")
    return np.stack([np.stack([np.asarray(image) for image in clip]) for clip in frames])


def check_learned_range_fails(folder: Path) -> None:
    """The module's NOTE: the Hub's scheduler config as it is makes LattePipeline fail."""
    try:
        reference_pipeline("image", folder, variance_type="learned_range")
    except RuntimeError as e:
        assert "must match the size of tensor b (8)" in str(e), e
    else:
        raise AssertionError("LattePipeline ran with variance_type learned_range: revisit the NOTE")


def fullsize_table() -> dict:
    """The full-size Latte-1 transformer on the meta device: parameter count, key names and shapes."""
    diffusers = tools.quiet_diffusers()
    with torch.device("meta"):
        model = diffusers.LatteTransformer3DModel.from_config(diffusers_config(tiny=False))
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "keys": {k: list(v.shape) for k, v in model.state_dict().items()}}


def main() -> None:
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)
    for name, content in (("transformer", hub_transformer_config(tiny=False)), ("scheduler", HUB_SCHEDULER)):
        assert len(json.dumps(content, indent=2, sort_keys=True)) + 1 == HUB_SIZES[name], name  # §6.2, §6.3

    model = build_transformer()
    write_pipeline_folder(FOLDER, model)
    loaded = load_transformer()  # through diffusers' own loading of the written files
    assert loaded.config.video_length == VIDEO_LENGTH and loaded.pos_embed.interpolation_scale == 1
    tensors = {}
    for case in MODEL_CASES:
        inputs = model_inputs(case)
        out = reference_forward(loaded, inputs)
        assert torch.equal(out, reference_forward(model, inputs))
        tensors |= {f"model/{case}/{k}": v for k, v in inputs.items()} | {f"model/{case}/out": out}
    masked, unmasked = tensors["model/image/masked/out"], tensors["model/image/unmasked/out"]
    assert not torch.allclose(masked[0], unmasked[0]) and torch.equal(masked[1], unmasked[1])

    small = load_transformer()
    small.load_state_dict(small_variance_weights(small.state_dict()))
    inputs = small_variance_inputs(small)
    with torch.no_grad():
        first = small.pos_embed(inputs["x"][:, :, 0])  # the first LayerNorm's input
    assert first.std(dim=-1).max() < 3 * SMALL_STD, first.std(dim=-1).max()
    out = reference_forward(small, inputs)
    moved = small_variance_eps_effects(small, inputs, out)
    print(f"small-variance case: a LayerNorm eps of 1e-5 instead of 1e-6 moves the output by {moved}")
    assert min(moved.values()) > 1e-4, moved  # 10x and more the tests' tolerance
    tensors |= {f"small-variance/{k}": v for k, v in inputs.items()} | {"small-variance/out": out}

    inputs = capture_inputs()
    tensors |= {f"captures/input/{k}": v for k, v in inputs.items()}
    tensors |= {f"captures/{k}": v for k, v in reference_captures(inputs, CAPTURE_BLOCKS).items()}

    check_learned_range_fails(FOLDER)
    for case in PIPELINE_CASES:
        tensors[f"pipeline/{case}/latents"] = reference_pipeline(case).contiguous()
    prompt_embeds, negative_embeds = reference_mask_feature(PIPELINE_PROMPT)
    tensors["mask_feature/prompt"], tensors["mask_feature/negative"] = prompt_embeds, negative_embeds
    latents = torch.randn(DECODE_SHAPE, generator=torch.Generator().manual_seed(SEED + 3))
    tensors["decode/latents"] = latents
    tensors["decode/frames"] = torch.from_numpy(reference_decode(latents))

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, REFERENCE)
    (FIXTURES / "fullsize.json").write_text(json.dumps(fullsize_table()) + "\n")
    versions = tools.versions("diffusers", "transformers", "torch", "numpy", "safetensors")
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", versions)
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"wrote {FIXTURES} ({size / 1e6:.2f} MB): " + ", ".join(
        f"{k} {tuple(v.shape)}" for k, v in tensors.items() if k.endswith(("/out", "/latents", "/frames"))))


if __name__ == "__main__":
    main()
