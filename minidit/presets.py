"""Named sets of analyze.py arguments. `--preset paper`: per model, the settings of the study minidit reproduces
(Sun et al., "Unveiling Redundancy in Diffusion Transformers (DiTs): A Systematic Study", arXiv 2411.13588).

The numbers are read from the study's code, xdit-project/DiTCacheAnalysis at 457c316 (paths below are its): one
script per diffusers model (`*_example.py`; what a script does not pass is the pipeline's default, read from
diffusers' pipelines and the Hub repository's scheduler config), `run_experiments.sh`, and patches of Open-Sora
(hpcaitech/Open-Sora at 476b6dc) and of genmo's Mochi (xdit-project/mochi-xDiT at d15495d).
Prompts: every model ran the repository's `caption1000.txt` (1000 MS-COCO captions), Mochi its first 100; pass that
file with --prompts (`coco:FILE` orders captions by image id, which gives other captions).
Each entry says where its numbers come from (`source`) and where it deliberately differs from what the study ran
(`deviations`). Models the study did not run (DiT-XL/2, PixArt-α 512, FLUX.1 schnell, CogVideoX-2b) and the embedded
tiny models have no entry.
"""

from dataclasses import dataclass, fields

from minidit.errors import MiniditError
from minidit.pipelines import model_spec

SEED = 42  # every diffusers script: torch.Generator(device="cuda").manual_seed(42), the same for every prompt
COCO_PROMPTS = 1000  # the lines of caption1000.txt
MOCHI_PROMPTS = 100  # MochiCacheAnalysis.patch: `for i in range(0, 100)`

CUDA_NOISE = ("The study drew the initial noise with torch.Generator('cuda').manual_seed(42); minidit draws it from "
              "a CPU generator seeded 42: the seed is the study's, the noise is not.")
T5_IN_FP16 = ("In an fp16 run minidit's T5 runs in bf16 (T5 v1.1 overflows in fp16); the study's fp16 pipeline ran "
              "T5 in fp16 with its feed-forward output projections (wo) kept in fp32, as transformers loads it.")


