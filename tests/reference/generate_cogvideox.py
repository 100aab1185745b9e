"""Reference fixtures for the CogVideoX tests, computed with diffusers' CogVideoXTransformer3DModel,
CogVideoXDDIMScheduler and CogVideoXPipeline as the oracles.

Run by hand when the reference changes (needs the reference extra; reuses tests/fixtures/t5/tiny through
generate_pixart's T5 writer, and generate_captures' attention-call watcher):

    python tests/reference/generate_cogvideox.py

It writes, under tests/fixtures/cogvideox/ (the run is deterministic):

    CogVideoX-5b/, CogVideoX-2b/
                           whole pipeline folders in the exact Hub layouts of checkpoints.md §5.1, tiny:
                           model_index.json (the real content, 411 bytes), scheduler/scheduler_config.json (the
                           §5.3 values, 482 bytes; snr_shift_scale 1.0 for 5b, 3.0 for 2b), tokenizer/ (the T5
                           fixture's sentencepiece model), text_encoder/ (the tiny T5 in two shards plus the index),
                           transformer/ (config.json in the Hub form: the §5.2 key set, absent keys absent, sizes
                           checked at full size; 5b: two bf16 shards plus the index, 2b: one fp16 file), vae/ (a tiny
                           AutoencoderKLCogVideoX: the pipeline needs one; minidit reads its config only). The
                           transformers have the real depth (42 and 30 blocks) at width 16, RoPE on
                           (5b) and off (2b), so that an analysis of a folder has the real model's layers.
    reference.safetensors  transformer cases (inputs and outputs; RoPE on and off, default and other latent grids,
                           1 to 5 latent frames, several timesteps), K/V/A captured inside diffusers' attention
                           processor, scheduler cases (timesteps, alphas, every step() at 1, 4 and 50 steps), and
                           CogVideoXPipeline's final latents
    fullsize.json          the full-size transformers built by diffusers on the meta device: parameter counts, key
                           names and shapes
    VERSIONS.json          the library versions that produced the expected outputs

Uncertain: the 5b repository's snr_shift_scale. checkpoints.md §5.3 has 3.0 for 2b from the official page and 1.0
for 5b from the conversion script's comment and 5b-derived copies; both files are 482 bytes, so the size cannot
tell. The scheduler cases cover both values.

Functions here are also used by the tests' "live" cases; diffusers and transformers are imported inside functions.
"""

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import generator_tools as tools
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "cogvideox"
REFERENCE = FIXTURES / "reference.safetensors"
FOLDERS = {"5b": FIXTURES / "CogVideoX-5b", "2b": FIXTURES / "CogVideoX-2b"}
_PIXART = tools.generator("generate_pixart")  # its tiny T5 writer (two shards plus the index) and T5_TINY
_CAPTURES = tools.generator("generate_captures")  # its attention-call watcher

SEED = 20240827
WEIGHT_STD = 0.2  # random weights of this size make every layer (adaLN included) move the output
DIFFUSERS_VERSION = "0.30.0.dev0"  # what the CogVideoX repositories' JSON files were written with

# checkpoints.md §5.2: transformer/config.json of CogVideoX-5b (757 B) and -2b (758 B); patch_size_t, ofs_embed_dim,
# use_learned_positional_embeddings and patch_bias are absent
HUB_TRANSFORMER = {
    "_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": DIFFUSERS_VERSION,
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226,
    "norm_elementwise_affine": True, "norm_eps": 1e-05, "num_attention_heads": 30, "num_layers": 30,
    "out_channels": 16, "patch_size": 2, "sample_frames": 49, "sample_height": 60, "sample_width": 90,
    "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4, "temporal_interpolation_scale": 1.0,
    "text_embed_dim": 4096, "time_embed_dim": 512, "timestep_activation_fn": "silu",
    "use_rotary_positional_embeddings": False}
VARIANT = {"5b": {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True},
           "2b": {}}
# checkpoints.md §5.3 (482 B); snr_shift_scale: 2b 3.0 (official page), 5b 1.0 (see the module docstring)
HUB_SCHEDULER = {
    "_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0,
    "timestep_spacing": "trailing", "trained_betas": None}
