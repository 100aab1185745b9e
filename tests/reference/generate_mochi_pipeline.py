"""Reference fixtures for the Mochi pipeline tests, computed with diffusers' FlowMatchEulerDiscreteScheduler (set up
as MochiPipeline sets it up), its single-file converter for genmo's layout, and MochiPipeline as the oracles.

Run by hand when the reference changes (needs the reference extra; after generate_mochi.py, whose tiny transformer
it reuses, and generate_t5.py / generate_pixart.py, whose tiny T5 and tokenizer it reuses):

    python tests/reference/generate_mochi_pipeline.py [--genmo-src DIR]

It writes, under tests/fixtures/mochi_pipeline/ (the run is deterministic):

    mochi-1-preview/       a whole pipeline folder in the Hub layout of checkpoints.md §8.1, tiny, as `--model mochi`
                           downloads it: model_index.json (the real content, 408 bytes), scheduler/scheduler_config.json
                           (§8.3, 299 bytes), tokenizer/ (the T5 fixture's sentencepiece model), text_encoder/ (the
                           tiny T5 in two shards plus the index), transformer/ (config.json and the bf16 variant of
                           generate_mochi's 48-block transformer: three shards plus
                           diffusion_pytorch_model.safetensors.index.bf16.json), vae/config.json (§8.4, 1,234 bytes;
                           minidit reads no VAE yet). `assemble` adds, at test time, the Hub's other transformer files
                           (generate_mochi's five fp32 shards plus the index) or genmo's root `dit.safetensors`
                           written from them (`hub_to_genmo`), so the committed folder holds each weight once.
    reference.safetensors  scheduler cases: MochiPipeline's sigmas and timesteps at several step counts, and every
                           step() on its own random sample and model output, in float32 and through bf16 latents;
                           MochiPipeline's final latents (output_type="latent") for PIPELINE_CASES in fp32, and
                           for BF16_CASE in bf16 too
    genmo_fullsize.json    genmo's AsymmDiTJoint built on the meta device with the official arguments (its
                           pipelines.py): key names and shapes (879) and the parameter count. Written only with
                           --genmo-src DIR (a checkout of github.com/genmoai/mochi, whose code is on no package index;
                           imported with its GPU-only attention imports stubbed); otherwise the stored file is kept
    VERSIONS.json          the library versions that produced the expected outputs

Functions here are also used by the tests' "live" cases; diffusers is imported inside functions.
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import generator_tools as tools
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "mochi_pipeline"
REFERENCE = FIXTURES / "reference.safetensors"
FOLDER = FIXTURES / "mochi-1-preview"
GENMO_FULLSIZE = FIXTURES / "genmo_fullsize.json"
_MOCHI = tools.generator("generate_mochi")  # its tiny transformer (48 blocks, fp32 in five shards) and config
_PIXART = tools.generator("generate_pixart")  # its tiny T5 writer (two shards plus the index) and T5_TINY

SEED = 20241105
DIFFUSERS_VERSION = "0.32.0.dev0"  # what the Mochi repository's JSON files were written with

# checkpoints.md §8.3: scheduler/scheduler_config.json of genmo/mochi-1-preview (12 lines, 299 bytes)
HUB_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": True, "max_image_seq_len": 4096,
    "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
MODEL_INDEX = {
    "_class_name": "MochiPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "MochiTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLMochi"]}
# checkpoints.md §8.4: every argument of AutoencoderKLMochi, the official values (= diffusers' defaults)
HUB_VAE = {
    "_class_name": "AutoencoderKLMochi", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
    "add_attention_block": [False, True, True, True, True], "decoder_block_out_channels": [128, 256, 512, 768],
    "encoder_block_out_channels": [64, 128, 256, 384], "in_channels": 15, "latent_channels": 12,
    "latents_mean": [-0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
                     0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
                     -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285],
    "latents_std": [0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
                    0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
                    0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041],
    "layers_per_block": [3, 3, 4, 6, 3], "out_channels": 3, "scaling_factor": 1.0, "spatial_expansions": [2, 2, 2],
    "temporal_expansions": [1, 2, 3]}
HUB_SIZES = {"scheduler": 299, "model_index": 408, "vae": 1234}
VARIANT_SHARDS = 3  # the bf16 variant of transformer/ has three shards
GENMO_FILE = "dit.safetensors"
# genmo's pipelines.py (DitModelFactory.get_model): the arguments of the released model
GENMO_ARGS = dict(depth=48, patch_size=2, num_heads=24, hidden_size_x=3072, hidden_size_y=1536, mlp_ratio_x=4.0,
                  mlp_ratio_y=4.0, in_channels=12, qk_norm=True, qkv_bias=False, out_bias=True, patch_embed_bias=True,
                  timestep_mlp_bias=True, timestep_scale=1000.0, t5_feat_dim=4096, t5_token_length=256,
                  rope_theta=10000.0, attention_mode="sdpa")

# end-to-end cases: (layout, height, width, frames, guidance); layout "variant" is the committed folder (bf16
# variant only), "hub" the same with the fp32 files too (which minidit and diffusers then read)
PIPELINE_PROMPT = "A hummingbird hovering at a red flower, close-up"
PIPELINE_CASES = {
    "variant/small": ("variant", 32, 48, 7, 4.5),  # 2 latent frames of 4 x 6
    "variant/tall-13-frames": ("variant", 48, 32, 13, 4.5),  # 3 latent frames of 6 x 4
    "variant/no-guidance": ("variant", 32, 48, 7, 1.0),  # guidance <= 1: one branch, no negative prompt
    "hub/small": ("hub", 32, 48, 7, 4.5),
}
PIPELINE_STEPS = 3
PIPELINE_SEED = 0
BF16_CASE = "variant/small"  # also run in bf16, the dtype of a GPU run (minidit's default there)

# scheduler cases: step counts (64 is MochiPipeline's default; 1 fails in the pipeline itself: N // 2 = 0)
SCHEDULER_STEPS = (2, 3, 4, 28, 64)
STEP_SHAPE = (1, 3, 2, 2, 3)  # (B, C, T, H, W)


def hub_scheduler_config() -> dict:
    return dict(HUB_SCHEDULER)


# ---- genmo's layout: the inverse of diffusers' converter, written independently of minidit's table ----------------

# module renames, Hub -> genmo, outside the blocks and inside one
GENMO_MODULES = {
    "patch_embed.proj": "x_embedder.proj", "time_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "time_embed.pooler.to_kv": "t5_y_embedder.to_kv",
    "time_embed.pooler.to_q": "t5_y_embedder.to_q", "time_embed.pooler.to_out": "t5_y_embedder.to_out",
    "time_embed.caption_proj": "t5_yproj", "proj_out": "final_layer.linear"}
GENMO_BLOCK_MODULES = {
    "norm1.linear": "mod_x", "norm1_context.linear": "mod_y", "norm1_context.linear_1": "mod_y",
    "attn1.norm_q": "attn.q_norm_x", "attn1.norm_k": "attn.k_norm_x", "attn1.norm_added_q": "attn.q_norm_y",
    "attn1.norm_added_k": "attn.k_norm_y", "attn1.to_out.0": "attn.proj_x", "attn1.to_add_out": "attn.proj_y",
    "ff.net.2": "mlp_x.w2", "ff_context.net.2": "mlp_y.w2"}
GENMO_GATED = {"ff.net.0.proj.weight": "mlp_x.w1.weight", "ff_context.net.0.proj.weight": "mlp_y.w1.weight"}
QKV = re.compile(r"attn1\.(to_|add_)([qkv])(_proj)?\.weight")  # to_q (visual), add_q_proj (text), ...


def halves_swapped(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def hub_to_genmo(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hub-layout state dict in genmo's layout: q, k, v fused per stream, the SwiGLU input projections' halves
    and norm_out's (scale, shift) swapped back, genmo's names. The generator checks that diffusers' converter
    (convert_mochi_transformer_checkpoint_to_diffusers) turns the result back into `sd` exactly."""
    out, qkv = {}, {}
    for key, t in sd.items():
        block = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
        if key == "pos_frequencies":
            out[key] = t
        elif key.startswith("norm_out.linear."):
            out[key.replace("norm_out.linear", "final_layer.mod")] = halves_swapped(t)
        elif block is None:
            module, param = key.rsplit(".", 1)
            out[f"{GENMO_MODULES[module]}.{param}"] = t
        elif fused := QKV.fullmatch(block[2]):
            stream = "x" if fused[1] == "to_" else "y"
            qkv.setdefault(f"blocks.{block[1]}.attn.qkv_{stream}.weight", {})[fused[2]] = t
        elif block[2] in GENMO_GATED:
            out[f"blocks.{block[1]}.{GENMO_GATED[block[2]]}"] = halves_swapped(t)
        else:
            module, param = block[2].rsplit(".", 1)
            out[f"blocks.{block[1]}.{GENMO_BLOCK_MODULES[module]}.{param}"] = t
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def reference_from_genmo(genmo: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own single-file converter (the one from_single_file runs on dit.safetensors) applied to a genmo
    state dict."""
    tools.quiet_diffusers()
    from diffusers.loaders.single_file_utils import convert_mochi_transformer_checkpoint_to_diffusers

    return convert_mochi_transformer_checkpoint_to_diffusers(dict(genmo))


def genmo_fullsize_table(genmo_src: Path) -> dict:
    """genmo's AsymmDiTJoint with the released arguments, on the meta device: key names, shapes, parameter count."""
    import contextlib
    import types

    stub = types.ModuleType("genmo.lib.attn_imports")  # the real one queries a CUDA device at import
    stub.flash_varlen_attn, stub.sage_attn, stub.sdpa_attn_ctx = None, None, contextlib.nullcontext
    sys.modules["genmo.lib.attn_imports"] = stub
    sys.path.insert(0, str(genmo_src / "src"))
    from genmo.mochi_preview.dit.joint_model.asymm_models_joint import AsymmDiTJoint

    with torch.device("meta"):
        model = AsymmDiTJoint(**GENMO_ARGS)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "keys": {k: list(v.shape) for k, v in model.state_dict().items()}}


