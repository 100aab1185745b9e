"""Reference fixtures for the SD3-medium recipe (minidit/pipelines/sd3.py), computed with diffusers'
StableDiffusion3Pipeline as the oracle.

Run by hand when the reference changes (needs the reference extra; reuses tests/fixtures/clip_tokenizer,
tests/fixtures/t5/tiny and the scheduler configs of tests/fixtures/flow, and the CLIP tokenizer, T5 tokenizer and
sharded T5 writers of generate_flux_pipeline.py):

    python tests/reference/generate_sd3_pipeline.py

It writes, under tests/fixtures/sd3_pipeline/ (the run is deterministic):

    stable-diffusion-3-medium-diffusers/
                           a whole pipeline folder in the exact Hub layout, tiny: model_index.json (the Hub's
                           content; see MODEL_INDEX), scheduler/ (the Hub file), tokenizer/ and tokenizer_2/ (the
                           real CLIP BPE cut to 1000 ids as in generate_flux_pipeline.py; pad `<|endoftext|>` and
                           `!`), text_encoder/ (tiny CLIP-L-like CLIPTextModelWithProjection, width 8, quick GELU,
                           fp16) and text_encoder_2/ (tiny bigG-like, width 16, exact GELU, fp16), tokenizer_3/ (the
                           tiny T5 sentencepiece model plus tokenizer.json), text_encoder_3/ (the tiny T5 of the T5
                           tests, width 32, two shards plus the index), transformer/ (SD3Transformer2DModel with
                           the real 24 joint blocks at width 16, one fp16 file), vae/ (a tiny 4-block 16-channel
                           AutoencoderKL with SD3's scaling 1.5305 and shift 0.0609, no quant convs)
    reference.safetensors  StableDiffusion3Pipeline's final latents for each case in PIPELINE_CASES
    VERSIONS.json          the library versions that produced the expected outputs

Widths: CLIP-L 8 + bigG 16 = 24 = pooled_projection_dim; the pipeline zero-pads those 24 to T5's 32 =
joint_attention_dim (so the padding is exercised). The tiny CLIP vocabulary is 1000 ids (the real 49408 rows would
make each encoder megabytes), with <|endoftext|> the last id as in the real one, so the legacy argmax pooling
finds it whichever pad token follows.

Functions here are also used by the tests' "live" cases; diffusers is imported inside the functions that need it.
"""

import json
import shutil
from pathlib import Path

import generator_tools as tools
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "sd3_pipeline"
REFERENCE = FIXTURES / "reference.safetensors"
FOLDER = FIXTURES / "stable-diffusion-3-medium-diffusers"
CLIP_TOKENIZERS = ROOT / "clip_tokenizer"
SCHEDULERS = ROOT / "flow"

SEED = 20240613
DIFFUSERS_VERSION = "0.29.0.dev0"  # what the SD3-medium JSON files were written with
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
MODEL_INDEX_SIZE = 706  # checkpoints.md §3.1
# checkpoints.md §3.2 (the Hub config), shrunk: 2 heads of 8, text widths of the tiny encoders, the real 24 blocks
# and sample size (so the default is 1024 x 1024); the position table covers the 1024 x 1024 patch grid (64)
HUB_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION, "attention_head_dim": 64,
    "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "sample_size": 128}
TINY = {"attention_head_dim": 8, "num_attention_heads": 2, "caption_projection_dim": 16, "joint_attention_dim": 32,
        "pooled_projection_dim": 24, "pos_embed_max_size": 64}
# the two tiny CLIP encoders (checkpoints.md §11.2, §11.3 in shape, not size)
CLIP_FOLDERS = {
    "text_encoder": dict(hidden_act="quick_gelu", hidden_size=8, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=3, projection_dim=8),
    "text_encoder_2": dict(hidden_act="gelu", hidden_size=16, intermediate_size=64, num_attention_heads=2,
                           num_hidden_layers=3, projection_dim=16),
}
CLIP_TRANSFORMERS_VERSION = "4.41.0.dev0"
# checkpoints.md §3.4, shrunk: 4 blocks (8x), 16 latent channels, SD3's scale and shift, no quant convs
TINY_VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
            "_name_or_path": "../sdv3/sd3_vae", "act_fn": "silu", "block_out_channels": [8, 8, 8, 8],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
            "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 1,
            "norm_num_groups": 4, "out_channels": 3, "sample_size": 64, "scaling_factor": 1.5305,
            "shift_factor": 0.0609, "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False,
            "use_quant_conv": False}

# end-to-end cases: (height, width) or None for the default (1024 x 1024), and the schedule ("sd3": the pipeline's
# own; "flux": FLUX.1-dev's scheduler with FluxPipeline's sigmas, see reference_pipeline); 4 steps, guidance 7.0,
# seed 0
PIPELINE_PROMPT = "A Small cabin beside a frozen lake, Northern Lights"  # capitals: the pipeline keeps the case
PIPELINE_CASES = {"default": (None, None, "sd3"), "wide": (256, 384, "sd3"), "wide-flux": (256, 384, "flux")}
PIPELINE_STEPS = 4
PIPELINE_GUIDANCE = 7.0
PIPELINE_SEED = 0