SNR_SHIFT_SCALE = {"5b": 1.0, "2b": 3.0}
MODEL_INDEX = {
    "_class_name": "CogVideoXPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
HUB_SIZES = {"transformer-5b": 757, "transformer-2b": 758, "scheduler": 482, "model_index": 411}
# tiny: width 16, so that the 42-block folder stays small: 5b one head of 16 (RoPE needs Dh/4 and 3Dh/8 even),
# 2b two heads of 8; the tiny T5's width (32); default 9 frames at 64x96 (latents 3 x 8 x 12); the real depth,
# channels and text length
TINY = {"time_embed_dim": 8, "text_embed_dim": 32, "sample_frames": 9, "sample_height": 8, "sample_width": 12}
TINY_HEADS = {"5b": {"num_attention_heads": 1, "attention_head_dim": 16},
              "2b": {"num_attention_heads": 2, "attention_head_dim": 8}}
STORED_DTYPE = {"5b": torch.bfloat16, "2b": torch.float16}
TRANSFORMER_SHARDS = 2  # 5b's transformer/ has two shards
TINY_VAE = {"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "block_out_channels": [4, 4, 4, 4], "down_block_types": ["CogVideoXDownBlock3D"] * 4,
            "force_upcast": True, "in_channels": 3, "latent_channels": 16, "layers_per_block": 1, "norm_eps": 1e-06,
            "norm_num_groups": 2, "out_channels": 3, "sample_height": 64, "sample_width": 96,
            "temporal_compression_ratio": 4, "up_block_types": ["CogVideoXUpBlock3D"] * 4,
            "use_post_quant_conv": False, "use_quant_conv": False}
VAE_SCALING = {"5b": 0.7, "2b": 1.15258426}  # checkpoints.md §5.4

# transformer cases: variant -> (latent frames T, latent H, W, timesteps of the batch of 2); text: 7 tokens for 5b
# (RoPE: any length), 226 for 2b (its table has exactly max_text_seq_length text rows)
MODEL_CASES = {
    "5b/training-grid": ("5b", 3, 8, 12, (999, 17)),  # the base grid: RoPE crop is the identity
    "5b/cropped": ("5b", 2, 6, 8, (500, 0)),  # another aspect ratio: positions from a crop of the base grid
    "5b/tall-5-frames": ("5b", 5, 12, 6, (332, 666)),
    "2b/training-grid": ("2b", 3, 8, 12, (999, 17)),  # the table the model built at init (9 frames, 8 x 12)
    "2b/other-size": ("2b", 2, 6, 8, (500, 0)),  # the table rebuilt for the input
    "2b/one-frame": ("2b", 1, 12, 4, (332, 666)),
}
TEXT_LENGTH = {"5b": 7, "2b": 226}
CAPTURE_CASE = {"5b": "5b/cropped", "2b": "2b/other-size"}  # batch row 0 of these cases' inputs
CAPTURE_LAYERS = {"5b": (0, 1, 41), "2b": (0, 29)}  # stored (the live test compares every layer)

# scheduler cases: the two Hub configs, and diffusers' defaults (epsilon, leading, no rescale, shift 3.0)
SCHEDULER_CONFIGS = {"5b": {**HUB_SCHEDULER, "snr_shift_scale": 1.0}, "2b": HUB_SCHEDULER, "defaults": {}}
SCHEDULER_STEPS = (1, 4, 50)
STEP_SHAPE = (2, 3, 4)

# end-to-end pipeline cases: (variant, height, width, frames, use_dynamic_cfg); None = the default size
PIPELINE_PROMPT = "A paper boat drifting down a small stream"
PIPELINE_CASES = {
    "5b/default": ("5b", None, None, 5, False),
    "5b/small-dynamic": ("5b", 48, 64, 9, True),
    "2b/default": ("2b", None, None, 5, False),
    "2b/small": ("2b", 48, 64, 9, False),
}
PIPELINE_STEPS = 3
PIPELINE_GUIDANCE = 6.0
PIPELINE_SEED = 0


def hub_transformer_config(variant: str, tiny: bool = True) -> dict:
    return {**HUB_TRANSFORMER, **VARIANT[variant], **({**TINY, **TINY_HEADS[variant]} if tiny else {})}


def hub_scheduler_config(variant: str) -> dict:
    return {**HUB_SCHEDULER, "snr_shift_scale": SNR_SHIFT_SCALE[variant]}


def build_transformer(variant: str):
    """diffusers' CogVideoX transformer from the tiny Hub config form, with seeded random weights."""
    diffusers = tools.quiet_diffusers()
    config = {k: v for k, v in hub_transformer_config(variant).items() if not k.startswith("_")}
    torch.manual_seed(SEED + (5 if variant == "5b" else 2))
    model = diffusers.CogVideoXTransformer3DModel.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, WEIGHT_STD)
    return model


