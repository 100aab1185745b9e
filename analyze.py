"""Measure how much attention K, V and A change between consecutive diffusion steps, per layer, over prompts.

    python analyze.py                                   # the embedded flux-tiny on the CPU, under a minute
    python analyze.py --steps 14 --scheduler sd3        # the study's scheduler ablation, in miniature
    python analyze.py --model flux-dev --device cuda    # FLUX.1 [dev] itself (a Hub download)
    python analyze.py --model latte --device cuda --save-images   # Latte-1: 16 frames, GIFs and frame strips
    python analyze.py --model cogvideox --device cuda --prev-on-host --save-latents   # CogVideoX-5b, 49 frames
    python analyze.py --model mochi --device cuda --prev-on-host --save-latents   # Mochi 1 preview, 19 frames
    python analyze.py --model opensora --device cuda --save-latents   # Open-Sora 1.2: 51 frames at 240x426
    python analyze.py --model dit-tiny --steps 20 --out runs/tiny-20
    python analyze.py --model flux-tiny --ffn           # the feed-forward outputs F too, beside K, V and A
    python analyze.py --model flux-dev --device cuda --steps 14,28,56 --scheduler flux,sd3   # 6 runs, compared
    python analyze.py --model pixart --device cuda --preset paper --prompts caption1000.txt --batch-size 4
    torchrun --nproc_per_node=8 analyze.py --model pixart --device cuda --prompts coco:captions_val2014.json
    python analyze.py --compare runs/flux-tiny-flux-28steps runs/flux-tiny-sd3-14steps --out runs/ablation
    python analyze.py --aggregate runs/flux-tiny-flux-28steps   # rebuild tables and figures from the records
    python analyze.py --plan runs/ft --budget 0.35 --out plan.json   # a caching plan from a run made with --ffn
    python analyze.py --model flux-tiny --cache-plan plan.json  # sample with it: speed, FLOPs, memory, quality

A run directory holds manifest.json, one record per prompt, summary.csv, cv.csv and figures/ (see README).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from minidit.analysis import distributed
from minidit.errors import MiniditError, error_line
from minidit.pipelines import ModelSpec
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
    p.add_argument("--steps", type=int_list, help="sampling steps (default: the model's pipeline default); a "
                   "comma-separated list (14,28,56) sweeps them: one run each under --out, then their comparison")
    p.add_argument("--scheduler", type=name_list, help="sampler name (default: the model's own); a comma-separated "
                   "list (flux,sd3) sweeps them, with every --steps value")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; for FLUX.1-dev the distilled "
                                                  "guidance value fed to the model, for a FLUX without it (flux-tiny) "
                                                  "the true-CFG scale (default: the pipeline's)")
    p.add_argument("--prompts", metavar="FILE", help="UTF-8 text, one prompt per line (class ids or names for "
                                                     "class-conditional models), or coco:FILE, the first caption of "
                                                     "each image of a COCO captions file (captions_val2014.json, "
                                                     "Karpathy's dataset_coco.json)")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--seed", type=int_list, help="initial noise seed, the same for every prompt (default 0); with "
                   "--cache-plan a comma-separated list samples every prompt with every seed")
    p.add_argument("--preset", metavar="NAME", help="paper: the study's settings for the model (steps, scheduler, "
                                                    "guidance, size, frames, dtype, seed 42, number of prompts; "
                                                    "README: --preset paper); flags given beside it win")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="prompts sampled together in one forward (x the guidance branches); every prompt keeps its "
                        "own record, equal to a batch-size-1 run within float32 rounding (default 1)")
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
    p.add_argument("--ffn", action="store_true",
                   help="also record F, each block's feed-forward output (before gate and residual; FLUX single-stream "
                        "blocks: their whole update), filed under the block's attention layer")
    p.add_argument("--prev-on-host", action="store_true",
                   help="keep the previous step's K/V/A in host memory instead of on the accelerator")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="compare finished runs (needs --out)")
    p.add_argument("--labels", nargs="+", help="with --compare: one label per run (default: folder names)")
    p.add_argument("--aggregate", metavar="RUN", help="rebuild summary.csv, cv.csv and figures of a run")
    p.add_argument("--plan", metavar="RUN", help="write a caching plan from a finished run to --out PLAN.json: which "
                                                 "attention and feed-forward outputs a sampler may reuse, per step "
                                                 "and layer (needs --budget)")
    p.add_argument("--budget", type=float_list, metavar="F", help="with --plan: the fraction of block computations "
                   "to skip, 0 <= F < 1; a comma-separated list (0.2,0.35,0.5) writes one plan per budget and "
                   "method into the folder --out, as METHOD-BUDGET.json")
    p.add_argument("--method", type=name_list, default=["measured"],
                   help="with --plan: measured (the run's lowest-change steps, default), measured-cells (its "
                        "lowest-change layer and component cells), fora, pab or smoothcache (the baselines), or "
                        "several, comma-separated")
    p.add_argument("--cache-plan", metavar="PLAN", help="sample with caching plans (comma-separated files, or a "
                   "folder of them) and with none, side by side, and report time, FLOPs, memory and quality against "
                   "the uncached samples in --out (default runs/caching-MODEL)")
    return p.parse_args(argv)


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the flags not given with the preset's values for the model (minidit/presets.py)."""
    from minidit.presets import preset

    if args.preset is None:
        return
    for name, value in preset(args.preset, args.model).items():
        if getattr(args, name) is None:
            setattr(args, name, [value] if name in ("steps", "scheduler", "seed") else value)
    if args.prompts is None:
        raise MiniditError(f"--preset {args.preset} runs {args.num_prompts} prompts: pass them with --prompts FILE, "
                           f"e.g. the study's caption1000.txt (xdit-project/DiTCacheAnalysis), or coco:FILE")


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


