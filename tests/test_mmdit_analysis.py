"""The SD3 and FLUX.1 analyses end to end on tiny copies of their repositories' layouts: SD3-medium's 24
joint layers (with summary.csv against a float64 recomputation from every captured tensor), and FLUX.1-dev's
step-count ablation (14, 28, 56 steps) and scheduler ablation (SD3's schedule) with their comparison."""

import csv
import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from conftest import ROOT
from test_analysis import float64_metrics

import minidit
from minidit.attention import recording

FOLDER = ROOT / "tests" / "fixtures" / "flux_pipeline" / "FLUX.1-dev"
SD3_FOLDER = ROOT / "tests" / "fixtures" / "sd3_pipeline" / "stable-diffusion-3-medium-diffusers"
SD3_PROMPTS, SD3_STEPS, SD3_HEIGHT, SD3_WIDTH = 2, 4, 128, 192


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "analyze.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.any_cpu
def test_flux_step_and_scheduler_ablation(tmp_path):
    common = ["--model", "flux", "--weights", str(FOLDER), "--num-prompts", "1", "--height", "128", "--width", "128"]
    runs = {}
    # the study's ablation in miniature (its 56 steps left out for CI's time: a step count is a step count)
    for label, extra in {"14": ["--steps", "14"], "28": [], "14-sd3": ["--steps", "14", "--scheduler", "sd3"]}.items():
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
    result = analyze("--compare", *(str(runs[k]) for k in ("28", "14", "14-sd3")),
                     "--labels", "28 steps", "14 steps", "14 steps, SD3 schedule", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "compare_l1.png").stat().st_size > 10_000 and (out / "compare_rel_l1.png").is_file()
    with (out / "compare.csv").open() as f:
        compared = list(csv.DictReader(f))
    assert {r["run"] for r in compared} >= {"14 steps", "14 steps, SD3 schedule"}


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    """One SD3 analysis run directory (2 prompts, 4 steps, CFG on), shared by the tests below."""
    out = tmp_path_factory.mktemp("sd3") / "run"
    result = analyze("--model", "sd3", "--weights", str(SD3_FOLDER), "--num-prompts", str(SD3_PROMPTS),
                     "--steps", str(SD3_STEPS), "--height", str(SD3_HEIGHT), "--width", str(SD3_WIDTH),
                     "--save-images", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_sd3_analysis(sd3_run):
    """SD3-medium's 24 joint layers, both streams, both CFG branches, on a tiny copy of its repository's layout."""
    out = sd3_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert [layer["kind"] for layer in manifest["layers"]] == ["joint"] * 24
    assert manifest["branches"] == ["uncond", "cond"] and manifest["scheduler"]["config"]["shift"] == 3.0
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["layer"]) for r in rows} == set(range(24))
    streams = {(r["stream"], r["tensor"]) for r in rows if r["layer"] == "23"}
    assert streams == {("img", "K"), ("img", "V"), ("img", "A"), ("txt", "K"), ("txt", "V")}  # no text output
    assert len(list((out / "images").glob("*.png"))) == 2


class CaptureStreams:
    """A recorder that keeps every captured tensor in float64, cut into image and text tokens by counts the test
    knows (and checks that the streams argument the model passes says the same)."""

    def __init__(self, n_img: int, n_txt: int):
        self.n_img, self.n_txt = n_img, n_txt
        self.seen = defaultdict(list)  # (layer, stream, tensor) -> [one tensor per step]

    def capture(self, layer, tensor, x, token_dim, streams):
        if tensor == "F":  # the feed-forward output, recorded only with --ffn (tests/test_ffn.py)
            return
        x = x.detach().double().clone()
        if tensor in ("K", "V"):  # SD3's joint K and V: [image; text] tokens on dim 2 of (B, Nh, L, Dh)
            assert (token_dim, x.shape[2]) == (2, self.n_img + self.n_txt), (layer, tensor, x.shape)
            assert streams == (("img", self.n_img), ("txt", self.n_txt)), (layer, tensor, streams)
            self.seen[(layer, "img", tensor)].append(x[:, :, :self.n_img])
            self.seen[(layer, "txt", tensor)].append(x[:, :, self.n_img:])
        else:  # one A per stream, (B, L, D)
            assert (token_dim, x.shape[1]) == (1, {"img": self.n_img, "txt": self.n_txt}[streams]), (layer, streams)
            self.seen[(layer, streams, tensor)].append(x)


