"""Reference fixtures for the FLUX.1 recipe (minidit/pipelines/flux.py), computed with diffusers' FluxPipeline as
the oracle.

Run by hand when the reference changes (needs the reference extra; reuses tests/fixtures/clip/flux,
tests/fixtures/clip_tokenizer, tests/fixtures/t5/tiny and the scheduler configs of tests/fixtures/flow):

    python tests/reference/generate_flux_pipeline.py

It writes, under tests/fixtures/flux_pipeline/ (the run is deterministic):

    FLUX.1-dev/            a whole pipeline folder in the exact Hub layout of black-forest-labs/FLUX.1-dev, tiny:
                           model_index.json (byte-exact, 536 B), scheduler/ (the Hub file), tokenizer/ (CLIP BPE cut
                           to the tiny vocabulary below), text_encoder/ (the tiny CLIPTextModel of the CLIP tests,
                           bf16), tokenizer_2/ (the tiny T5 sentencepiece model plus the tokenizer.json that
                           T5TokenizerFast writes from it), text_encoder_2/ (the tiny T5 in two shards plus the
                           index), transformer/ (19 double + 38 single blocks at width 16, bf16, three shards plus
                           the index, the Hub's config form), vae/ (a tiny 4-block 16-channel AutoencoderKL with
                           FLUX's scaling and shift factors)
    FLUX.1-undistilled/    the same layout and files, except a transformer with guidance_embeds false (no guidance
                           embedder, its own seed): an undistilled FLUX such as flux-tiny, sampled with true CFG;
                           the dev scheduler config is kept (dynamic shift), so it is not schnell
    reference.safetensors  FluxPipeline's final latents (unpacked with the pipeline's own _unpack_latents) for each
                           case (FLUX.1-dev's PIPELINE_CASES, then FLUX.1-undistilled's TRUE_CFG_CASES), and the
                           sigmas of SD3's scheduler for the "sd3" schedule
    VERSIONS.json          the library versions that produced the expected outputs

The tiny CLIP vocabulary (1000 ids) is the real one cut down: the 512 byte symbols (ids 0..511, as in the real
vocab.json), the first 486 merges (ids 512..997, as in the real file), then <|startoftext|> 998 and
<|endoftext|> 999, the two highest ids as 49406 and 49407 are, so the tiny CLIPTextModel of tests/fixtures/clip
(vocab 1000) reads it, and its legacy argmax pooling finds the end of text.

Functions here are also used by the tests' "live" cases; diffusers is imported inside the functions that need it.
"""

import json
import shutil
from pathlib import Path

import generator_tools as tools
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "flux_pipeline"
REFERENCE = FIXTURES / "reference.safetensors"
FOLDER = FIXTURES / "FLUX.1-dev"
UNDISTILLED = FIXTURES / "FLUX.1-undistilled"
CLIP_TEXT_ENCODER = ROOT / "clip" / "flux" / "text_encoder"
CLIP_TOKENIZER = ROOT / "clip_tokenizer" / "tokenizer"
T5_TINY = ROOT / "t5" / "tiny"
SCHEDULERS = ROOT / "flow"

SEED = 20240612
DIFFUSERS_VERSION = "0.30.0.dev0"  # what the FLUX.1-dev JSON files were written with
MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"]}
MODEL_INDEX_SIZE = 536  # checkpoints.md §4.1
CLIP_VOCAB = 1000
BYTE_SYMBOLS = 512  # 256 bytes, then the same 256 with "</w>"
# checkpoints.md §4.2: the dev config (absent axes_dims_rope and out_channels); tiny: 2 heads of 8, RoPE 2+2+4,
# text widths of the tiny CLIP (32) and T5 (32); the real 19 + 38 blocks, so an analysis has FLUX's 57 layers
HUB_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
    "_name_or_path": "../checkpoints/flux-dev/transformer", "attention_head_dim": 128, "guidance_embeds": True,
    "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
    "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
TINY = {"attention_head_dim": 8, "num_attention_heads": 2, "axes_dims_rope": [2, 2, 4], "joint_attention_dim": 32,
        "pooled_projection_dim": 32}
TRANSFORMER_SHARDS = 3
TEXT_SHARDS = 2
# checkpoints.md §4.4, shrunk: 4 blocks (8x), 16 latent channels, FLUX's scale and shift
TINY_VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
            "_name_or_path": "../checkpoints/flux-dev", "act_fn": "silu", "block_out_channels": [8, 8, 8, 8],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
            "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 1,
            "mid_block_add_attention": True, "norm_num_groups": 4, "out_channels": 3, "sample_size": 64,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "use_post_quant_conv": False, "use_quant_conv": False}

