"""Reference fixtures for the PixArt-α tests, computed with diffusers' PixArtTransformer2DModel and
PixArtAlphaPipeline as the oracles.

Run by hand when the reference changes (needs the reference extra; reuses tests/fixtures/t5/tiny and the
DPM-Solver config of tests/fixtures/dpm_solver):

    python tests/reference/generate_pixart.py

It writes, under tests/fixtures/pixart/ (the run is deterministic):

    PixArt-XL-2-1024-MS/   a whole pipeline folder in the exact Hub layout of the 1024 repo, tiny:
                           model_index.json (byte-exact), scheduler/ (byte-exact), tokenizer/ (the T5 fixture's
                           sentencepiece model), text_encoder/ (the tiny T5 in two shards plus the index, the
                           Hub's config form), transformer/ (config.json in the Hub's legacy form, without
                           use_additional_conditions and interpolation_scale, as the 1024 file is), vae/ (a tiny
                           4-block SD VAE: 8x spatial, like the real one)
    PixArt-XL-2-512x512/   transformer/ only: the 512 repo's config form (sample_size 64: no micro-conditions,
                           interpolation scale 1)
    original/PixArt-tiny.pth   the 1024 folder's transformer in the original PixArt layout ({"state_dict": ...},
                           fused qkv and kv, plus y_embedding and pos_embed), as the released .pth files are
    reference.safetensors  transformer cases (inputs and outputs) and the end-to-end pipeline latents
    fullsize.json          the full-size configs built by diffusers on the meta device: parameter counts, key
                           names and shapes, and the byte size of the Hub config files reproduced here
    VERSIONS.json          the library versions that produced the expected outputs

Functions here are also used by the tests' "live" cases; diffusers is imported inside the functions that need it.
"""

import json
import shutil
from pathlib import Path

import generator_tools as tools
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "pixart"
REFERENCE = FIXTURES / "reference.safetensors"
FOLDER_1024 = FIXTURES / "PixArt-XL-2-1024-MS"
FOLDER_512 = FIXTURES / "PixArt-XL-2-512x512"
ORIGINAL = FIXTURES / "original" / "PixArt-tiny.pth"
T5_TINY = ROOT / "t5" / "tiny"
DPM_CONFIG = ROOT / "dpm_solver" / "scheduler_config.json"

SEED = 20240611
WEIGHT_STD = 0.2  # random weights of this size make every layer (adaLN included) move the output
DIFFUSERS_VERSION = "0.22.0.dev0"  # what the PixArt repos' JSON files were written with

# checkpoints.md §2.2: transformer/config.json of PixArt-XL-2-1024-MS (719 B), in the legacy class form
HUB_TRANSFORMER = {
    "_class_name": "Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION, "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "attention_type": "default", "caption_channels": 4096,
    "cross_attention_dim": 1152, "double_self_attention": False, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single",
    "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
    "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 128, "upcast_attention": False,
    "use_linear_projection": False}
HUB_SIZES = {"transformer-1024": 719, "transformer-512": 718, "model_index": 400}
MODEL_INDEX = {
    "_class_name": "PixArtAlphaPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"]}
# tiny: width 24 (the micro-condition embedders are D/3 wide), T5 width of the tiny T5 fixture (32); the 1024
# folder keeps the real 28 blocks (so that an analysis of it has PixArt's 28 layers), the 512 one has 2
TINY = {"num_attention_heads": 2, "attention_head_dim": 12, "cross_attention_dim": 24, "caption_channels": 32}
TINY_LAYERS = {128: 28, 64: 2}
TINY_VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
            "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4, "out_channels": 3, "sample_size": 64,
            "up_block_types": ["UpDecoderBlock2D"] * 4}
TEXT_SHARDS = 2  # the 1024 repo's text_encoder/ has two shards

# transformer cases: latents (B, 4, H, W) non-square, text length, padded tokens per row, micro-conditions
MODEL_CASES = {
    "1024/masked": ("1024", True),
    "1024/unmasked": ("1024", False),
    "512/masked": ("512", True),
}
LATENT_SHAPE = (2, 4, 8, 12)
TEXT_LENGTH = 10
PADDED = (4, 0)  # the first row has 4 padding tokens, the second none
MICRO = ([[768.0, 1280.0], [768.0, 1280.0]], [[0.6], [0.6]])  # resolution [h, w] and aspect ratio h / w

# end-to-end pipeline cases: requested (height, width) or None for the default; 4 steps, guidance 4.5, seed 0
PIPELINE_PROMPT = "A small cabin beside a frozen lake, northern lights"
PIPELINE_CASES = {"default": (None, None), "wide": (700, 1200)}
PIPELINE_STEPS = 4
PIPELINE_GUIDANCE = 4.5
PIPELINE_SEED = 0