# ---- the pipeline folder ------------------------------------------------------------------------------------------

def write_transformer_variant(folder: Path) -> None:
    """generate_mochi's transformer re-saved as the Hub's bf16 variant: three shards plus the variant index."""
    model = _MOCHI.load_transformer().to(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True, variant="bf16",
                          max_shard_size=size * 11 // 10 // VARIANT_SHARDS)
    shutil.copy(_MOCHI.TRANSFORMER / "config.json", folder / "config.json")
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == [f"diffusion_pytorch_model.bf16-0000{i}-of-0000{VARIANT_SHARDS}.safetensors"
                     for i in range(1, VARIANT_SHARDS + 1)], files
    assert (folder / "diffusion_pytorch_model.safetensors.index.bf16.json").is_file()


def write_pipeline_folder() -> None:
    tools.write_sorted_json(FOLDER / "model_index.json", MODEL_INDEX)
    tools.write_sorted_json(FOLDER / "scheduler" / "scheduler_config.json", HUB_SCHEDULER)
    shutil.copytree(_PIXART.T5_TINY / "tokenizer", FOLDER / "tokenizer")
    _PIXART.write_text_encoder(FOLDER / "text_encoder")
    write_transformer_variant(FOLDER / "transformer")
    tools.write_sorted_json(FOLDER / "vae" / "config.json", HUB_VAE)


def assemble(layout: str, dest: Path) -> Path:
    """The committed folder as another download would have it, at `dest`: "variant" as committed (the bf16 variant
    only); "hub" with the fp32 transformer files too (the Hub repository's transformer/ folder); "genmo" with genmo's
    `dit.safetensors` at the root, written from the fp32 weights, and transformer/config.json only."""
    from safetensors.torch import save_file

    shutil.copytree(FOLDER, dest)
    if layout == "hub":
        for f in _MOCHI.TRANSFORMER.iterdir():
            if f.name != "config.json":
                shutil.copy(f, dest / "transformer" / f.name)
    elif layout == "genmo":
        for f in (dest / "transformer").glob("diffusion_pytorch_model*"):
            f.unlink()
        sd = {k: v.contiguous() for k, v in hub_to_genmo(fp32_weights()).items()}
        save_file(sd, dest / GENMO_FILE)
    else:
        assert layout == "variant", layout
    return dest


def fp32_weights() -> dict[str, torch.Tensor]:
    """generate_mochi's transformer as stored: its five fp32 shards."""
    from safetensors.torch import load_file

    index = json.loads((_MOCHI.TRANSFORMER / "diffusion_pytorch_model.safetensors.index.json").read_text())
    return {k: v for shard in sorted(set(index["weight_map"].values()))
            for k, v in load_file(_MOCHI.TRANSFORMER / shard).items()}


# ---- scheduler ----------------------------------------------------------------------------------------------

def make_scheduler(steps: int):
    """diffusers' scheduler from the Hub config, given MochiPipeline's sigmas as the pipeline gives them (its own
    linear_quadratic_schedule and retrieve_timesteps)."""
    diffusers = tools.quiet_diffusers()
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule, retrieve_timesteps

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in HUB_SCHEDULER.items() if not k.startswith("_")})
    sigmas = np.array(linear_quadratic_schedule(steps, 0.025))
    retrieve_timesteps(scheduler, steps, "cpu", None, sigmas)
    scheduler.set_begin_index(0)
    return scheduler


