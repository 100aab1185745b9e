"""Measure how far minidit's outputs stray from the stored fixtures under each CPU capability.

torch picks its vector kernels by CPU (`default` = scalar, `avx2`, `avx512`), and float results move by an ulp
or so between them; the fixtures were written on one machine. This runs the stored-fixture tests (reference
oracles hidden, as in CI) once per capability this CPU offers, collects every error the tests compute with
conftest's `scaled_error` (MINIDIT_ERROR_LOG), and prints, per test, the worst error under each capability
and over all of them, next to nothing else: the tolerance beside each assertion is that worst case times a
stated margin.

    python tests/measure_tolerances.py                       # every test file
    python tests/measure_tolerances.py tests/test_flow.py    # some of them
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("default", "avx2", "avx512")


def offered() -> list[str]:
    """The capabilities torch can use here: asking for one the CPU lacks falls back, so check what it took."""
    found = []
    for capability in CAPABILITIES:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                               capture_output=True, text=True, env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
        if probe.stdout.strip().lower() == capability:
            found.append(capability)
    return found


def numpy_dispatch() -> str:
    """numpy's dispatchable SIMD targets, to disable with NPY_DISABLE_CPU_FEATURES (the baseline cannot be)."""
    code = ("import numpy as np; m = getattr(np, '_core', None) or np.core; "
            "print(' '.join(m._multiarray_umath.__cpu_dispatch__))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run(capability: str, paths: list[str], log: Path) -> int:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "MINIDIT_LIVE": "0", "MINIDIT_ERROR_LOG": str(log)}
    if capability == "default":
        env["NPY_DISABLE_CPU_FEATURES"] = numpy_dispatch()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    print(f"{capability}: {result.stdout.strip().splitlines()[-1]}", flush=True)
    return result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["tests"])
    parser.add_argument("--json", type=Path, help="also write {test: {capability: worst}} here")
    args = parser.parse_args()

    worst: dict[str, dict[str, float]] = defaultdict(dict)
    with tempfile.TemporaryDirectory() as tmp:
        for capability in offered():
            log = Path(tmp) / f"{capability}.jsonl"
            log.touch()
            run(capability, args.paths, log)
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                cell = worst[entry["test"]]
                cell[capability] = max(cell.get(capability, 0.0), entry["error"])

    capabilities = sorted({c for cell in worst.values() for c in cell}, key=CAPABILITIES.index)
    by_function: dict[str, dict[str, float]] = defaultdict(dict)  # parametrisations folded together
    for test, cell in worst.items():
        function = re.sub(r"\[.*\]$", "", test)
        for capability, error in cell.items():
            by_function[function][capability] = max(by_function[function].get(capability, 0.0), error)
    print(f"\n{'test':<78}" + "".join(f"{c:>11}" for c in capabilities) + f"{'worst':>11}")
    for function in sorted(by_function):
        cell = by_function[function]
        print(f"{function:<78}" + "".join(f"{cell.get(c, float('nan')):11.3g}" for c in capabilities)
              + f"{max(cell.values()):11.3g}")
    if args.json:
        args.json.write_text(json.dumps(worst, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