@dataclass
class Loaded:
    """What the runs of one command share: the model, loaded once, its prompts, and where it runs."""

    recipe: Recipe
    spec: ModelSpec
    folder: Path
    prompts: list[str]
    source: str  # the prompts' origin, for the manifest
    device: str
    dtype: str
    ranks: distributed.Ranks


def analyze(args: argparse.Namespace) -> Path | None:
    """Fill the run directory (this process's share under torchrun), then aggregate it (rank 0). With several
    step counts or schedulers (a sweep), one run directory per combination under --out, then their comparison."""
    from minidit.analysis import RunDir
    from minidit.pipelines import model_spec, recipe_class

    apply_preset(args)
    spec = model_spec(args.model)
    recipe_type = recipe_class(spec.family)  # what it takes, read before its weights are loaded
    step_counts, schedulers = args.steps or [None], args.scheduler or [recipe_type.default_scheduler]
    options = check_args(args, spec, recipe_type)
    ranks = distributed.from_environment()
    device = distributed.rank_device(args.device or default_device(), ranks)
    distributed.join(ranks, device)
    sweep = len(step_counts) * len(schedulers) > 1
    early = RunDir(args.out) if args.out is not None and not sweep else None
    try:
        if early is not None:  # a run directory in use is refused before the weights are loaded
            distributed.on_leader(ranks, early.hold)
        loaded = load(args, spec, options, ranks, device)
        combinations = [(name, steps or loaded.recipe.default_steps) for name in schedulers for steps in step_counts]
        if not sweep:
            name, steps = combinations[0]
            out = Path(args.out or f"runs/{spec.name}-{name}-{steps}steps")
            return measure(loaded, args, early or RunDir(out), name, steps)
        parent = Path(args.out or f"runs/{spec.name}-{'+'.join(schedulers)}-"
                                  f"{'+'.join(str(s) for _, s in combinations[:len(step_counts)])}steps")
        outs = []
        for name, steps in combinations:
            outs.append(parent / f"{name}-{steps}steps")
            if ranks.leader:
                print(f"sweep {len(outs)} of {len(combinations)}: {name}, {steps} steps", file=sys.stderr)
            measure(loaded, args, RunDir(outs[-1]), name, steps)
        if ranks.leader:
            compare_runs(outs, [out.name for out in outs], parent)
        return parent
    finally:
        if early is not None:
            early.release()


