"""Measure how much attention K, V and A change between consecutive diffusion steps, per layer, over prompts.

    python analyze.py                                   # the embedded flux-tiny on the CPU, under a minute
    python analyze.py --steps 14 --scheduler sd3        # the study's scheduler ablation, in miniature
    python analyze.py --model flux-dev --device cuda    # FLUX.1 [dev] itself (a Hub download)
    python analyze.py --model latte --device cuda --save-images   # Latte-1: 16 frames, GIFs and frame strips
    python analyze.py --model cogvideox --device cuda --prev-on-host --save-latents   # CogVideoX-5b, 49 frames
    python analyze.py --model mochi --device cuda --prev-on-host --save-latents   # Mochi 1 preview, 19 frames
    python analyze.py --model opensora --device cuda --save-latents   # Open-Sora 1.2: 51 frames at 240x426
    python analyze.py --model dit-tiny --steps 20 --out runs/tiny-20
    python analyze.py --compare runs/flux-tiny-flux-28steps runs/flux-tiny-sd3-14steps --out runs/ablation
    python analyze.py --aggregate runs/flux-tiny-flux-28steps   # rebuild tables and figures from the records

A run directory holds manifest.json, one record per prompt, summary.csv, cv.csv and figures/ (see README).
"""

import argparse
import sys
from pathlib import Path

from minidit.errors import MiniditError, error_line
from minidit.pipelines.recipe import OPTIONS, Recipe


def parse_args(argv: list[str]) -> argparse.Namespace:
    from minidit.pipelines import ALIASES, MODELS

    names = ", ".join(sorted(MODELS) + sorted(ALIASES))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-tiny", help=f"one of: {names} (default: flux-tiny)")
    p.add_argument("--weights", metavar="DIR", help="a local folder in the model's Hub layout instead of a download")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) to download")
    p.add_argument("--download-dir", metavar="DIR", help="download into DIR/<repo name> (e.g. weights/) instead of "
                                                         "the Hugging Face cache")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's pipeline default)")
    p.add_argument("--scheduler", help="sampler name (default: the model's own)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; for FLUX.1-dev the distilled "
                                                  "guidance value fed to the model, for a FLUX without it (flux-tiny) "
                                                  "the true-CFG scale (default: the pipeline's)")
    p.add_argument("--prompts", metavar="FILE", help="UTF-8 text, one prompt per line (class ids or names for "
                                                     "class-conditional models), or coco:FILE, the first caption of "
                                                     "each image of a COCO captions file (captions_val2014.json, "
                                                     "Karpathy's dataset_coco.json)")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--seed", type=int, default=0, help="initial noise seed, the same for every prompt (default 0)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on the CPU, bf16 on a GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    # the recipe options (minidit/pipelines/recipe.py: OPTIONS): each model takes some; not given = the model's own
    p.add_argument("--convention", choices=["diffusers", "original"],
                   help="DiT only: diffusers' DiTPipeline numerics (default) or the original repository's")
    p.add_argument("--height", type=int, help="text-to-image and video models: height in pixels (default: the "
                                              "model's)")
    p.add_argument("--width", type=int, help="text-to-image and video models: width in pixels (default: the model's)")
    p.add_argument("--frames", type=int, help="video models: frames to generate (default: the model's: Latte 16, "
                                              "CogVideoX 49, which must be 4k+1, Mochi 19, which must be 6k+1, "
                                              "Open-Sora 51, 1 or at least 17)")
    p.add_argument("--max-sequence-length", type=int, metavar="N",
                   help="text-conditioned models: T5 tokens per prompt (default: the pipeline's: PixArt and "
                        "Latte 120, CogVideoX 226, SD3 and Mochi 256, Open-Sora 300, FLUX.1-dev 512, "
                        "schnell 256)")
    p.add_argument("--cross-attention", action="store_true", default=None,
                   help="PixArt, Latte, Open-Sora: also record the cross-attention layers (as extra layers "
                        "of kind 'cross')")
    p.add_argument("--dynamic-cfg", action="store_true", default=None,
                   help="CogVideoX: the pipeline's use_dynamic_cfg, a guidance scale that rises over the steps")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/MODEL-SCHEDULER-Nsteps)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished prompts")
    p.add_argument("--save-images", action="store_true", help="write each prompt's image and a sample grid")
    p.add_argument("--save-latents", action="store_true", help="write each prompt's final latents (safetensors)")
    p.add_argument("--prev-on-host", action="store_true",
                   help="keep the previous step's K/V/A in host memory instead of on the accelerator")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="compare finished runs (needs --out)")
    p.add_argument("--labels", nargs="+", help="with --compare: one label per run (default: folder names)")
    p.add_argument("--aggregate", metavar="RUN", help="rebuild summary.csv, cv.csv and figures of a run")
    return p.parse_args(argv)


