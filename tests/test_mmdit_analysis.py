"""The SD3 and FLUX.1 analyses end to end on tiny copies of their repositories' layouts: SD3-medium's 24
joint layers, and FLUX.1-dev's step-count ablation (14, 28, 56 steps) and scheduler ablation (SD3's schedule)
with their comparison."""

import csv
import json
import subprocess
import sys

from conftest import ROOT

FOLDER = ROOT / "tests" / "fixtures" / "flux_pipeline" / "FLUX.1-dev"


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "analyze.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_flux_step_and_scheduler_ablation(tmp_path):
    common = ["--model", "flux", "--weights", str(FOLDER), "--num-prompts", "1", "--height", "128", "--width", "128"]
    runs = {}
    for label, extra in {"14": ["--steps", "14"], "28": [], "56": ["--steps", "56"],
                         "14-sd3": ["--steps", "14", "--scheduler", "sd3"]}.items():
        out = tmp_path / label
        result = analyze(*common, *extra, "--out", str(out), *(["--save-images"] if label == "28" else []))
        assert result.returncode == 0, result.stderr
        runs[label] = out

    manifest = json.loads((runs["28"] / "manifest.json").read_text())
    assert manifest["steps"] == 28 and manifest["branches"] == ["cond"] and manifest["streams"] == ["img", "txt"]
    assert len(manifest["layers"]) == 57
    assert [layer["a_point"] for layer in manifest["layers"]] == ["post_proj"] * 19 + ["pre_proj"] * 38
    assert json.loads((runs["14-sd3"] / "manifest.json").read_text())["scheduler"]["config"]["shift"] == 3.0
    with (runs["28"] / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["layer"]) for r in rows} == set(range(57))
    assert {(r["stream"], r["tensor"]) for r in rows} == {(s, t) for s in ("img", "txt") for t in "KVA"}
    assert len(list((runs["28"] / "images").glob("*.png"))) == 1

    out = tmp_path / "compare"
    result = analyze("--compare", *(str(runs[k]) for k in ("28", "14", "56", "14-sd3")),
                     "--labels", "28 steps", "14 steps", "56 steps", "14 steps, SD3 schedule", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "compare_l1.png").stat().st_size > 10_000 and (out / "compare_rel_l1.png").is_file()
    with (out / "compare.csv").open() as f:
        compared = list(csv.DictReader(f))
    assert {r["run"] for r in compared} >= {"14 steps", "56 steps", "14 steps, SD3 schedule"}


def test_sd3_analysis(tmp_path):
    """SD3-medium's 24 joint layers, both streams, both CFG branches, on a tiny copy of its repository's layout."""
    folder = ROOT / "tests" / "fixtures" / "sd3_pipeline" / "stable-diffusion-3-medium-diffusers"
    out = tmp_path / "sd3"
    result = analyze("--model", "sd3", "--weights", str(folder), "--num-prompts", "2", "--steps", "4",
                     "--height", "128", "--width", "192", "--save-images", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [layer["kind"] for layer in manifest["layers"]] == ["joint"] * 24
    assert manifest["branches"] == ["uncond", "cond"] and manifest["scheduler"]["config"]["shift"] == 3.0
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["layer"]) for r in rows} == set(range(24))
    streams = {(r["stream"], r["tensor"]) for r in rows if r["layer"] == "23"}
    assert streams == {("img", "K"), ("img", "V"), ("img", "A"), ("txt", "K"), ("txt", "V")}  # no text output
    assert len(list((out / "images").glob("*.png"))) == 2