def check_args(args: argparse.Namespace, spec: ModelSpec, recipe_type: type[Recipe]) -> dict:
    """Every check that needs no weights, before any are loaded; returns the recipe options given."""
    for steps in args.steps or []:
        if steps < 2:
            raise MiniditError(f"--steps must be at least 2 (the analysis compares consecutive steps), got {steps}")
    for name in args.scheduler or []:
        if name not in recipe_type.schedulers:
            raise MiniditError(f"{spec.name} has no scheduler {name!r}; choose one of "
                               f"{', '.join(recipe_type.schedulers)}")
    if args.batch_size < 1:
        raise MiniditError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed is not None and len(args.seed) > 1 and not args.cache_plan:
        raise MiniditError("a run has one seed (every prompt starts from its noise): give --seed one value")
    options = recipe_options(recipe_type, args)
    if args.save_images and not recipe_type.decodes:
        raise MiniditError(f"--save-images: minidit has no decoder for {spec.name} yet (its 3D VAE is a later "
                           f"piece of work); run without it, or keep the final latents with --save-latents")
    check_paths(args)
    return options


def load(args: argparse.Namespace, spec: ModelSpec, options: dict, ranks: distributed.Ranks, device: str) -> Loaded:
    """The weights (downloaded by rank 0 first; the others then find them in the cache their machine shares), the
    recipe built on them, and the prompts, each checked by the recipe."""
    from minidit.api import load_backbone, resolve_weights

    def resolve() -> Path:
        return resolve_weights(spec, args.weights, args.revision, args.download_dir)

    folder = distributed.on_leader(ranks, resolve)
    folder = folder if ranks.leader else resolve()  # its own machine's cache
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    recipe = load_backbone(spec.name, weights_dir=folder, dtype=dtype, device=device, **options)
    prompts, source = read_prompts(args.prompts, args.num_prompts, list(spec.prompts) or recipe.default_prompts())
    for prompt in prompts:
        recipe.parse_prompt(prompt)
    return Loaded(recipe, spec, folder, prompts, source, device, dtype, ranks)


def measure(loaded: Loaded, args: argparse.Namespace, run, scheduler_name: str, steps: int) -> Path | None:
    """One run: open (or resume) `run`, sample this rank's share of the missing prompts, aggregate on rank 0."""
    from minidit.analysis.engine import build_manifest, missing_prompts, note_progress, run_prompts
    from minidit.analysis.recorder import tensors_to_record

    recipe, spec, ranks, prompts = loaded.recipe, loaded.spec, loaded.ranks, loaded.prompts
    guidance = recipe.default_guidance if args.guidance is None else args.guidance
    seed = 0 if args.seed is None else args.seed[0]
    scheduler = recipe.make_scheduler(scheduler_name, steps)
    manifest = build_manifest(recipe, spec, weights=str(args.weights or spec.repo or loaded.folder),
                              revision=args.revision, dtype=loaded.dtype, device=loaded.device, scheduler=scheduler,
                              guidance=guidance, seed=seed, prompt_source=loaded.source, n_prompts=len(prompts),
                              prev_on_host=args.prev_on_host, tensors=tensors_to_record(args.ffn))
    try:
        distributed.on_leader(ranks, lambda: run.open(manifest, prompts, resume=args.resume))
        if ranks.leader:
            where = f" in {ranks.world} processes" if ranks.world > 1 else ""
            print(f"{spec.name}: {len(prompts)} prompts x {steps} steps ({scheduler_name}, guidance {guidance}) on "
                  f"{loaded.device}{where} in {loaded.dtype}, batch size {args.batch_size} -> {run.path}",
                  file=sys.stderr)
        # rank 0 lists the missing prompts before anyone writes a record; rank r samples every K-th from the r-th
        todo = distributed.on_leader(ranks, lambda: missing_prompts(run, len(prompts)))
        done = run_prompts(recipe, prompts, run, scheduler=scheduler, guidance=guidance, seed=seed,
                           batch_size=args.batch_size, todo=todo[ranks.rank::ranks.world],
                           save_images=args.save_images, save_latents=args.save_latents,
                           prev_on_host=args.prev_on_host, progress=ranks.leader)
        done = distributed.gather(ranks, done)  # waits for every rank to finish its prompts
        if not ranks.leader:
            return None
        note_progress(run, done)
        return finish(run.path)
    finally:
        run.release()