def write_clip_tokenizers(folder: Path) -> None:
    """tokenizer/ (pad <|endoftext|>) and tokenizer_2/ (pad "!"): the real BPE cut to 1000 ids."""
    flux = tools.generator("generate_flux_pipeline")
    flux.write_clip_tokenizer(folder / "tokenizer")
    (folder / "tokenizer_2").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / "tokenizer" / name, folder / "tokenizer_2")
    shutil.copy(CLIP_TOKENIZERS / "tokenizer_2" / "special_tokens_map.json", folder / "tokenizer_2")
    config = json.loads((CLIP_TOKENIZERS / "tokenizer_2" / "tokenizer_config.json").read_text())
    vocab = flux.CLIP_VOCAB
    config["added_tokens_decoder"] = {{"0": "0", "49406": str(vocab - 2), "49407": str(vocab - 1)}[k]: v
                                      for k, v in config["added_tokens_decoder"].items()}
    tools.write_sorted_json(folder / "tokenizer_2" / "tokenizer_config.json", config)


def write_clip_encoder(folder: Path, name: str, seed: int) -> None:
    """A tiny CLIPTextModelWithProjection with seeded weights (norms and biases moved away from 1 and 0), fp16."""
    import transformers
    from safetensors.torch import save_file

    clip = tools.generator("generate_clip")
    config = clip.hub_config("CLIPTextModelWithProjection", {**CLIP_FOLDERS[name], "vocab_size": clip.VOCAB},
                             "float16", CLIP_TRANSFORMERS_VERSION)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "layer_norm" in key and key.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif key.endswith("bias"):
                p.normal_(0, 0.1)
            elif "embedding" in key:
                p.normal_(0, 0.5)
    sd = clip.hub_state_dict(model)
    tools.write_json(folder / "config.json", config)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


def write_transformer(folder: Path) -> None:
    """diffusers' SD3Transformer2DModel with seeded weights (adaLN included), one fp16 file as the Hub's."""
    from safetensors.torch import save_file

    diffusers = tools.quiet_diffusers()
    config = {**HUB_TRANSFORMER, **TINY}
    torch.manual_seed(SEED)
    model = diffusers.SD3Transformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("proj_out"):  # zero-initialised adaLN / output: make them move
                p.normal_(0, 0.2)
    tools.write_sorted_json(folder / "config.json", config)
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def write_vae(folder: Path) -> None:
    from safetensors.torch import save_file

    diffusers = tools.quiet_diffusers()
    torch.manual_seed(SEED + 1)
    vae = diffusers.AutoencoderKL.from_config({k: v for k, v in TINY_VAE.items() if not k.startswith("_")})
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    tools.write_sorted_json(folder / "config.json", TINY_VAE)
    save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def write_pipeline_folder(folder: Path) -> None:
    flux = tools.generator("generate_flux_pipeline")
    tools.write_sorted_json(folder / "model_index.json", MODEL_INDEX)
    (folder / "scheduler").mkdir()
    shutil.copy(SCHEDULERS / "stable-diffusion-3-medium-diffusers" / "scheduler" / "scheduler_config.json",
                folder / "scheduler")
    write_clip_tokenizers(folder)
    write_clip_encoder(folder / "text_encoder", "text_encoder", SEED + 2)
    write_clip_encoder(folder / "text_encoder_2", "text_encoder_2", SEED + 3)
    flux.write_t5_tokenizer(folder / "tokenizer_3")
    flux.write_text_encoder_2(folder / "text_encoder_3")
    write_transformer(folder / "transformer")
    write_vae(folder / "vae")


@torch.no_grad()
def reference_pipeline(folder: Path, height: int | None, width: int | None, schedule: str = "sd3") -> torch.Tensor:
    """StableDiffusion3Pipeline's final latents (1, 16, H / 8, W / 8), in fp32 on the CPU.

    schedule "flux": the pipeline with FLUX.1-dev's scheduler (dynamic shift) and FluxPipeline's sigmas
    linspace(1, 1/N, N); the pipeline computes mu from its latent size itself.
    """
    import numpy as np

    diffusers = tools.quiet_diffusers()
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if schedule == "flux":
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(SCHEDULERS / "FLUX.1-dev" /
                                                                                   "scheduler")
        extra["sigmas"] = np.linspace(1.0, 1 / PIPELINE_STEPS, PIPELINE_STEPS)
    generator = torch.Generator("cpu").manual_seed(PIPELINE_SEED)
    return pipe(PIPELINE_PROMPT, num_inference_steps=PIPELINE_STEPS, guidance_scale=PIPELINE_GUIDANCE,
                height=height, width=width, generator=generator, output_type="latent", **extra).images


def main() -> None:
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FOLDER.mkdir(parents=True)
    write_pipeline_folder(FOLDER)
    tensors = {}
    for case, (height, width, schedule) in PIPELINE_CASES.items():
        tensors[f"pipeline/{case}/latents"] = reference_pipeline(FOLDER, height, width, schedule).contiguous()
    save_file(tensors, REFERENCE)
    versions = tools.versions("diffusers", "transformers", "torch", "numpy", "safetensors")
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", versions)
    print(f"wrote {FIXTURES}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))


if __name__ == "__main__":
    main()
