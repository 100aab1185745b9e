"""`make bench`: what the analysis costs (flux-tiny, dit-tiny, DiT-XL/2's width, Latte-1's width), minidit's DiT and
Latte forwards against diffusers' on the same weights, a study's throughput (dit-tiny prompts per minute at batch
sizes 1, 2, 4, 8, and torchrun's 2 gloo processes against 1 process), and the wall-time speed-up of a 0.35-budget
caching plan (dit-tiny, flux-tiny, DiT-XL/2's width; `--only caching`).

`make bench ARGS="--device cuda"` runs the GPU bench instead (tests/gpu_bench.py: PixArt-α, FLUX.1-dev and Mochi at
full width on random weights); `--device cpu` runs it at the reduced size its test uses.

Ratios are measured in one process, interleaving the contenders and keeping each one's best of several
repeats, so that machine load affects both alike. Printed, never asserted.
"""

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import write_dit_folder  # noqa: E402

import minidit  # noqa: E402
from minidit.models.dit import DiTConfig, load_dit  # noqa: E402
from minidit.pipelines import FLUX_TINY_PROMPTS  # noqa: E402


def best_of(repeats: int, *fns):
    """Best wall time of each fn, alternating them repeat by repeat."""
    times = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i] = min(times[i], time.perf_counter() - start)
    return times


def analysis_overhead(recipe, name: str, prompts: int, steps: int, repeats: int,
                      texts: tuple[str, ...] = ()) -> None:
    """Best total over `repeats` of sampling the prompts (`texts`, or the recipe's defaults) plainly and with the
    recorder, alternating the two prompt by prompt (and which goes first, repeat by repeat) so that a slow spell of
    the machine hits both. Prompts are encoded beforehand, as in a run."""
    labels = list(texts or recipe.default_prompts())[:prompts]
    recipe.prepare(labels)
    for record in (False, True):  # warm-up
        minidit.sample(recipe, labels[0], steps=steps, record=record)
    best = {False: float("inf"), True: float("inf")}
    for repeat in range(repeats):
        total = {False: 0.0, True: 0.0}
        for p in labels:
            for record in (False, True) if repeat % 2 == 0 else (True, False):
                start = time.perf_counter()
                minidit.sample(recipe, p, steps=steps, record=record)
                total[record] += time.perf_counter() - start
        best = {record: min(best[record], total[record]) for record in best}
    t_plain, t_rec = best[False], best[True]
    print(f"analysis overhead ({name}, {len(labels)} prompts x {steps} steps, guidance {recipe.default_guidance}, "
          f"{torch.get_num_threads()} threads, best of {repeats})")
    print(f"  plain sampling     {t_plain:8.3f} s")
    print(f"  with the recorder  {t_rec:8.3f} s")
    print(f"  ratio              {t_rec / t_plain:8.3f} x")


def xl_width_folder() -> Path:
    """DiT-XL/2's blocks at 256x256 (width 1152, 256 tokens), 4 of its 28 layers, random weights, Hub layout."""
    xl4 = DiTConfig(num_layers=4, sample_size=32)
    return write_dit_folder(Path(tempfile.mkdtemp()) / "xl4", xl4, std=0.02)