def int_list(text: str) -> list[int]:
    """--steps: "28" -> [28], "14,28,56" -> [14, 28, 56] (a sweep)."""
    return number_list(text, int, "invalid int value")


def float_list(text: str) -> list[float]:
    """--budget: "0.35" -> [0.35], "0.2,0.35,0.5" -> [0.2, 0.35, 0.5]."""
    return number_list(text, float, "invalid number")


def number_list(text: str, convert, invalid: str) -> list:
    try:
        return distinct([convert(part) for part in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{invalid}: {text!r} (a number, or numbers separated by commas)") from None


def name_list(text: str) -> list[str]:
    """--scheduler: "flux" -> ["flux"], "flux,sd3" -> ["flux", "sd3"] (a sweep)."""
    return distinct([part.strip() for part in text.split(",")])


def distinct(values: list) -> list:
    if "" in values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError("give each value once, separated by commas")
    return values


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
    if not args.out:
        raise MiniditError("--compare needs --out DIR for the comparison figures")
    labels = args.labels or [Path(r).name for r in args.compare]
    if len(labels) != len(args.compare):
        raise MiniditError(f"--labels gives {len(labels)} labels for {len(args.compare)} runs")
    return compare_runs([Path(r) for r in args.compare], labels, Path(args.out))


def compare_runs(paths: list[Path], labels: list[str], out: Path) -> Path:
    """compare.csv (similarity of every run's curves to the first's) and the overlays on the normalised axis."""
    import csv

    from minidit.analysis import read_run
    from minidit.analysis.figures import compare as compare_figure
    from minidit.analysis.rundir import atomic_file, check_creatable, make_folder

    check_creatable(out)
    runs = [read_run(r) for r in paths]
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


def make_plans(args: argparse.Namespace) -> Path:
    """--plan RUN: one plan to the file --out, or (several budgets or methods) one per pair into the folder --out;
    the run is read once, and every plan is made before any is written."""
    from minidit.analysis import read_run
    from minidit.analysis.rundir import make_folder
    from minidit.caching import make_plan

    if args.budget is None or not args.out:
        raise MiniditError("--plan RUN needs --budget F (the fraction of block computations to skip) and --out "
                           "PLAN.json (a folder, with several budgets or methods)")
    pairs = [(method, budget) for method in args.method for budget in args.budget]
    out = Path(args.out)
    if len(pairs) > 1 and out.suffix == ".json":
        raise MiniditError(f"{len(pairs)} plans (budgets x methods) go into a folder: give --out a folder, not {out}")
    run = read_run(args.plan)
    plans = [make_plan(run, budget, method) for method, budget in pairs]
    if len(pairs) == 1:
        targets = [out]
    else:
        make_folder(out)
        targets = [out / f"{method}-{budget:g}.json" for method, budget in pairs]
    for plan, target in zip(plans, targets):
        plan.save(target)
        print(f"{target}: {plan.summary()}", file=sys.stderr)
    return out


def plan_paths(text: str) -> list[Path]:
    """--cache-plan: comma-separated plan files, or a folder of them (every *.json in it, by name)."""
    paths = []
    for part in text.split(","):
        path = Path(part.strip())
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise MiniditError(f"--cache-plan {path} is a folder without plan files (*.json)")
            paths += found
        elif not path.is_file():
            raise MiniditError(f"--cache-plan {path} does not exist: pass plan files written by analyze.py --plan, "
                               f"or a folder of them")
        else:
            paths.append(path)
    return paths


def evaluate_plans(args: argparse.Namespace) -> Path:
    """--cache-plan: sample the prompts with every plan and without, report time, FLOPs, memory and quality."""
    from minidit.caching import METHODS
    from minidit.caching import load as load_plan
    from minidit.caching.report import evaluate, markdown, write_report
    from minidit.pipelines import model_spec, recipe_class

    spec = model_spec(args.model)
    recipe_type = recipe_class(spec.family)
    paths = plan_paths(args.cache_plan)
    plans = {path.stem: load_plan(path) for path in paths}
    if len(plans) != len(paths):
        raise MiniditError("--cache-plan: two plan files have the same name; each row of the report is named by its "
                           "file")
    order = list(METHODS)  # rows by budget, then method (measured first), then name
    plans = dict(sorted(plans.items(), key=lambda item: (item[1].budget, order.index(item[1].method)
                                                           if item[1].method in order else len(order), item[0])))
    first = next(iter(plans.values()))
    steps = (args.steps or [first.steps])[0]
    scheduler = (args.scheduler or [first.scheduler])[0]
    if len(args.steps or []) > 1 or len(args.scheduler or []) > 1:
        raise MiniditError("--cache-plan samples with one step count and scheduler: the plans'")
    options = check_args(args, spec, recipe_type)
    out = Path(args.out or f"runs/caching-{spec.name}")
    device = args.device or default_device()
    loaded = load(args, spec, options, distributed.Ranks(), device)
    names = [layer.name for layer in loaded.recipe.attention_layers()]
    for name, plan in plans.items():
        try:
            plan.check_against(spec.name, names, steps, scheduler)
        except MiniditError as e:
            raise MiniditError(f"--cache-plan {name}: {e}") from None
    guidance = loaded.recipe.default_guidance if args.guidance is None else args.guidance
    seeds = args.seed or [0]
    print(f"{spec.name}: {len(loaded.prompts)} prompts x {len(seeds)} seeds x {steps} steps ({scheduler}, guidance "
          f"{guidance}) on {device} in {loaded.dtype}, batch size {args.batch_size}: uncached and {len(plans)} "
          f"plans -> {out}", file=sys.stderr)
    rows = evaluate(loaded.recipe, spec.name, plans, loaded.prompts, seeds, scheduler_name=scheduler,
                    guidance=guidance, batch_size=args.batch_size)
    context = {"model": spec.name, "steps": steps, "scheduler": scheduler, "guidance": guidance, "seeds": seeds,
               "prompts": loaded.prompts, "prompt_source": loaded.source, "batch_size": args.batch_size,
               "device": device, "dtype": loaded.dtype, "plans": {path.stem: str(path) for path in paths},
               "title": f"{spec.name}, {steps} steps ({scheduler}): caching plans, quality against speed-up "
                        f"(labels: skipped fraction)"}
    write_report(rows, out, context)
    print(markdown(rows), end="")
    print(f"report in {out}/ (report.md, report.csv, report.json, quality_vs_speedup.png)", file=sys.stderr)
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
    # SIGXFSZ ignored: past a file-size limit (ulimit -f) a write fails with EFBIG and is reported as a full disk
    # is, instead of the signal killing the process
    handlers = {signal.SIGTERM: _terminate, signal.SIGXFSZ: signal.SIG_IGN}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()} if on_main_thread else {}
    ranks = distributed.Ranks()
    try:
        ranks = distributed.from_environment()
        if args.compare:
            compare(args)
        elif args.aggregate:
            finish(Path(args.aggregate))
        elif args.plan:
            make_plans(args)
        elif args.cache_plan:
            evaluate_plans(args)
        else:
            analyze(args)
        distributed.finish(ranks)
    except distributed.Reported:  # rank 0 has said what went wrong; torchrun may now stop this process quietly
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return 2
    except (MiniditError, OSError) as e:  # OSError: a file-system failure at a place that does not report its own
        if ranks.leader:  # under torchrun every rank meets the same error; one line is enough
            print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        if ranks.leader:
            print(f"{what}: finished prompts are saved; rerun the same command with --resume to continue",
                  file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        distributed.leave(ranks)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