def step_inputs(steps: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + steps)
    return {"sample": torch.randn(steps, *STEP_SHAPE, generator=generator),
            "model_output": torch.randn(steps, *STEP_SHAPE, generator=generator)}


def reference_scheduler(steps: int) -> dict[str, torch.Tensor]:
    """sigmas (N + 1: the inverted grid, ending in 1), timesteps, and step() at every timestep on its own random
    sample and model output (float32), and once more as MochiPipeline steps bf16 latents: the sample upcast to
    float32 for the step, the result cast back to bf16."""
    scheduler = make_scheduler(steps)
    inputs = step_inputs(steps)
    out = {"sigmas": scheduler.sigmas.clone(), "timesteps": scheduler.timesteps.clone()}
    prev, prev_bf16 = [], []
    for i, t in enumerate(scheduler.timesteps):
        prev.append(scheduler.step(inputs["model_output"][i], t, inputs["sample"][i], return_dict=False)[0])
    scheduler = make_scheduler(steps)
    for i, t in enumerate(scheduler.timesteps):
        latents = inputs["sample"][i].bfloat16()
        x = scheduler.step(inputs["model_output"][i], t, latents.to(torch.float32), return_dict=False)[0]
        prev_bf16.append(x.to(latents.dtype))
    return out | {"prev": torch.stack(prev), "prev_bf16": torch.stack(prev_bf16)}


