"""The measurements behind the measured plan's defaults (keep_first, keep_last, max_reuse; minidit/caching/measured.py).

For each run: the change of the attention output A per transition (the plan's own measure: rel_l1 pooled over
streams and guidance branches, averaged over prompts), as multiples of the median over (layer, transition):
the layer mean at the first and last three transitions, the spread over layers at the first and the last, and the
change a chain of k reuses accumulates in the middle third of sampling (the median and the worst over layers and
start steps).

    python analyze.py --model flux-tiny --steps 28 --out /tmp/plan-runs/flux-tiny
    python analyze.py --model dit-tiny --steps 50 --out /tmp/plan-runs/dit-tiny
    python tests/measure_plan_defaults.py /tmp/plan-runs/flux-tiny /tmp/plan-runs/dit-tiny
"""

import argparse

import numpy as np

from minidit.analysis.aggregate import read_run
from minidit.caching.measured import component_change

CHAINS = range(1, 6)


def report(path: str) -> None:
    run = read_run(path)
    change = component_change(run)[1:, :, 0]  # [transition, layer], attention
    median = np.median(change)
    mean = change.mean(axis=1)
    print(f"{path}: {run.manifest['model']}, {run.manifest['steps']} steps, {len(run.sums)} prompts; "
          f"median rel_l1 of A {median:.4f}")
    print(f"  layer mean, transitions 1-3: {', '.join(f'{x:.2f}x' for x in mean[:3] / median)}; "
          f"last three: {', '.join(f'{x:.2f}x' for x in mean[-3:] / median)}")
    print(f"  transitions 2..N-2 span {(mean[1:-1] / median).min():.2f}x-{(mean[1:-1] / median).max():.2f}x")
    print(f"  per layer at transition 1: {(change[0] / median).min():.1f}x-{(change[0] / median).max():.1f}x; "
          f"at the last: {(change[-1] / median).min():.1f}x-{(change[-1] / median).max():.1f}x")
    third = len(change) // 3
    for k in CHAINS:
        chains = np.stack([change[d:d + k].sum(axis=0) for d in range(third, 2 * third - k + 1)])
        print(f"  a chain of {k} reuses in the middle third accumulates {np.median(chains) / median:.2f}x "
              f"(worst {chains.max() / median:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    for path in parser.parse_args().runs:
        report(path)


if __name__ == "__main__":
    main()