def test_sd3_summary_equals_float64_recomputation(sd3_run):
    """Every row of the SD3 run's summary.csv (per layer, stream, branch, tensor, transition, metric) against the
    statistics recomputed in float64 from every tensor the model hands a recorder in the same sampling."""
    halves = ("uncond", "cond")  # StableDiffusion3Pipeline batches [uncond; cond]: first half uncond, second cond
    transformer = json.loads((SD3_FOLDER / "transformer" / "config.json").read_text())
    vae = json.loads((SD3_FOLDER / "vae" / "config.json").read_text())
    latent_scale = 2 ** (len(vae["block_out_channels"]) - 1) * transformer["patch_size"]  # pixels per token side
    n_img = (SD3_HEIGHT // latent_scale) * (SD3_WIDTH // latent_scale)
    n_txt = 77 + 256  # CLIP-L/bigG tokens, then T5's (the pipeline's default max_sequence_length)
    assert (latent_scale, n_img, n_txt) == (16, 8 * 12, 333)
    cells = transformer["num_layers"] * 6 - 1  # (layer, stream, tensor); the last block has no text output (txt, A)
    assert transformer["num_layers"] == 24

    recipe = minidit.load_backbone("sd3", weights_dir=SD3_FOLDER, height=SD3_HEIGHT, width=SD3_WIDTH)
    expected = defaultdict(list)  # (layer, stream, branch, tensor, d, metric) -> per-prompt values
    for prompt in recipe.default_prompts()[:SD3_PROMPTS]:
        capture = CaptureStreams(n_img, n_txt)
        with recording(capture):
            minidit.sample(recipe, prompt, steps=SD3_STEPS)
        assert len(capture.seen) == cells
        for (layer, stream, tensor), steps in capture.seen.items():
            assert len(steps) == SD3_STEPS and steps[0].shape[0] == len(halves)
            for d in range(1, SD3_STEPS):
                for branch, prev, cur in zip(halves, steps[d - 1].chunk(2), steps[d].chunk(2), strict=True):
                    for metric, value in float64_metrics(prev, cur).items():
                        expected[(layer, stream, branch, tensor, d, metric)].append(value)
                for metric, value in float64_metrics(steps[d - 1], steps[d]).items():  # both halves pooled
                    expected[(layer, stream, "all", tensor, d, metric)].append(value)

    with (sd3_run / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected) == cells * len(("uncond", "cond", "all")) * (SD3_STEPS - 1) * 4  # 4 metrics
    for row in rows:
        values = np.array(expected[(row["layer_name"], row["stream"], row["branch"], row["tensor"],
                                    int(row["transition"]), row["metric"])])
        assert len(values) == SD3_PROMPTS == int(row["n_prompts"]), row
        # float32 sums on the device against float64: relative error ~1e-6 (as in tests/test_analysis.py; measured
        # worst here 5.5e-7, ATEN_CPU_CAPABILITY=default). cos_dist is a difference from 1, so its error is
        # absolute (measured worst 3.0e-8, avx2). Each prompt's value moves by at most rel * value + atol, and so
        # does their std (measured worst 5.5e-7 of the mean, avx512): its tolerance is absolute too, since the two
        # prompts' values can be equal (the unconditional text K and V of block 0 do not depend on the prompt: std 0).
        rel, atol = 2e-5, (2e-6 if row["metric"] == "cos_dist" else 0)
        assert float(row["mean"]) == pytest.approx(values.mean(), rel=rel, abs=atol), row
        assert float(row["std"]) == pytest.approx(values.std(), rel=0, abs=rel * abs(values).max() + atol), row
