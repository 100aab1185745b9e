"""`make bench`: what the analysis costs (flux-tiny, dit-tiny, DiT-XL/2's width), and minidit's DiT forward against
diffusers' on the same weights.

Ratios are measured in one process, interleaving the contenders and keeping each one's best of several
repeats, so that machine load affects both alike. Printed, never asserted.
"""

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    flux_tiny = minidit.load_backbone("flux-tiny")
    analysis_overhead(flux_tiny, "flux-tiny", args.prompts, flux_tiny.default_steps, 2 * args.repeats,
                      FLUX_TINY_PROMPTS)
    analysis_overhead(minidit.load_backbone("dit-tiny"), "dit-tiny", args.prompts, args.steps, 2 * args.repeats)
    xl_folder = xl_width_folder()
    xl = minidit.load_backbone("dit-tiny", weights_dir=xl_folder)
    analysis_overhead(xl, "DiT-XL/2 width, 4 layers, 256x256", 2, 10, max(2, args.repeats // 2))
    peak_memory(args.steps)
    forward_vs_diffusers(xl_folder, args.repeats * 4)


if __name__ == "__main__":
    main()
