"""`make bench`: what the analysis costs (flux-tiny, dit-tiny, DiT-XL/2's width, Latte-1's width), and minidit's DiT and
Latte forwards against diffusers' on the same weights.

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latte-only", action="store_true", help="only Latte-1's width, in this process")
    args = p.parse_args()
    if args.latte_only:
        latte_width(steps=4, repeats=args.repeats)
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