# end-to-end cases: (height, width) or None for the default (1024 x 1024), and the schedule ("flux": FluxPipeline's
# own; "sd3": SD3's scheduler, see reference_pipeline); 4 steps, guidance 3.5, seed 0
PIPELINE_PROMPT = "A Small cabin beside a frozen lake, Northern Lights"  # capitals: FluxPipeline keeps the case
PIPELINE_CASES = {"default": (None, None, "flux"), "wide": (256, 384, "flux"), "wide-sd3": (256, 384, "sd3")}
PIPELINE_STEPS = 4
PIPELINE_GUIDANCE = 3.5
PIPELINE_SEED = 0
SD3_STEPS = (4, 28)
# FLUX.1-undistilled's cases, as PIPELINE_CASES: FluxPipeline(true_cfg_scale=4.0, negative_prompt=""), 4 steps, seed 0,
# T5 length 256 (minidit's default without a guidance embedder; FluxPipeline's own is 512, so it is passed)
TRUE_CFG_CASES = {"true-cfg": (256, 384, "flux")}
TRUE_CFG_SCALE = 4.0
TRUE_CFG_T5_LENGTH = 256


def write_clip_tokenizer(folder: Path) -> None:
    """The real CLIP BPE files cut to CLIP_VOCAB ids (see the module docstring)."""
    vocab = json.loads((CLIP_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    merges = (CLIP_TOKENIZER / "merges.txt").read_text(encoding="utf-8").split("\n")
    header, kept = merges[0], merges[1:1 + CLIP_VOCAB - BYTE_SYMBOLS - 2]
    tiny = {token: i for token, i in vocab.items() if i < BYTE_SYMBOLS + len(kept)}
    assert sorted(tiny.values()) == list(range(len(tiny))) and all("".join(m.split()) in tiny for m in kept)
    tiny |= {"<|startoftext|>": CLIP_VOCAB - 2, "<|endoftext|>": CLIP_VOCAB - 1}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tiny, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")
    shutil.copy(CLIP_TOKENIZER / "special_tokens_map.json", folder)
    config = json.loads((CLIP_TOKENIZER / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(CLIP_VOCAB - 2 + i): v for i, v in
                                      enumerate(config["added_tokens_decoder"].values())}
    tools.write_sorted_json(folder / "tokenizer_config.json", config)


def write_t5_tokenizer(folder: Path) -> None:
    """The tiny sentencepiece model, plus tokenizer.json as T5TokenizerFast writes it (the Hub folder has both)."""
    from transformers import T5TokenizerFast

    shutil.copytree(T5_TINY / "tokenizer", folder)
    tokenizer = T5TokenizerFast.from_pretrained(folder)
    scratch = folder.parent / "_scratch"
    tokenizer.save_pretrained(scratch)
    shutil.copy(scratch / "tokenizer.json", folder / "tokenizer.json")
    shutil.rmtree(scratch)


def write_text_encoder_2(folder: Path) -> None:
    """The tiny T5 fixture re-saved in two shards plus the index, with its config file."""
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(T5_TINY / "text_encoder", torch_dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{size * 6 // 10 // 1000}KB")
    shutil.copy(T5_TINY / "text_encoder" / "config.json", folder / "config.json")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-0000{TEXT_SHARDS}.safetensors" for i in range(1, TEXT_SHARDS + 1)], shards


def write_transformer(folder: Path, guidance_embeds: bool = True) -> None:
    """diffusers' FluxTransformer2DModel with seeded weights, in bf16 (as the Hub's), three shards plus the index;
    without the guidance embedder (guidance_embeds false), seeded differently."""
    diffusers = tools.quiet_diffusers()
    config = {**HUB_TRANSFORMER, **TINY, "guidance_embeds": guidance_embeds}
    torch.manual_seed(SEED if guidance_embeds else SEED + 2)  # SEED + 1 is the VAE's
    model = diffusers.FluxTransformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:  # RMSNorm scales away from 1, so a misplaced one shows
                p.add_(0.2 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{size * 4 // 10 // 1000}KB", safe_serialization=True)
    tools.write_sorted_json(folder / "config.json", config)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == [f"diffusion_pytorch_model-0000{i}-of-0000{TRANSFORMER_SHARDS}.safetensors"
                      for i in range(1, TRANSFORMER_SHARDS + 1)], shards


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
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt"})


def write_pipeline_folder(folder: Path, guidance_embeds: bool = True) -> None:
    tools.write_sorted_json(folder / "model_index.json", MODEL_INDEX)
    assert (folder / "model_index.json").stat().st_size == MODEL_INDEX_SIZE
    (folder / "scheduler").mkdir()
    shutil.copy(SCHEDULERS / "FLUX.1-dev" / "scheduler" / "scheduler_config.json", folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer")
    shutil.copytree(CLIP_TEXT_ENCODER, folder / "text_encoder")
    write_t5_tokenizer(folder / "tokenizer_2")
    write_text_encoder_2(folder / "text_encoder_2")
    write_transformer(folder / "transformer", guidance_embeds)
    write_vae(folder / "vae")


def sd3_scheduler():
    folder = SCHEDULERS / "stable-diffusion-3-medium-diffusers" / "scheduler"
    return tools.quiet_diffusers().FlowMatchEulerDiscreteScheduler.from_pretrained(folder)


def sd3_base_sigmas(steps: int) -> np.ndarray:
    """The unshifted grid SD3's set_timesteps(N) starts from (float64): N points from sigma_max to sigma_min."""
    scheduler = sd3_scheduler()
    n = scheduler.config.num_train_timesteps
    return np.linspace(scheduler.sigma_max * n, scheduler.sigma_min * n, steps) / n


@torch.no_grad()
def reference_pipeline(folder: Path, height: int | None, width: int | None, schedule: str = "flux",
                       true_cfg_scale: float | None = None) -> torch.Tensor:
    """FluxPipeline's final latents, unpacked to (1, 16, H / 8, W / 8), in fp32 on the CPU.

    true_cfg_scale: FluxPipeline's true classifier-free guidance with the negative prompt "" (for a transformer
    without a guidance embedder; the pipeline then runs it twice per step, the prompt first), T5 length
    TRUE_CFG_T5_LENGTH.

    schedule "sd3": FluxPipeline with SD3-medium's scheduler and, as `sigmas`, the unshifted grid SD3's
    set_timesteps(N) starts from; the scheduler then applies its fixed shift 3.0 (mu is ignored without dynamic
    shifting). NOTE: set_timesteps casts passed sigmas to float32 *before* shifting, while set_timesteps(N) shifts
    the float64 grid, so these sigmas may differ from SD3's by an ulp (see the tests' tolerance).
    """
    diffusers = tools.quiet_diffusers()
    pipe = diffusers.FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if schedule == "sd3":
        pipe.scheduler = sd3_scheduler()
        extra["sigmas"] = sd3_base_sigmas(PIPELINE_STEPS)
    if true_cfg_scale is not None:
        extra |= {"true_cfg_scale": true_cfg_scale, "negative_prompt": "", "max_sequence_length": TRUE_CFG_T5_LENGTH}
    generator = torch.Generator("cpu").manual_seed(PIPELINE_SEED)
    packed = pipe(PIPELINE_PROMPT, num_inference_steps=PIPELINE_STEPS, guidance_scale=PIPELINE_GUIDANCE,
                  height=height, width=width, generator=generator, output_type="latent", **extra).images
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)


def reference_sd3_sigmas(steps: int) -> torch.Tensor:
    """SD3's scheduler as StableDiffusion3Pipeline drives it: set_timesteps(N), sigmas without the final 0."""
    scheduler = sd3_scheduler()
    scheduler.set_timesteps(steps)
    return scheduler.sigmas[:-1].clone()


def main() -> None:
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FOLDER.mkdir(parents=True)
    write_pipeline_folder(FOLDER)
    UNDISTILLED.mkdir()
    write_pipeline_folder(UNDISTILLED, guidance_embeds=False)
    tensors = {}
    for case, (height, width, schedule) in PIPELINE_CASES.items():
        tensors[f"pipeline/{case}/latents"] = reference_pipeline(FOLDER, height, width, schedule).contiguous()
    for case, (height, width, schedule) in TRUE_CFG_CASES.items():
        tensors[f"pipeline/{case}/latents"] = reference_pipeline(UNDISTILLED, height, width, schedule,
                                                                 TRUE_CFG_SCALE).contiguous()
    for steps in SD3_STEPS:
        tensors[f"sd3/{steps}/sigmas"] = reference_sd3_sigmas(steps)
    save_file(tensors, REFERENCE)
    versions = tools.versions("diffusers", "transformers", "torch", "numpy", "safetensors")
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", versions)
    print(f"wrote {FIXTURES}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))


if __name__ == "__main__":
    main()