def hub_transformer_config(sample_size: int, tiny: bool = True) -> dict:
    shrink = {**TINY, "num_layers": TINY_LAYERS[sample_size]} if tiny else {}
    return {**HUB_TRANSFORMER, "sample_size": sample_size, **shrink}


def build_transformer(sample_size: int):
    """diffusers' PixArt transformer from the Hub config form, with seeded random weights."""
    diffusers = tools.quiet_diffusers()
    config = {k: v for k, v in hub_transformer_config(sample_size).items() if not k.startswith("_")}
    torch.manual_seed(SEED + sample_size)
    model = diffusers.PixArtTransformer2DModel.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, WEIGHT_STD)
    return model


def load_transformer(folder: Path):
    return tools.quiet_diffusers().PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()


def model_inputs(variant: str, masked: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 1)
    inputs = {"x": torch.randn(LATENT_SHAPE, generator=generator),
              "t": torch.tensor([999, 17]),
              "text": torch.randn(LATENT_SHAPE[0], TEXT_LENGTH, TINY["caption_channels"], generator=generator)}
    if masked:
        inputs["text_mask"] = torch.stack([(torch.arange(TEXT_LENGTH) < TEXT_LENGTH - p).long() for p in PADDED])
    if variant == "1024":
        inputs["resolution"], inputs["aspect_ratio"] = torch.tensor(MICRO[0]), torch.tensor(MICRO[1])
    return inputs


@torch.no_grad()
def reference_forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    micro = {"resolution": inputs.get("resolution"), "aspect_ratio": inputs.get("aspect_ratio")}
    return model(inputs["x"], encoder_hidden_states=inputs["text"], encoder_attention_mask=inputs.get("text_mask"),
                 timestep=inputs["t"], added_cond_kwargs=micro).sample