@functools.cache
def load_transformer(variant: str):
    """The written folder's transformer through diffusers' own loading, in fp32 (the stored 16-bit values); loaded
    once (main writes the folders first)."""
    return tools.quiet_diffusers().CogVideoXTransformer3DModel.from_pretrained(
        FOLDERS[variant] / "transformer", torch_dtype=torch.float32).eval()


def rotary_embedding(model, height: int, width: int, latent_frames: int):
    """What CogVideoXPipeline passes the model (None without RoPE): its own _prepare_rotary_positional_embeddings."""
    if not model.config.use_rotary_positional_embeddings:
        return None
    from diffusers import CogVideoXPipeline

    pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height, width, latent_frames, "cpu")


def text_input(variant: str) -> torch.Tensor:
    """The text tokens of every case of a variant (stored once)."""
    generator = torch.Generator().manual_seed(SEED + TEXT_LENGTH[variant])
    return torch.randn(2, TEXT_LENGTH[variant], TINY["text_embed_dim"], generator=generator)


def model_inputs(case: str) -> dict[str, torch.Tensor]:
    """x and t of a case (stored per case), and its variant's text."""
    variant, frames, h, w, timesteps = MODEL_CASES[case]
    generator = torch.Generator().manual_seed(SEED + list(MODEL_CASES).index(case))
    return {"x": torch.randn(2, frames, 16, h, w, generator=generator), "t": torch.tensor(timesteps),
            "text": text_input(variant)}


@torch.no_grad()
def reference_forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    _, frames, _, h, w = inputs["x"].shape
    rope = rotary_embedding(model, 8 * h, 8 * w, frames)
    return model(inputs["x"], inputs["text"], inputs["t"], image_rotary_emb=rope, return_dict=False)[0]


# ---- capture points -----------------------------------------------------------------------------------------

class Recording:
    """CogVideoXAttnProcessor2_0 run unchanged and watched: K and V are what enters F.scaled_dot_product_attention
    (after the projection, head split, QK LayerNorm and, 5b, RoPE on the video tokens), A is the output of
    to_out[0], which CogVideoXAttnProcessor2_0 applies to the whole joint sequence before it splits it; the streams
    are cut in the processor's own concatenation order, [text; video]."""

    def __init__(self, original, layer: str, store: dict):
        self.original, self.layer, self.store = original, layer, store

    # the arguments named: diffusers' Attention passes a processor only the keyword arguments its signature names
    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        outputs = []
        hook = attn.to_out[0].register_forward_hook(lambda m, i, out: outputs.append(out.detach().clone()))
        try:
            with _CAPTURES._AttentionCalls() as calls:
                result = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            hook.remove()
        assert len(calls.kv) == 1 and len(outputs) == 1, self.layer
        streams = (("txt", encoder_hidden_states.shape[1]), ("img", hidden_states.shape[1]))
        k, v = calls.kv[0]
        _CAPTURES._cut(self.store, f"{self.layer}/K", k, 2, streams)
        _CAPTURES._cut(self.store, f"{self.layer}/V", v, 2, streams)
        _CAPTURES._cut(self.store, f"{self.layer}/A", outputs[0], 1, streams)
        video, text = result  # the processor returns (video, text): to_out's output split, dropout the identity
        assert torch.equal(video, self.store[f"{self.layer}/A/img"]), self.layer
        assert torch.equal(text, self.store[f"{self.layer}/A/txt"]), self.layer
        return result


def capture_inputs(variant: str) -> dict[str, torch.Tensor]:
    return {k: v[:1] for k, v in model_inputs(CAPTURE_CASE[variant]).items()}


