"""Retrain one of minidit's embedded tiny models on procedurally drawn data, and export it in its Hub layout.

    python -m minidit.train_tiny                       # flux-tiny, 28 minutes on 2 CPU cores
    python -m minidit.train_tiny --model dit-tiny      # dit-tiny, 25 minutes
    python -m minidit.train_tiny --minutes 5 --out /tmp/flux-tiny

The models and their training: minidit/tiny/flux.py (flux-tiny, text-to-image FLUX.1) and minidit/tiny/dit.py
(dit-tiny, class-conditional DiT); the data: minidit/tiny/shapes.py. Each export writes a model card (README.md).
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

# OpenMP threads spin-wait between ops by default; when another process holds a core (a shared 2-core machine),
# that turns a 2-thread run ~25x slower. A short spin keeps the idle speed and loses ~2x, not ~25x, when contended.
# Must be set before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

MINUTES = {"flux-tiny": 28.0, "dit-tiny": 25.0}  # the default wall-clock budgets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="Train an embedded tiny model and export it in its Hub layout.")
    parser.add_argument("--model", choices=list(MINUTES), default="flux-tiny", help="which model (default flux-tiny)")
    parser.add_argument("--minutes", type=float, help="wall-clock training budget (default: flux-tiny 28, dit-tiny 25)")
    parser.add_argument("--out", type=Path, help="export folder (default: weights/MODEL)")
    args = parser.parse_args(argv)
    minutes = MINUTES[args.model] if args.minutes is None else args.minutes
    if minutes <= 0:
        print(f"error: --minutes must be positive, got {minutes:g}", file=sys.stderr)
        return 2
    out = args.out or Path("weights") / args.model
    command = "python -m minidit.train_tiny " + shlex.join(argv)
    if args.model == "dit-tiny":
        from minidit.tiny import dit

        model, stats = dit.train(minutes)
        dit.export(model, out, stats, command.strip())
    else:
        from minidit.tiny import flux

        flux.train_and_export(minutes, out, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
