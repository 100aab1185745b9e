"""`make caching`: the README's table of caching plans on the embedded models, from scratch (about 40 minutes on 2
CPU cores). For flux-tiny and dit-tiny, the three commands a user would type:

    analyze.py --model M --ffn --out OUT/M-run                  # calibration: the default prompts, seed 0
    analyze.py --plan OUT/M-run --budget 0.2,0.35,0.5 --method measured,measured-cells,fora,pab,smoothcache \\
               --out OUT/M-plans
    analyze.py --model M --cache-plan OUT/M-plans --prompts ... --seed ... --batch-size 8 --out OUT/M

The plans are judged on other noise than they were made from (seeds 1 and up) and, for flux-tiny, mostly other
captions: the 48 of its accuracy grid (every colour x shape once), seeds 1-2; dit-tiny: its 8 classes, seeds
1-12. 96 samples each, every one sampled uncached and with each of the 15 plans.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import analyze  # noqa: E402
from minidit.tiny.accuracy import default_grid  # noqa: E402

BUDGETS = "0.2,0.35,0.5"
METHODS = "measured,measured-cells,fora,pab,smoothcache"
SEEDS = {"flux-tiny": "1,2", "dit-tiny": ",".join(str(s) for s in range(1, 13))}


def evidence(model: str, out: Path) -> Path:
    run, plans, report = out / f"{model}-run", out / f"{model}-plans", out / model
    commands = [["--model", model, "--ffn", "--out", str(run), "--resume"],
                ["--plan", str(run), "--budget", BUDGETS, "--method", METHODS, "--out", str(plans)],
                ["--model", model, "--cache-plan", str(plans), "--seed", SEEDS[model], "--batch-size", "8",
                 "--out", str(report)]]
    if model == "flux-tiny":
        captions = out / "flux-tiny-captions.txt"
        captions.write_text("\n".join(default_grid()[0]) + "\n", encoding="utf-8")
        commands[2] += ["--prompts", str(captions)]
    for argv in commands:
        print("python analyze.py " + " ".join(argv), file=sys.stderr, flush=True)
        if analyze.main(argv) != 0:
            raise SystemExit(f"failed: python analyze.py {' '.join(argv)}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/caching", help="where the runs, plans and reports go")
    p.add_argument("--models", default="flux-tiny,dit-tiny")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        report = evidence(model, out)
        print(f"\n{model}: {report}/report.md, {report}/quality_vs_speedup.png\n")
        print((report / "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