@torch.no_grad()
def reference_captures(variant: str) -> dict[str, torch.Tensor]:
    """"<layer>/<K|V|A>/<txt|img>" -> diffusers' tensor at that capture point, for every layer of one forward."""
    model, inputs = load_transformer(variant), capture_inputs(variant)
    plain = reference_forward(model, inputs)
    store: dict[str, torch.Tensor] = {}
    modules = _CAPTURES.attention_modules(model)
    originals = {name: m.processor for name, m in modules.items()}
    for name, m in modules.items():
        m.set_processor(Recording(originals[name], name, store))
    try:
        watched = reference_forward(model, inputs)
    finally:
        for name, m in modules.items():
            m.set_processor(originals[name])
    assert torch.equal(watched, plain), "watching the processors changed the output"
    assert {key.split("/")[0] for key in store} == set(modules), "a layer did not run"
    assert len(modules) == model.config.num_layers
    return store


# ---- scheduler --------------------------------------------------------------------------------------------------

def make_scheduler(case: str):
    diffusers = tools.quiet_diffusers()
    config = {k: v for k, v in SCHEDULER_CONFIGS[case].items() if not k.startswith("_")}
    return diffusers.CogVideoXDDIMScheduler.from_config(config)


def step_inputs(case: str, steps: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + steps + 7 * list(SCHEDULER_CONFIGS).index(case))
    return {"sample": torch.randn(steps, *STEP_SHAPE, generator=generator),
            "model_output": torch.randn(steps, *STEP_SHAPE, generator=generator)}


def reference_scheduler(case: str, steps: int) -> dict[str, torch.Tensor]:
    """Timesteps, the alphas, and step() at every timestep on its own random sample and model output (float32), and
    once more on a bfloat16 sample with a float32 model output, as the pipeline steps bf16 latents."""
    scheduler = make_scheduler(case)
    scheduler.set_timesteps(steps)
    inputs = step_inputs(case, steps)
    out = {"timesteps": scheduler.timesteps.clone()}
    out["prev"] = torch.stack([scheduler.step(inputs["model_output"][i], t, inputs["sample"][i], return_dict=False)[0]
                               for i, t in enumerate(scheduler.timesteps)])
    out["prev_bf16"] = torch.stack([scheduler.step(inputs["model_output"][i], t, inputs["sample"][i].bfloat16(),
                                                   return_dict=False)[0] for i, t in enumerate(scheduler.timesteps)])
    return out