def to_original(sd: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The diffusers layout back to the original PixArt one (checkpoints.md §2.7), written independently of
    minidit's rename table: fused qkv and kv, plus the tensors diffusers drops."""
    renames = [("pos_embed.proj.", "x_embedder.proj."),
               ("adaln_single.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
               ("adaln_single.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
               ("adaln_single.emb.resolution_embedder.linear_1.", "csize_embedder.mlp.0."),
               ("adaln_single.emb.resolution_embedder.linear_2.", "csize_embedder.mlp.2."),
               ("adaln_single.emb.aspect_ratio_embedder.linear_1.", "ar_embedder.mlp.0."),
               ("adaln_single.emb.aspect_ratio_embedder.linear_2.", "ar_embedder.mlp.2."),
               ("adaln_single.linear.", "t_block.1."), ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
               ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."), ("proj_out.", "final_layer.linear."),
               ("scale_shift_table", "final_layer.scale_shift_table")]
    out = {}
    for key, tensor in sd.items():
        if key.startswith("transformer_blocks."):
            continue
        for new, old in renames:
            if key.startswith(new):
                out[old + key[len(new):]] = tensor
                break
        else:
            raise AssertionError(key)
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        b = lambda name: sd[f"transformer_blocks.{i}.{name}"]  # noqa: E731
        o = f"blocks.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.qkv.{p}"] = torch.cat([b(f"attn1.to_q.{p}"), b(f"attn1.to_k.{p}"), b(f"attn1.to_v.{p}")])
            out[o + f"attn.proj.{p}"] = b(f"attn1.to_out.0.{p}")
            out[o + f"cross_attn.q_linear.{p}"] = b(f"attn2.to_q.{p}")
            out[o + f"cross_attn.kv_linear.{p}"] = torch.cat([b(f"attn2.to_k.{p}"), b(f"attn2.to_v.{p}")])
            out[o + f"cross_attn.proj.{p}"] = b(f"attn2.to_out.0.{p}")
            out[o + f"mlp.fc1.{p}"] = b(f"ff.net.0.proj.{p}")
            out[o + f"mlp.fc2.{p}"] = b(f"ff.net.2.{p}")
        out[o + "scale_shift_table"] = b("scale_shift_table")
    width = sd["proj_out.weight"].shape[1]
    out["y_embedder.y_embedding"] = torch.randn(120, TINY["caption_channels"], generator=generator)
    out["pos_embed"] = torch.randn(1, 16, width, generator=generator)
    return {k: v.contiguous() for k, v in out.items()}


def write_transformer(folder: Path, model, sample_size: int) -> None:
    from safetensors.torch import save_file

    tools.write_sorted_json(folder / "config.json", hub_transformer_config(sample_size))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def write_text_encoder(folder: Path) -> None:
    """The tiny T5 fixture re-saved in two shards plus the index, with the Hub's config form."""
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(T5_TINY / "text_encoder", torch_dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{size * 6 // 10 // 1000}KB")
    shutil.copy(T5_TINY / "text_encoder" / "config.json", folder / "config.json")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-0000{TEXT_SHARDS}.safetensors" for i in range(1, TEXT_SHARDS + 1)], shards


def write_vae(folder: Path) -> None:
    from safetensors.torch import save_file

    diffusers = tools.quiet_diffusers()
    torch.manual_seed(SEED + 2)
    vae = diffusers.AutoencoderKL.from_config({k: v for k, v in TINY_VAE.items() if not k.startswith("_")})
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    tools.write_sorted_json(folder / "config.json", TINY_VAE)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt"})


def write_pipeline_folder(folder: Path, transformer) -> None:
    tools.write_sorted_json(folder / "model_index.json", MODEL_INDEX)
    (folder / "scheduler").mkdir(parents=True)
    shutil.copy(DPM_CONFIG, folder / "scheduler" / "scheduler_config.json")
    shutil.copytree(T5_TINY / "tokenizer", folder / "tokenizer")
    write_text_encoder(folder / "text_encoder")
    write_transformer(folder / "transformer", transformer, 128)
    write_vae(folder / "vae")


@torch.no_grad()
def reference_pipeline(folder: Path, height: int | None, width: int | None) -> torch.Tensor:
    """PixArtAlphaPipeline's final latents (output_type="latent"), in fp32 on the CPU."""
    diffusers = tools.quiet_diffusers()
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(PIPELINE_SEED)
    return pipe(PIPELINE_PROMPT, num_inference_steps=PIPELINE_STEPS, guidance_scale=PIPELINE_GUIDANCE,
                height=height, width=width, generator=generator, output_type="latent", clean_caption=False).images


def reference_resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    from diffusers.image_processor import PixArtImageProcessor

    return PixArtImageProcessor.resize_and_crop_tensor(images, width, height)


def fullsize_tables() -> dict:
    """Full-size PixArt transformers on the meta device: parameter counts, key names and shapes."""
    diffusers = tools.quiet_diffusers()
    tables = {}
    for name, sample_size in (("PixArt-XL-2-1024-MS", 128), ("PixArt-XL-2-512x512", 64)):
        config = {k: v for k, v in hub_transformer_config(sample_size, tiny=False).items() if not k.startswith("_")}
        with torch.device("meta"):
            model = diffusers.PixArtTransformer2DModel.from_config(config)
        sd = model.state_dict()
        tables[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                        "keys": {k: list(v.shape) for k, v in sd.items()}}
    return tables


def main() -> None:
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)
    sizes = {"transformer-1024": hub_transformer_config(128, tiny=False),
             "transformer-512": hub_transformer_config(64, tiny=False), "model_index": MODEL_INDEX}
    for name, content in sizes.items():  # the Hub files' byte sizes (checkpoints.md §2.1)
        assert len(json.dumps(content, indent=2, sort_keys=True)) + 1 == HUB_SIZES[name], name

    models = {"1024": build_transformer(128), "512": build_transformer(64)}
    write_pipeline_folder(FOLDER_1024, models["1024"])
    write_transformer(FOLDER_512 / "transformer", models["512"], 64)
    tensors = {}
    for case, (variant, masked) in MODEL_CASES.items():
        inputs = model_inputs(variant, masked)
        folder = (FOLDER_1024 if variant == "1024" else FOLDER_512) / "transformer"
        loaded = load_transformer(folder)  # through diffusers' own loading of the written files
        assert loaded.adaln_single.emb.use_additional_conditions == (variant == "1024")  # derived from sample_size
        out = reference_forward(loaded, inputs)
        assert torch.equal(out, reference_forward(models[variant], inputs))
        tensors |= {f"model/{case}/{k}": v for k, v in inputs.items()} | {f"model/{case}/out": out}
    assert not torch.equal(tensors["model/1024/masked/out"], tensors["model/1024/unmasked/out"])

    generator = torch.Generator().manual_seed(SEED + 3)
    ORIGINAL.parent.mkdir(parents=True)
    torch.save({"state_dict": to_original(models["1024"].state_dict(), generator)}, ORIGINAL)

    for case, (height, width) in PIPELINE_CASES.items():
        tensors[f"pipeline/{case}/latents"] = reference_pipeline(FOLDER_1024, height, width).contiguous()
    images = torch.rand(1, 3, 24, 40, generator=generator) * 2 - 1
    tensors["resize/images"] = images
    tensors["resize/out"] = reference_resize_and_crop(images, 30, 44).contiguous()

    save_file(tensors, REFERENCE)
    (FIXTURES / "fullsize.json").write_text(json.dumps(fullsize_tables()) + "\n")
    versions = tools.versions("diffusers", "transformers", "torch", "numpy", "safetensors")
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", versions)
    print(f"wrote {FIXTURES}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items() if "out" in k or
                                            "latents" in k))


if __name__ == "__main__":
    main()