# ---- the pipeline -------------------------------------------------------------------------------------------------

def reference_pipeline(case: str, folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MochiPipeline's final latents (output_type="latent"), on the CPU in `dtype` (every component, as
    from_pretrained(torch_dtype=...) runs it), from `folder` assembled for the case's layout; the bf16 variant read
    as diffusers reads it (variant="bf16"). No VAE: the latents are returned before it."""
    layout, height, width, frames, guidance = PIPELINE_CASES[case]
    diffusers = tools.quiet_diffusers()
    transformer = diffusers.MochiTransformer3DModel.from_pretrained(
        folder / "transformer", dtype=dtype, variant="bf16" if layout == "variant" else None)
    pipe = diffusers.MochiPipeline.from_pretrained(folder, transformer=transformer.eval(), vae=None, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(PIPELINE_SEED)
    import warnings

    with warnings.catch_warnings():  # MochiRoPE's float32 autocast region warns on the CPU
        warnings.simplefilter("ignore", UserWarning)
        with torch.no_grad():
            return pipe(PIPELINE_PROMPT, height=height, width=width, num_frames=frames,
                        num_inference_steps=PIPELINE_STEPS, guidance_scale=guidance, generator=generator,
                        output_type="latent").frames


def main() -> None:
    import tempfile

    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genmo-src", type=Path, help="a checkout of github.com/genmoai/mochi: (re)write "
                                                       "genmo_fullsize.json from its AsymmDiTJoint")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    sizes = {"scheduler": HUB_SCHEDULER, "model_index": MODEL_INDEX, "vae": HUB_VAE}
    for name, content in sizes.items():  # the Hub files' byte sizes (checkpoints.md §8)
        assert len(json.dumps(content, indent=2, sort_keys=True)) + 1 == HUB_SIZES[name], name
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for stale in (FOLDER, REFERENCE):  # genmo_fullsize.json stays unless --genmo-src rewrites it
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()

    write_pipeline_folder()
    tensors = {}
    for steps in SCHEDULER_STEPS:
        tensors |= {f"scheduler/{steps}/{k}": v for k, v in reference_scheduler(steps).items()}
    sd = fp32_weights()
    back = reference_from_genmo(hub_to_genmo(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd), "hub_to_genmo is no inverse"
    with tempfile.TemporaryDirectory() as tmp:
        folders = {layout: assemble(layout, Path(tmp) / layout) for layout in ("variant", "hub")}
        for case, (layout, *_) in PIPELINE_CASES.items():
            tensors[f"pipeline/{case}/latents"] = reference_pipeline(case, folders[layout]).contiguous()
        bf16 = reference_pipeline(BF16_CASE, folders["variant"], torch.bfloat16)
        tensors[f"pipeline/{BF16_CASE}/latents_bf16"] = bf16.contiguous()

    if args.genmo_src is not None:
        tools.write_json(GENMO_FULLSIZE, genmo_fullsize_table(args.genmo_src))
    if not GENMO_FULLSIZE.is_file():
        raise SystemExit(f"{GENMO_FULLSIZE} is missing: run with --genmo-src DIR (a genmoai/mochi checkout)")
    genmo = json.loads(GENMO_FULLSIZE.read_text())
    with torch.device("meta"):  # hub_to_genmo at full size gives exactly genmo's own key names and shapes
        hub = tools.quiet_diffusers().MochiTransformer3DModel.from_config(
            {k: v for k, v in _MOCHI.hub_transformer_config(tiny=False).items() if not k.startswith("_")})
    assert {k: list(v.shape) for k, v in hub_to_genmo(hub.state_dict()).items()} == genmo["keys"]

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, REFERENCE)
    tools.write_sorted_json(FIXTURES / "VERSIONS.json",
                            tools.versions("diffusers", "transformers", "torch", "numpy", "safetensors"))
    print(f"wrote {FIXTURES} ({REFERENCE.stat().st_size / 1e3:.0f} kB reference; genmo: {len(genmo['keys'])} keys, "
          f"{genmo['parameters']:,} parameters): " + ", ".join(
              f"{k} {tuple(v.shape)}" for k, v in tensors.items() if k.endswith("/latents")))


if __name__ == "__main__":
    main()