# ---- the pipeline -------------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_pipeline(case: str) -> torch.Tensor:
    """CogVideoXPipeline's final latents (output_type="latent"), in fp32 on the CPU."""
    variant, height, width, frames, dynamic = PIPELINE_CASES[case]
    diffusers = tools.quiet_diffusers()
    pipe = diffusers.CogVideoXPipeline.from_pretrained(FOLDERS[variant], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(PIPELINE_SEED)
    return pipe(PIPELINE_PROMPT, height=height, width=width, num_frames=frames, num_inference_steps=PIPELINE_STEPS,
                guidance_scale=PIPELINE_GUIDANCE, use_dynamic_cfg=dynamic, generator=generator,
                output_type="latent").frames


# ---- writing the folders ------------------------------------------------------------------------------------------

def write_transformer(folder: Path, model, variant: str) -> None:
    """The Hub's files: 5b two bf16 shards plus the index, 2b one fp16 file; config.json in the Hub form."""
    stored = STORED_DTYPE[variant]
    copy = model.to(stored)
    size = sum(p.numel() * p.element_size() for p in copy.parameters())
    shard = f"{size * 6 // 10 // 1000}KB" if variant == "5b" else "10GB"
    copy.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    model.to(torch.float32)
    tools.write_sorted_json(folder / "config.json", hub_transformer_config(variant))
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if variant == "5b":
        assert files == [f"diffusion_pytorch_model-0000{i}-of-0000{TRANSFORMER_SHARDS}.safetensors"
                         for i in range(1, TRANSFORMER_SHARDS + 1)], files
        assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    else:
        assert files == ["diffusion_pytorch_model.safetensors"], files


def write_vae(folder: Path, variant: str) -> None:
    diffusers = tools.quiet_diffusers()
    config = {**TINY_VAE, "scaling_factor": VAE_SCALING[variant]}
    torch.manual_seed(SEED + 2)
    vae = diffusers.AutoencoderKLCogVideoX.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    vae.save_pretrained(folder, safe_serialization=True)
    tools.write_sorted_json(folder / "config.json", config)


def write_pipeline_folder(variant: str, model) -> None:
    folder = FOLDERS[variant]
    tools.write_sorted_json(folder / "model_index.json", MODEL_INDEX)
    tools.write_sorted_json(folder / "scheduler" / "scheduler_config.json", hub_scheduler_config(variant))
    shutil.copytree(_PIXART.T5_TINY / "tokenizer", folder / "tokenizer")
    _PIXART.write_text_encoder(folder / "text_encoder")
    write_transformer(folder / "transformer", model, variant)
    write_vae(folder / "vae", variant)


def fullsize_tables() -> dict:
    """Full-size CogVideoX transformers on the meta device: parameter counts, key names and shapes."""
    diffusers = tools.quiet_diffusers()
    tables = {}
    for variant in ("5b", "2b"):
        config = {k: v for k, v in hub_transformer_config(variant, tiny=False).items() if not k.startswith("_")}
        with torch.device("meta"):
            model = diffusers.CogVideoXTransformer3DModel.from_config(config)
        tables[f"CogVideoX-{variant}"] = {"parameters": sum(p.numel() for p in model.parameters()),
                                          "keys": {k: list(v.shape) for k, v in model.state_dict().items()}}
    return tables


def main() -> None:
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)
    sizes = {"transformer-5b": hub_transformer_config("5b", tiny=False),
             "transformer-2b": hub_transformer_config("2b", tiny=False),
             "scheduler": HUB_SCHEDULER, "model_index": MODEL_INDEX}
    for name, content in sizes.items():  # the Hub files' byte sizes (checkpoints.md §5.1)
        assert len(json.dumps(content, indent=2, sort_keys=True)) + 1 == HUB_SIZES[name], name

    tensors = {}
    for variant in ("5b", "2b"):
        model = build_transformer(variant)
        write_pipeline_folder(variant, model)
        loaded = load_transformer(variant)
        for name, p in loaded.state_dict().items():  # the stored 16-bit values, read back exactly
            assert torch.equal(p, model.state_dict()[name].to(STORED_DTYPE[variant]).float()), name
    for case in MODEL_CASES:
        variant = MODEL_CASES[case][0]
        inputs = model_inputs(case)
        out = reference_forward(load_transformer(variant), inputs)
        tensors |= {f"model/{case}/{k}": v for k, v in inputs.items() if k != "text"} | {f"model/{case}/out": out}
    for variant in ("5b", "2b"):
        tensors[f"model/{variant}/text"] = text_input(variant)
    for variant in ("5b", "2b"):
        captures = reference_captures(variant)
        keep = {f"transformer_blocks.{i}.attn1" for i in CAPTURE_LAYERS[variant]}
        tensors |= {f"captures/{variant}/{k}": v for k, v in captures.items() if k.split("/")[0] in keep}
    for case in SCHEDULER_CONFIGS:  # the alphas after the SNR shift and the zero-SNR rescale
        tensors[f"scheduler/{case}/alphas_cumprod"] = make_scheduler(case).alphas_cumprod.clone()
        for steps in SCHEDULER_STEPS:
            tensors |= {f"scheduler/{case}/{steps}/{k}": v for k, v in reference_scheduler(case, steps).items()}
    for case in PIPELINE_CASES:
        tensors[f"pipeline/{case}/latents"] = reference_pipeline(case).contiguous()

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, REFERENCE)
    (FIXTURES / "fullsize.json").write_text(json.dumps(fullsize_tables()) + "\n")
    versions = tools.versions("diffusers", "transformers", "torch", "numpy", "safetensors")
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", versions)
    print(f"wrote {FIXTURES} ({REFERENCE.stat().st_size / 1e3:.0f} kB reference): " + ", ".join(
        f"{k} {tuple(v.shape)}" for k, v in tensors.items() if k.endswith(("/out", "/latents"))))


if __name__ == "__main__":
    main()