def read_prompts(path: str | None, num: int | None, default: list[str]) -> tuple[list[str], str]:
    if num is not None and num < 1:
        raise MiniditError(f"--num-prompts must be at least 1, got {num}")
    if path is None:
        prompts, source = default, "default"
    elif path.startswith("coco:"):  # MS-COCO captions, the study's prompts (minidit/coco.py)
        from minidit.coco import coco_captions

        prompts, source = coco_captions(Path(path[len("coco:"):])), path
    else:
        prompts, source = read_prompt_file(Path(path)), str(Path(path))
    if num is not None:
        if num > len(prompts):
            raise MiniditError(f"--num-prompts {num} asks for more prompts than the {len(prompts)} available")
        prompts = prompts[:num]
    return prompts, source


def read_prompt_file(file: Path) -> list[str]:
    if file.is_dir():
        raise MiniditError(f"prompt file {file} is a folder: pass a UTF-8 text file, one prompt per line")
    if not file.is_file():
        raise MiniditError(f"prompt file {file} does not exist: pass a UTF-8 text file, one prompt per line")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MiniditError(f"prompt file {file} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise MiniditError(f"cannot read prompt file {file}: {e.strerror}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MiniditError(f"prompt file {file} has no prompts: write one prompt per line")
    return prompts


def check_paths(args: argparse.Namespace) -> None:
    """Fail on an unusable --prompts, --weights or --out before any weights are loaded."""
    from minidit.analysis.rundir import check_creatable

    if args.prompts is not None:
        read_prompts(args.prompts, args.num_prompts, [])
    if args.weights is not None and Path(args.weights).exists() and not Path(args.weights).is_dir():
        raise MiniditError(f"--weights {args.weights} is a file, not a folder: pass the folder that holds the model "
                           f"in its Hub layout (model_index.json and one folder per component)")
    if args.out is not None:
        check_creatable(Path(args.out))


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def analyze(args: argparse.Namespace) -> Path:
    from minidit.analysis import RunDir
    from minidit.analysis.engine import build_manifest, run_prompts
    from minidit.api import load_backbone, resolve_weights
    from minidit.pipelines import model_spec, recipe_class

    spec = model_spec(args.model)
    recipe_type = recipe_class(spec.family)  # what it takes, read before its weights are loaded
    if args.steps is not None and args.steps < 2:
        raise MiniditError(f"--steps must be at least 2 (the analysis compares consecutive steps), got {args.steps}")
    scheduler_name = args.scheduler or recipe_type.default_scheduler
    if scheduler_name not in recipe_type.schedulers:
        raise MiniditError(f"{spec.name} has no scheduler {scheduler_name!r}; choose one of "
                           f"{', '.join(recipe_type.schedulers)}")
    options = recipe_options(recipe_type, args)
    if args.save_images and not recipe_type.decodes:
        raise MiniditError(f"--save-images: minidit has no decoder for {spec.name} yet (its 3D VAE is a later "
                           f"piece of work); run without it, or keep the final latents with --save-latents")
    check_paths(args)
    device = args.device or default_device()
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    folder = resolve_weights(spec, args.weights, args.revision, args.download_dir)
    recipe = load_backbone(spec.name, weights_dir=folder, dtype=dtype, device=device, **options)
    prompts, source = read_prompts(args.prompts, args.num_prompts, list(spec.prompts) or recipe.default_prompts())
    for prompt in prompts:
        recipe.parse_prompt(prompt)
    steps = args.steps or recipe.default_steps
    guidance = recipe.default_guidance if args.guidance is None else args.guidance
    scheduler = recipe.make_scheduler(scheduler_name, steps)

    out = Path(args.out or f"runs/{spec.name}-{scheduler_name}-{steps}steps")
    run = RunDir(out)
    manifest = build_manifest(recipe, spec, weights=str(args.weights or spec.repo or folder), revision=args.revision,
                              dtype=dtype, device=device, scheduler=scheduler, guidance=guidance, seed=args.seed,
                              prompt_source=source, n_prompts=len(prompts), prev_on_host=args.prev_on_host)
    run.open(manifest, prompts, resume=args.resume)
    print(f"{spec.name}: {len(prompts)} prompts x {steps} steps ({scheduler_name}, guidance {guidance}) "
          f"on {device} in {dtype} -> {out}", file=sys.stderr)
    run_prompts(recipe, prompts, run, scheduler=scheduler, guidance=guidance, seed=args.seed,
                save_images=args.save_images, save_latents=args.save_latents, prev_on_host=args.prev_on_host)
    return finish(out)


def recipe_options(recipe_type: type[Recipe], args: argparse.Namespace) -> dict:
    """The recipe options given as flags, by name (the recipe's keyword arguments); one the model does not take
    (not in its declared `options`) is an error."""
    given = {name: value for name, value in vars(args).items() if name in OPTIONS and value is not None}
    refused = sorted(set(given) - set(recipe_type.options))
    if refused:
        raise MiniditError(f"--{refused[0].replace('_', '-')} does not apply to {args.model}")
    return given


def finish(out: Path) -> Path:
    """Aggregate the records of a run directory, draw its figures, print where everything is."""
    from minidit.analysis import aggregate
    from minidit.analysis.figures import sample_grid, write_figures

    run = aggregate(out)
    written = write_figures(run, out / "figures")
    images = sorted((out / "images").glob("*.png")) if (out / "images").is_dir() else []
    if images:
        written += sample_grid_from_files(images, out, sample_grid, video=run.manifest.get("frames") is not None)
    print(f"done: {len(run.prompt_indices)} prompts in {out}/ (summary.csv, cv.csv, "
          f"{len(written)} figures in {out}/figures)", file=sys.stderr)
    return out


VIDEO_STRIP_PX = 160  # the height of a video's frame strip in the samples figure


def sample_grid_from_files(images: list[Path], out: Path, sample_grid, video: bool) -> list[Path]:
    """figures/samples.png from the run's images/ (for a video run: its frame strips, one per row, scaled down)."""
    import numpy as np
    from PIL import Image

    prompts = (out / "prompts.txt").read_text(encoding="utf-8").splitlines()
    pictures = [Image.open(p).convert("RGB") for p in images]
    if video:
        pictures = [im.resize((max(1, round(im.width * VIDEO_STRIP_PX / im.height)), VIDEO_STRIP_PX),
                              Image.Resampling.LANCZOS) if im.height > VIDEO_STRIP_PX else im for im in pictures]
    labels = [prompts[int(p.stem)] for p in images]
    return sample_grid([np.asarray(im) for im in pictures], labels, out / "figures" / "samples.png",
                       columns=1 if video else None)


def compare(args: argparse.Namespace) -> Path:
    import csv

    from minidit.analysis import read_run
    from minidit.analysis.figures import compare as compare_figure
    from minidit.analysis.rundir import atomic_file, check_creatable, make_folder

    if not args.out:
        raise MiniditError("--compare needs --out DIR for the comparison figures")
    labels = args.labels or [Path(r).name for r in args.compare]
    if len(labels) != len(args.compare):
        raise MiniditError(f"--labels gives {len(labels)} labels for {len(args.compare)} runs")
    out = Path(args.out)
    check_creatable(out)
    runs = [read_run(r) for r in args.compare]
    make_folder(out)
    rows = []
    for metric in ("l1", "rel_l1"):
        rows += compare_figure(runs, labels, metric, out / f"compare_{metric}.png")
    with atomic_file(out / "compare.csv", text=True, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"compared {len(runs)} runs -> {out}/ (compare.csv, compare_l1.png, compare_rel_l1.png)", file=sys.stderr)
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, `kill`), handled as Ctrl-C is."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import signal
    import threading

    # The prompt in flight is abandoned either way: records are written whole or not at all (rundir.atomic_file)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        if args.compare:
            compare(args)
        elif args.aggregate:
            finish(Path(args.aggregate))
        else:
            analyze(args)
    except (MiniditError, OSError) as e:  # OSError: a file-system failure at a place that does not report its own
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: finished prompts are saved; rerun the same command with --resume to continue",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