@dataclass(frozen=True)
class Settings:
    """One model's run as analyze.py arguments (frames None: an image model, which takes no --frames)."""

    steps: int
    scheduler: str
    guidance: float
    dtype: str
    height: int
    width: int
    max_sequence_length: int
    source: str
    deviations: tuple[str, ...]
    frames: int | None = None
    num_prompts: int = COCO_PROMPTS
    seed: int = SEED

    def args(self) -> dict[str, object]:
        """{analyze.py argument name: value}: every field but the notes, and frames only for a video model."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("source", "deviations") and getattr(self, f.name) is not None}


PAPER = {
    "pixart-1024": Settings(
        steps=20, scheduler="dpm-solver++", guidance=4.5, dtype="fp16", height=1024, width=1024,
        max_sequence_length=120,
        source="pixartalpha_example.py:11-24 (PixArt-alpha/PixArt-XL-2-1024-MS, float16, seed 42); PixArtAlphaPipeline "
               "defaults: 20 steps, guidance 4.5, 1024x1024 with resolution binning, 120 T5 tokens; the "
               "repository's DPMSolverMultistepScheduler (dpmsolver++, order 2)",
        deviations=(CUDA_NOISE, T5_IN_FP16)),
    "sd3": Settings(
        steps=28, scheduler="sd3", guidance=7.0, dtype="fp16", height=1024, width=1024, max_sequence_length=256,
        source="sd3_example.py:11-24 (stabilityai/stable-diffusion-3-medium-diffusers, float16, seed 42); "
               "StableDiffusion3Pipeline defaults: 28 steps, guidance 7.0, 1024x1024, 256 T5 tokens; the "
               "repository's FlowMatchEulerDiscreteScheduler (shift 3.0)",
        deviations=(CUDA_NOISE, T5_IN_FP16)),
    "flux-dev": Settings(
        steps=28, scheduler="flux", guidance=3.5, dtype="fp16", height=1024, width=1024, max_sequence_length=512,
        source="flux_example.py:11-24 (black-forest-labs/FLUX.1-dev, float16, seed 42); FluxPipeline defaults: 28 "
               "steps, distilled guidance 3.5, 1024x1024, 512 T5 tokens; the repository's "
               "FlowMatchEulerDiscreteScheduler (shift from the image size)",
        deviations=(CUDA_NOISE, T5_IN_FP16)),
    "latte": Settings(
        steps=50, scheduler="ddim", guidance=7.5, dtype="fp16", height=512, width=512, frames=16,
        max_sequence_length=120,
        source="latte_example.py:12-28 (maxin-cn/Latte-1, float16, seed 42, 1000 prompts); LattePipeline defaults: "
               "50 steps, guidance 7.5, 512x512, video_length 16, 120 T5 tokens; the repository's DDIMScheduler",
        deviations=(CUDA_NOISE, T5_IN_FP16)),
    "cogvideox-5b": Settings(
        steps=50, scheduler="ddim", guidance=6.0, dtype="bf16", height=480, width=720, frames=9,
        max_sequence_length=226,
        source="cogvideo_example.py:12-26 (THUDM/CogVideoX-5b, float16, seed 42, num_frames=9); CogVideoXPipeline "
               "defaults: 50 steps, guidance 6, 480x720, 226 T5 tokens, no dynamic CFG; the repository's "
               "CogVideoXDDIMScheduler",
        deviations=("bf16, not the study's fp16: CogVideoX-5b's model card recommends BF16 for the 5b (its first "
                    "revisions: 'does not support FP16'), FP16 for the 2b.", CUDA_NOISE)),
    "opensora": Settings(
        steps=30, scheduler="rflow", guidance=7.0, dtype="bf16", height=240, width=426, frames=51,
        max_sequence_length=300,
        source="run_experiments.sh:17 with Open-Sora 476b6dc configs/opensora-v1-2/inference/sample.py:1-41 "
               "(240p at 9:16 = 240x426, 51 frames, seed 42, bf16, RFlow 30 steps, cfg 7.0, aes 6.5, T5 300 tokens) "
               "and OpenSoraCacheAnalysis.patch (the prompts of caption1000.txt)",
        deviations=("Open-Sora's scripts/inference.py (476b6dc, line 263) reseeds with torch.manual_seed(1024) "
                    "before each prompt's noise, drawn on the GPU: the config's seed 42 did not set the study's "
                    "noise; minidit draws it from a CPU generator seeded 42.",)),
    "mochi": Settings(
        steps=64, scheduler="mochi", guidance=4.5, dtype="bf16", height=480, width=848, frames=49,
        max_sequence_length=256, num_prompts=MOCHI_PROMPTS,
        source="run_experiments.sh:20 with mochi-xDiT d15495d demos/cli.py:140-164 defaults (848x480, 49 frames, "
               "cfg 4.5, 64 steps, 256 T5 tokens, seed 1710977262, bf16) and MochiCacheAnalysis.patch (the first "
               "100 captions); genmo's linear-quadratic sigmas (threshold 0.025)",
        deviations=("Seed 42 like every other model, not the study's 1710977262 (cli.py's default; the study passed "
                    "no --seed); genmo draws the noise from the global CUDA generator, which minidit's CPU draw "
                    "does not reproduce either way.",
                    "genmo's pipeline zeroes an empty negative prompt (all tokens padding, no text in the "
                    "unconditional pass); minidit follows diffusers' MochiPipeline, which encodes \"\" with its mask "
                    "(one </s> token).")),
}
PRESETS = {"paper": PAPER}


def preset(name: str, model: str) -> dict[str, object]:
    """The analyze.py arguments of preset `name` for `model` (a name or an alias), as {argument name: value}."""
    table = PRESETS.get(name)
    if table is None:
        raise MiniditError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    spec = model_spec(model)  # an unknown model name is its own error, listing the models
    if spec.name not in table:
        raise MiniditError(f"--preset {name} has no settings for {spec.name}: the study did not run it; it has "
                           f"{', '.join(table)}")
    return table[spec.name].args()