def peak_memory(steps: int) -> None:
    """Peak resident memory of a whole process that samples plainly vs. with the recorder."""
    code = ("import sys, resource, minidit; r = minidit.load_backbone('dit-tiny');"
            "[minidit.sample(r, p, steps={steps}, record={record}) for p in r.default_prompts()[:2]];"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = {}
    for record in (False, True):
        out = subprocess.run([sys.executable, "-c", code.format(steps=steps, record=record)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        peaks[record] = int(out.stdout.split()[-1]) / 1024  # KiB -> MiB
    print("peak memory (whole process, max RSS)")
    print(f"  plain sampling     {peaks[False]:8.1f} MiB")
    print(f"  with the recorder  {peaks[True]:8.1f} MiB   (ratio {peaks[True] / peaks[False]:.3f} x)")


def forward_vs_diffusers(xl_folder: Path, repeats: int) -> None:
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        print("forward vs diffusers: skipped (install the reference extra: make install-reference)")
        return
    cases = {"dit-tiny (batch 2, CFG)": (ROOT / "weights" / "dit-tiny" / "transformer", 2),
             "DiT-XL/2 width, 4 layers, 256x256 (batch 2)": (xl_folder / "transformer", 2)}
    print("forward time, minidit vs diffusers on identical weights (fp32, CPU)")
    for name, (folder, batch) in cases.items():
        ours = load_dit(folder)
        ref = DiTTransformer2DModel.from_pretrained(folder).eval()
        c = ours.config
        x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size)
        t, y = torch.full((batch,), 500), torch.zeros(batch, dtype=torch.long)
        with torch.no_grad():
            err = (ours(x, t, y) - ref(x, timestep=t, class_labels=y).sample).abs().max().item()
            mine, theirs = best_of(repeats, lambda: ours(x, t, y), lambda: ref(x, timestep=t, class_labels=y))
        print(f"  {name}: minidit {mine * 1e3:7.2f} ms, diffusers {theirs * 1e3:7.2f} ms, "
              f"ratio {mine / theirs:.3f} x (max |diff| {err:.1e})")


def latte_width(steps: int, repeats: int) -> None:
    """Latte-1's blocks (width 1152, 16 heads) with 2 spatial and 2 temporal blocks, 16 frames of 256 tokens (256 x
    256 pixels), batch 2 (guidance): minidit's forward against diffusers' LatteTransformer3DModel on identical
    weights, and a sampling loop of `steps` forwards with and without the recorder."""
    from minidit.analysis.recorder import Recorder
    from minidit.attention import recording
    from minidit.models.latte import Latte, LatteConfig, load_latte

    torch.manual_seed(0)
    try:
        from diffusers import LatteTransformer3DModel
    except ImportError:  # the recorder's overhead only, on random weights
        diffusers_model = None
        with torch.no_grad():
            ours = Latte(LatteConfig(num_layers=2, sample_size=32))
            for p in ours.parameters():
                p.normal_(0, 0.02)
    else:
        diffusers_model = LatteTransformer3DModel(
            num_layers=2, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, patch_size=2,
            sample_size=32, caption_channels=4096, cross_attention_dim=1152, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
            num_embeds_ada_norm=1000).eval()
        folder = Path(tempfile.mkdtemp()) / "latte-width"
        diffusers_model.save_pretrained(folder)
        ours = load_latte(folder)
    batch, frames, text_tokens = 2, 16, 120
    x = torch.randn(batch, 4, frames, 32, 32)
    t, text = torch.full((batch,), 500), torch.randn(batch, text_tokens, 4096)
    print(f"Latte-1 width (1152, 16 heads), 2 spatial + 2 temporal blocks, {frames} frames x 256 tokens, batch "
          f"{batch}, fp32, {torch.get_num_threads()} threads")
    with torch.no_grad():
        if diffusers_model is None:
            print("  forward vs diffusers: skipped (install the reference extra: make install-reference)")
        else:
            def theirs_fn():
                return diffusers_model(x, timestep=t, encoder_hidden_states=text).sample

            err = (ours(x, t, text) - theirs_fn()).abs().max().item()
            mine, theirs = best_of(repeats, lambda: ours(x, t, text), theirs_fn)
            print(f"  forward: minidit {mine:7.3f} s, diffusers {theirs:7.3f} s, ratio {mine / theirs:.3f} x "
                  f"(max |diff| {err:.1e})")

        class HoldOnly:  # keeps the previous step's K, V and A as the recorder does, and computes nothing
            def capture(self, layer, tensor, x, token_dim, streams):
                if tensor != "F":  # F only with --ffn, as the recorder
                    held[(layer, tensor)] = x

        held = {}

        def loop(mode: str) -> None:
            rec = Recorder(ours.attention_layers(), branches=("uncond", "cond"), num_steps=steps, device="cpu")
            context = {"plain": contextlib.nullcontext(), "hold": recording(HoldOnly()), "record": rec.attach(ours)}
            with context[mode]:
                for step in range(steps):
                    ours(x + 0.01 * step, t - 10 * step, text)
            if mode == "record":
                rec.finish()
            held.clear()

        plain, hold, recorded = best_of(repeats, *(functools.partial(loop, m) for m in ("plain", "hold", "record")))
    print(f"  {steps} steps: plain {plain:7.3f} s, with the recorder {recorded:7.3f} s, ratio {recorded / plain:.3f} x"
          f"; only holding the previous step's K, V, A: {hold / plain:.3f} x")


STEADY_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(2**28)}


def latte_in_subprocesses(repeats: int) -> None:
    """latte_width in fresh processes, with glibc's default allocator (which returns each large block to the kernel
    when it is freed, so the next one is a fresh mapping the kernel zeroes page by page) and with one that keeps
    freed memory for reuse (STEADY_MALLOC), so the recorder's own cost shows apart from that churn."""
    for label, env in (("default allocator", {}), ("allocator keeping freed memory: " +
                                                   " ".join(f"{k}={v}" for k, v in STEADY_MALLOC.items()),
                                                   STEADY_MALLOC)):
        print(f"[{label}]", flush=True)
        subprocess.run([sys.executable, "-u", __file__, "--latte-only", "--repeats", str(repeats)], cwd=ROOT,
                       env={**os.environ, **env}, check=True)


def study_run(recipe, prompts: list[str], steps: int, batch_size: int) -> None:
    """The analysis of `prompts` as analyze.py runs it (recorder attached, a record written per prompt), in a
    temporary run directory."""
    from minidit.analysis import RunDir
    from minidit.analysis.engine import build_manifest, run_prompts
    from minidit.pipelines import model_spec

    scheduler = recipe.make_scheduler(recipe.default_scheduler, steps)
    manifest = build_manifest(recipe, model_spec("dit-tiny"), weights="dit-tiny", revision=None, dtype="fp32",
                              device="cpu", scheduler=scheduler, guidance=recipe.default_guidance, seed=0,
                              prompt_source="bench", n_prompts=len(prompts), prev_on_host=False)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        run.open(manifest, prompts, resume=False)
        run_prompts(recipe, prompts, run, scheduler=scheduler, guidance=recipe.default_guidance, seed=0,
                    batch_size=batch_size, progress=False)
        run.release()


def batch_throughput(prompts: int, steps: int, repeats: int) -> None:
    """dit-tiny prompts per minute at batch sizes 1, 2, 4 and 8, the batch sizes alternating repeat by repeat."""
    recipe = minidit.load_backbone("dit-tiny")
    labels = (recipe.default_prompts() * prompts)[:prompts]
    recipe.prepare(labels)
    sizes = (1, 2, 4, 8)
    study_run(recipe, labels[:8], steps, 8)  # warm-up
    times = best_of(repeats, *(functools.partial(study_run, recipe, labels, steps, size) for size in sizes))
    print(f"dit-tiny study throughput ({prompts} prompts x {steps} steps, guidance {recipe.default_guidance}, "
          f"recorded, {torch.get_num_threads()} threads, best of {repeats})")
    for size, seconds in zip(sizes, times):
        print(f"  --batch-size {size}: {prompts / seconds * 60:7.1f} prompts/min  ({times[0] / seconds:.2f} x batch 1)")


def torchrun_throughput(prompts: int, steps: int, repeats: int) -> None:
    """The same prompts by 1 process with 1 thread and by torchrun's 2 gloo processes with 1 thread each: sampling
    throughput from the manifest (`last_command`: the slowest rank's time, text encoding included), and the whole
    command's wall time (Python, torch and torchrun's start-up included), alternating, best of `repeats`."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        labels = minidit.load_backbone("dit-tiny").default_prompts()
        prompt_file.write_text("\n".join((labels * prompts)[:prompts]) + "\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        best = {1: (float("inf"), float("inf")), 2: (float("inf"), float("inf"))}
        for repeat in range(repeats):
            for procs in (1, 2):
                out = Path(tmp) / f"run-{procs}-{repeat}"
                launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if procs == 2 else []
                start = time.perf_counter()
                subprocess.run([sys.executable, *launcher, str(ROOT / "analyze.py"), "--model", "dit-tiny", "--prompts",
                                str(prompt_file), "--steps", str(steps), "--device", "cpu", "--out", str(out)],
                               env=env, check=True, capture_output=True)
                wall = time.perf_counter() - start
                sampling = json.loads((out / "manifest.json").read_text())["last_command"]["seconds"]
                best[procs] = (min(best[procs][0], sampling), min(best[procs][1], wall))
    print(f"dit-tiny, {prompts} prompts x {steps} steps: torchrun's 2 gloo processes (1 thread each) vs 1 process "
          f"(1 thread), best of {repeats}")
    for procs, (sampling, wall) in best.items():
        print(f"  {procs} process{'es' if procs > 1 else ''}: sampling {prompts / sampling * 60:7.1f} prompts/min "
              f"({sampling:.2f} s), whole command {wall:.2f} s")
    print(f"  2 processes / 1: sampling throughput {best[1][0] / best[2][0]:.2f} x, whole command "
          f"{best[1][1] / best[2][1]:.2f} x")


def caching_speedup(name: str, recipe, prompts: list[str], steps: int, repeats: int, budget: float = 0.35,
                    weights: Path | None = None) -> None:
    """Wall time of sampling with a measured plan at `budget` against the uncached sampler, in one process,
    alternating, best of `repeats`: a run with F, its plan, then the same batch sampled both ways."""
    import analyze
    from minidit.caching import load as load_plan
    from minidit.caching.cache import PlanCache
    from minidit.caching.report import count_flops

    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("\n".join(prompts) + "\n")
        common = ["--model", name, "--steps", str(steps), "--prompts", str(prompt_file), "--device", "cpu",
                  *(["--weights", str(weights)] if weights else [])]
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # the commands' progress
            assert analyze.main([*common, "--ffn", "--out", f"{tmp}/run"]) == 0
            assert analyze.main(["--plan", f"{tmp}/run", "--budget", str(budget), "--out", f"{tmp}/plan.json"]) == 0
        plan = load_plan(f"{tmp}/plan.json")
    cache = PlanCache(recipe.model, recipe.attention_layers(), plan)
    guidance = recipe.default_guidance

    def uncached():
        recipe.generate(prompts, 1, recipe.make_scheduler(plan.scheduler, steps), guidance)

    def cached():
        with cache.sampling():
            uncached()

    recipe.prepare(prompts)
    uncached(), cached()  # warm-up
    flops = 1 - count_flops(cached) / count_flops(uncached)
    plain, planned = best_of(repeats, uncached, cached)
    print(f"{name}: {len(prompts)} prompts in one batch x {steps} steps, guidance {guidance}; measured plan at budget "
          f"{budget}: skips {plan.skipped_fraction():.1%} of block computations, {flops:.1%} of the FLOPs (counted), "
          f"best of {repeats}")
    print(f"  uncached {plain:.3f} s, with the plan {planned:.3f} s: speed-up {plain / planned:.2f} x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latte-only", action="store_true", help="only Latte-1's width, in this process")
    p.add_argument("--device", help="run the GPU bench (tests/gpu_bench.py) on this device instead: cuda, or cpu at "
                                    "its reduced size")
    p.add_argument("--only", choices=["study", "caching"], help="study: only the throughput at batch sizes and with "
                   "torchrun; caching: only the speed-up of a 0.35-budget plan")
    args = p.parse_args()
    if args.device is not None:
        import gpu_bench

        gpu_bench.main(["--device", args.device, *(["--reduced"] if args.device == "cpu" else [])])
        return
    if args.latte_only:
        latte_width(steps=4, repeats=args.repeats)
        return
    if args.only in (None, "caching"):
        flux_tiny, dit_tiny = minidit.load_backbone("flux-tiny"), minidit.load_backbone("dit-tiny")
        caching_speedup("dit-tiny", dit_tiny, dit_tiny.default_prompts(), dit_tiny.default_steps, args.repeats)
        caching_speedup("flux-tiny", flux_tiny, list(FLUX_TINY_PROMPTS), flux_tiny.default_steps, args.repeats)
        xl_folder = xl_width_folder()
        caching_speedup("dit-tiny", minidit.load_backbone("dit-tiny", weights_dir=xl_folder), ["0", "1"], 20,
                        max(2, args.repeats // 2), weights=xl_folder)
        if args.only == "caching":
            return
    batch_throughput(prompts=16, steps=args.steps, repeats=args.repeats)
    torchrun_throughput(prompts=16, steps=args.steps, repeats=max(2, args.repeats // 2))
    if args.only == "study":
        return
    flux_tiny = minidit.load_backbone("flux-tiny")
    analysis_overhead(flux_tiny, "flux-tiny", args.prompts, flux_tiny.default_steps, 2 * args.repeats,
                      FLUX_TINY_PROMPTS)
    analysis_overhead(minidit.load_backbone("dit-tiny"), "dit-tiny", args.prompts, args.steps, 2 * args.repeats)
    xl_folder = xl_width_folder()
    xl = minidit.load_backbone("dit-tiny", weights_dir=xl_folder)
    analysis_overhead(xl, "DiT-XL/2 width, 4 layers, 256x256", 2, 10, max(2, args.repeats // 2))
    peak_memory(args.steps)
    forward_vs_diffusers(xl_folder, args.repeats * 4)
    latte_in_subprocesses(repeats=max(2, args.repeats // 2))


if __name__ == "__main__":
    main()
