"""The analysis engine: metrics against a float64 recomputation, resume after a kill, the guards."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

import minidit
from minidit.analysis import Recorder, derive, read_run
from minidit.attention import recording
from minidit.errors import MiniditError

PROMPTS = ["circle", "square", "triangle"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "analyze.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


class CaptureAll:
    """A recorder that keeps every captured tensor of `kinds`, in float64, for recomputation (F, the feed-forward
    output, only when asked for: a run records it only with --ffn)."""

    def __init__(self, kinds: str = "KVA"):
        self.kinds = kinds
        self.seen = defaultdict(list)  # (layer, tensor) -> [step tensors]

    def capture(self, layer, tensor, x, token_dim, streams):
        if tensor in self.kinds:
            self.seen[(layer, tensor)].append(x.detach().double().clone())


def float64_metrics(prev: torch.Tensor, cur: torch.Tensor) -> dict[str, float]:
    d = cur - prev
    return {"l1": d.abs().mean().item(), "rel_l1": (d.abs().sum() / prev.abs().sum()).item(),
            "mse": (d * d).mean().item(),
            "cos_dist": 1 - ((cur * prev).sum() / (cur.square().sum() * prev.square().sum()).sqrt()).item()}


@pytest.mark.any_cpu
def test_summary_equals_float64_recomputation(tiny_dit, tmp_path):
    out = tmp_path / "run"
    result = run_cli("--model", "dit-tiny", "--weights", str(tiny_dit), "--steps", "6", "--out", str(out),
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr

    recipe = minidit.load_backbone("dit-tiny", weights_dir=tiny_dit)
    assert recipe.default_guidance > 1
    branches = ("cond", "uncond")  # DiTPipeline's batch: the class labels first, then the null class
    expected = defaultdict(list)  # (layer, branch, tensor, d, metric) -> per-prompt values
    for prompt in recipe.default_prompts():
        capture = CaptureAll()
        with recording(capture):
            minidit.sample(recipe, prompt, steps=6)
        for (layer, tensor), steps in capture.seen.items():
            assert len(steps) == 6
            for d in range(1, 6):
                halves = zip(steps[d - 1].chunk(len(branches)), steps[d].chunk(len(branches)))
                for branch, (prev, cur) in zip(branches, halves):
                    for metric, value in float64_metrics(prev, cur).items():
                        expected[(layer, branch, tensor, d, metric)].append(value)
                for metric, value in float64_metrics(steps[d - 1], steps[d]).items():
                    expected[(layer, "all", tensor, d, metric)].append(value)

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == len(expected)
    for row in rows:
        values = np.array(expected[(row["layer_name"], row["branch"], row["tensor"], int(row["transition"]),
                                    row["metric"])])
        mean, std = values.mean(), values.std()
        # float32 sums on the device: relative error ~1e-6; cos_dist is a difference from 1, so absolute.
        atol = 2e-6 if row["metric"] == "cos_dist" else 0
        assert float(row["mean"]) == pytest.approx(mean, rel=2e-5, abs=atol), row
        assert float(row["std"]) == pytest.approx(std, rel=1e-3, abs=atol + 1e-9), row
        assert int(row["n_prompts"]) == len(recipe.default_prompts())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("prev_on_host", [False, True])
@pytest.mark.parametrize("chunk", [2**18, 100])
def test_grouped_and_one_by_one_reduction_agree(tiny_dit, monkeypatch, dtype, prev_on_host, chunk):
    """Small captures are copied into the recorder's own group buffers and reduced at the step's end; large ones are
    reduced on arrival (on the CPU a chunk at a time: 100 elements per branch cuts each of these into several,
    the last one shorter), holding the model's tensors. Both paths give the same sums (float32 rounding apart),
    and neither writes into a tensor the model still owns (the sampled latents stay the same)."""
    from minidit.analysis import recorder

    recipe = minidit.load_backbone("dit-tiny", weights_dir=tiny_dit, dtype=dtype)
    latents, grouped = minidit.sample(recipe, "circle", steps=5, record=True, prev_on_host=prev_on_host)
    monkeypatch.setattr(recorder, "GROUP_BELOW_BYTES", 0)  # every capture is "large"
    monkeypatch.setattr(recorder, "CPU_CHUNK", chunk)
    latents_one, one_by_one = minidit.sample(recipe, "circle", steps=5, record=True, prev_on_host=prev_on_host)
    assert torch.equal(latents, latents_one) and torch.equal(latents, minidit.sample(recipe, "circle", steps=5)[0])
    np.testing.assert_allclose(one_by_one, grouped, rtol=1e-5, atol=1e-6)


def stopped_mid_run(tiny_dit, tmp_path, sig: int) -> tuple[list[str], Path, Path, int, str]:
    """A whole run of 9 prompts x 20 steps, and the same run sent `sig` once its third record exists: (the common
    arguments, the whole run, the stopped run, the stopped process's exit code, its stderr)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 3) + "\n")
    common = ["--model", "dit-tiny", "--weights", str(tiny_dit), "--prompts", str(prompts), "--steps", "20",
              "--device", "cpu"]
    whole = tmp_path / "whole"
    assert run_cli(*common, "--out", str(whole)).returncode == 0
    stopped = tmp_path / "stopped"
    # a shell that starts a job in the background makes it ignore SIGINT (and Python then installs no Ctrl-C
    # handler): give the run the default disposition, as a terminal does
    proc = subprocess.Popen([sys.executable, str(ROOT / "analyze.py"), *common, "--out", str(stopped)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (stopped / "records" / "000002.npz").exists():
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return common, whole, stopped, proc.returncode, err


@pytest.mark.any_cpu
def test_resume_after_kill_gives_identical_statistics(tiny_dit, tmp_path):
    common, whole, killed, _, _ = stopped_mid_run(tiny_dit, tmp_path, signal.SIGKILL)
    # finished records only: a record the kill interrupted is a hidden temporary file (.tmp-*.npz)
    done = len(list((killed / "records").glob("[0-9]*.npz")))
    assert 3 <= done < len(PROMPTS) * 3, "the kill should land in the middle of the run"
    assert not (killed / "summary.csv").exists()

    resumed = run_cli(*common, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of 9 prompts already done" in resumed.stderr
    assert (killed / "summary.csv").read_bytes() == (whole / "summary.csv").read_bytes()
    assert (killed / "cv.csv").read_bytes() == (whole / "cv.csv").read_bytes()


@pytest.mark.any_cpu
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                   (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_sigint_stop_cleanly_and_resume(tiny_dit, tmp_path, sig, code, word):
    """SIGTERM (a job scheduler's stop) and SIGINT (Ctrl-C) mid-run: the prompt in flight is abandoned, no
    temporary file is left, one line says how to resume; --resume then gives the uninterrupted run's summary."""
    common, whole, stopped, returncode, err = stopped_mid_run(tiny_dit, tmp_path, sig)
    assert returncode == code, err
    assert err.strip().splitlines()[-1] == (f"{word}: finished prompts are saved; rerun the same command with "
                                            f"--resume to continue") and "Traceback" not in err
    assert not list(stopped.rglob(".tmp-*"))  # nothing half-written
    done = len(list((stopped / "records").glob("[0-9]*.npz")))
    assert 3 <= done < len(PROMPTS) * 3, "the signal should land in the middle of the run"
    resumed = run_cli(*common, "--out", str(stopped), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (stopped / "summary.csv").read_bytes() == (whole / "summary.csv").read_bytes()


@pytest.mark.any_cpu
def test_cv_is_population_std_over_mean_and_every_prompt_counts(tiny_dit, tmp_path):
    out = tmp_path / "run"
    result = run_cli("--model", "dit-tiny", "--weights", str(tiny_dit), "--steps", "4", "--out", str(out),
                     "--device", "cpu")
    assert result.returncode == 0
    run = read_run(out)
    values = derive(run.sums)["l1"]  # [prompt, ...]
    assert values.shape[0] == 4
    mean, std, cv = run.stats("l1")
    np.testing.assert_allclose(cv, values.std(axis=0, ddof=0) / values.mean(axis=0))
    table = list(csv.DictReader((out / "cv.csv").open()))
    row = next(r for r in table if (r["metric"], r["branch"], r["tensor"]) == ("l1", "all", "A"))
    assert float(row["mean_cv"]) == pytest.approx(np.nanmean(cv[:, :, run.branches.index("all"), 2, :]), rel=1e-9)


def _layers(recipe):
    return recipe.model.attention_layers()


def test_in_place_modification_is_reported(tiny_dit, monkeypatch):
    recipe = minidit.load_backbone("dit-tiny", weights_dir=tiny_dit)
    # A backbone that returns the same input every step makes every captured tensor repeat exactly.
    original = recipe.model.forward
    monkeypatch.setattr(recipe.model, "forward", lambda x, t, y: original(x, torch.zeros_like(t) + 999, y))
    monkeypatch.setattr(minidit.pipelines.dit.DDIM, "step", lambda self, eps, t, x: x)
    with pytest.raises(MiniditError, match="equals step"):
        minidit.sample(recipe, "circle", steps=3, record=True)


def test_non_finite_statistic_names_layer_tensor_and_step(tiny_dit):
    recipe = minidit.load_backbone("dit-tiny", weights_dir=tiny_dit)
    with torch.no_grad():
        recipe.model.transformer_blocks[1].attn1.to_v.bias.fill_(math.inf)
    message = r"non-finite V in layer transformer_blocks\.1\.attn1 \(img, cond\) at step 0"
    with pytest.raises(MiniditError, match=message):
        minidit.sample(recipe, "circle", steps=3, record=True)


@pytest.mark.parametrize("group_below", [2**20, 0], ids=["grouped", "one-by-one"])
def test_attention_calls_must_be_the_same_at_every_step(tiny_dit, monkeypatch, group_below):
    """A layer that stops being recorded after step 0 would leave stale values in the record."""
    from minidit.analysis import recorder

    monkeypatch.setattr(recorder, "GROUP_BELOW_BYTES", group_below)
    recipe = minidit.load_backbone("dit-tiny", weights_dir=tiny_dit)
    attn, calls = recipe.model.transformer_blocks[1].attn1, []

    def unrecord_from_step_2(*_):
        calls.append(None)
        if len(calls) == 3:
            monkeypatch.setattr(attn, "layer", None)  # its K, V and A no longer reach the recorder

    handle = recipe.model.register_forward_pre_hook(unrecord_from_step_2)
    try:
        with pytest.raises(MiniditError, match="step 2 captured 3 tensors, step 0 captured 6: the model's "
                                               "attention calls must be the same at every step"):
            minidit.sample(recipe, "circle", steps=4, record=True)
    finally:
        handle.remove()


@pytest.mark.parametrize("group_below", [2**20, 0], ids=["grouped", "one-by-one"])
def test_a_layer_captured_twice_per_step_is_an_error(tiny_dit, monkeypatch, group_below):
    from minidit.analysis import recorder

    monkeypatch.setattr(recorder, "GROUP_BELOW_BYTES", group_below)
    recipe = minidit.load_backbone("dit-tiny", weights_dir=tiny_dit)
    attn = recipe.model.transformer_blocks[1].attn1
    once = attn.forward
    monkeypatch.setattr(attn, "forward", lambda x: once(once(x)))
    with pytest.raises(MiniditError, match=r"K of layer transformer_blocks\.1\.attn1 \(img\) was captured twice"):
        minidit.sample(recipe, "circle", steps=3, record=True)


def test_recorder_counts_steps_and_needs_two(tiny_dit):
    recipe = minidit.load_backbone("dit-tiny", weights_dir=tiny_dit)
    with pytest.raises(MiniditError, match="at least 2 steps"):
        Recorder(_layers(recipe), branches=("cond",), num_steps=1, device="cpu")
    recorder = Recorder(_layers(recipe), branches=("cond", "uncond"), num_steps=5, device="cpu")
    with recorder.attach(recipe.model):
        minidit.sample(recipe, "circle", steps=3)
    with pytest.raises(MiniditError, match="ran 3 steps, the recorder expected 5"):
        recorder.finish()


# (model, its tiny weights folder, options, prompt, recorded layers, the CPU chunk: a few chunks per capture): an
# image model, and video models whose captures fold frames into the batch (Latte's spatial and temporal layers) or
# join text and video (CogVideoX)
PREV_ON_HOST_CASES = {
    "dit-tiny": ("dit-tiny", None, {}, "square", 2, 100),
    "latte": ("latte", ROOT / "tests" / "fixtures" / "latte" / "Latte-1", {"height": 64, "width": 64}, "a cat", 56,
              1000),
    "cogvideox": ("cogvideox-5b", ROOT / "tests" / "fixtures" / "cogvideox" / "CogVideoX-5b",
                  {"height": 48, "width": 64, "frames": 9}, "a cat", 42, 1000),
}


@pytest.mark.any_cpu
@pytest.mark.parametrize(("case", "dtype"), [("dit-tiny", "fp32"), ("dit-tiny", "bf16"), ("latte", "bf16"),
                                             ("cogvideox", "fp32")])
def test_prev_on_host_gives_the_same_sums(tiny_dit, monkeypatch, dtype, case):
    """--prev-on-host keeps the previous step of every large capture in a host buffer, staged back into two device
    buffers per capture shape one capture ahead (recorder.HostPrevious): the sums are those of the default, which
    holds the model's own tensors, to the bit; the device holds the staging buffers only."""
    from minidit.analysis import recorder

    name, folder, options, prompt, num_layers, chunk = PREV_ON_HOST_CASES[case]
    monkeypatch.setattr(recorder, "GROUP_BELOW_BYTES", 0)  # every capture takes the large-capture path
    monkeypatch.setattr(recorder, "CPU_CHUNK", chunk)  # in several chunks
    model = minidit.load_backbone(name, weights_dir=folder or tiny_dit, dtype=dtype, **options)
    layers, branches = model.attention_layers(), model.branches(model.default_guidance)
    results = {}
    for on_host in (False, True):
        rec = recorder.Recorder(layers, branches=branches, num_steps=4, device="cpu", prev_on_host=on_host)
        with rec.attach(model.model):
            model.generate([prompt], 0, model.make_scheduler("ddim", 4), model.default_guidance)
        results[on_host] = rec.finish()[0], rec.held_bytes, rec.host_bytes
    (on_device, device_held, no_host), (on_host, staging, host) = results[False], results[True]
    np.testing.assert_array_equal(on_device, on_host)
    assert on_device.shape[:5] == (num_layers, len(on_device[0]), 2, 3, 3)  # layer, stream, branch, tensor, step
    assert np.all(on_device[..., 0] > 0)  # every layer, stream, branch, tensor and step was reduced
    assert no_host == 0 and 0 < host < device_held  # the previous steps moved to the host (the work buffers stay)
    assert 0 < staging < device_held  # two staging buffers per capture shape instead of every capture


@pytest.mark.any_cpu
def test_dit_xl_hub_layout_end_to_end(tmp_path):
    """`--model dit-xl-256 --weights DIR` on a tiny copy of the Hub layout (transformer, scheduler, vae)."""
    import shutil

    from conftest import FIXTURES
    from PIL import Image
    from safetensors.numpy import load_file

    folder = shutil.copytree(FIXTURES / "single", tmp_path / "DiT-XL-2-256")
    shutil.copytree(FIXTURES.parent / "vae" / "sd" / "vae", folder / "vae")
    out = tmp_path / "run"
    result = run_cli("--model", "dit-xl-256", "--weights", str(folder), "--steps", "3", "--num-prompts", "2",
                     "--save-images", "--save-latents", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    run = read_run(out)
    assert [layer["name"] for layer in run.layers] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert run.manifest["repo"] == "facebook/DiT-XL-2-256" and run.branches == ("cond", "uncond", "all")
    assert (out / "prompts.txt").read_text().splitlines() == ["207", "360"]  # DiT's sample.py classes
    latents = load_file(out / "latents" / "000001.safetensors")["latents"]
    assert latents.shape == (1, 4, 8, 8)
    assert Image.open(out / "images" / "000001.png").size == (16, 16)  # the tiny VAE upsamples twice
    assert (out / "figures" / "samples.png").is_file()


def test_a_video_is_saved_as_a_gif_and_a_frame_strip(tmp_path):
    """--save-images for a video model: each prompt's frames as an animated GIF, and in the PNG a strip of at most
    8 evenly spaced frames (first and last included) that the samples figure shows, one strip per row."""
    from PIL import Image

    from minidit.analysis.engine import STRIP_FRAMES, save_images_file

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (6, 3), dtype=np.uint8)  # few colours: the GIF's palette holds them exactly
    video = palette[rng.integers(0, 6, (1, 12, 8, 10))]  # (B, T, H, W, 3)
    save_images_file(tmp_path / "000000.png", video)
    gif = Image.open(tmp_path / "000000.gif")
    assert gif.n_frames == 12
    for t in (0, 5, 11):
        gif.seek(t)
        assert np.array_equal(np.asarray(gif.convert("RGB")), video[0, t])
    shown = [0, 2, 3, 5, 6, 8, 9, 11]  # linspace(0, 11, 8), rounded
    assert len(shown) == STRIP_FRAMES
    strip = np.asarray(Image.open(tmp_path / "000000.png"))
    assert np.array_equal(strip, np.concatenate(list(video[0, shown]), axis=1))
    save_images_file(tmp_path / "000001.png", video[:, :3])  # fewer frames than the strip's: all of them
    assert np.array_equal(np.asarray(Image.open(tmp_path / "000001.png")), np.concatenate(list(video[0, :3]), axis=1))


# Tiny video models for the memory rules: Mochi's text stream has its own width (A 1536-like, K and V the attention
# width) and no A in the last block; Open-Sora's frames are folded into the batch
MEMORY_FOLDERS = {"mochi": (ROOT / "tests" / "fixtures" / "mochi_pipeline" / "mochi-1-preview",
                            {"frames": 7, "height": 32, "width": 32}),
                  "opensora": (None, {"frames": 17, "height": 32, "width": 48})}


MEMORY_CASES = [(model, dtype, large, on_host) for model in ("dit-tiny", "flux-tiny") for dtype in ("fp32", "bf16")
                for large in (False, True) for on_host in (False, True)]
MEMORY_CASES += [(model, "fp32", large, on_host) for model in MEMORY_FOLDERS for large in (False, True)
                 for on_host in (False, True)] + [(model, "bf16", False, False) for model in MEMORY_FOLDERS]


def tiny_video_backbone(model: str, dtype: str, tmp_path):
    folder, options = MEMORY_FOLDERS[model]
    if folder is None:
        from test_opensora_pipeline import assembled_folder
        folder = assembled_folder(tmp_path / "opensora")
    return minidit.load_backbone(model, weights_dir=folder, dtype=dtype, **options)


@pytest.mark.parametrize(("model", "dtype", "large", "prev_on_host"), MEMORY_CASES)
def test_memory_rules_equal_what_the_recorder_holds(model, dtype, large, prev_on_host, monkeypatch, tmp_path):
    """minidit.analysis.memory.held_bytes, which computes the README's memory table from the shapes, gives the
    accelerator and host bytes a recorder reports after a real run (small captures grouped, or all large)."""
    from minidit.analysis import memory, recorder

    if large:
        monkeypatch.setattr(recorder, "GROUP_BELOW_BYTES", 0)
        monkeypatch.setattr(recorder, "CPU_CHUNK", 2000)  # flux-tiny: text captures in one chunk, image ones in 9
    r = tiny_video_backbone(model, dtype, tmp_path) if model in MEMORY_FOLDERS else minidit.load_backbone(model,
                                                                                                         dtype=dtype)
    branches = r.branches(r.default_guidance)
    rec = recorder.Recorder(r.attention_layers(), branches=branches, num_steps=3, device="cpu",
                            prev_on_host=prev_on_host)
    with rec.attach(r.model):
        r.generate([r.default_prompts()[0]], 0, r.make_scheduler(r.default_scheduler, 3), r.default_guidance)
    rec.finish()
    captures = [int(n) for n in rec.n.flatten() if n > 0]
    itemsize = 2 if dtype == "bf16" else 4
    assert memory.held_bytes(captures, len(branches), itemsize, prev_on_host, cpu=True) == (rec.held_bytes,
                                                                                           rec.host_bytes)


@pytest.mark.parametrize("model", MEMORY_FOLDERS)
def test_memory_settings_count_the_captures_a_recorder_sees(model, tmp_path):
    """memory.Setting.captures, which the README's table is computed from, lists the capture sizes a recorder sees
    for the same shapes: Mochi's text A at its own width and none in the last block, Open-Sora's folded frames."""
    from minidit.analysis import memory, recorder

    r = tiny_video_backbone(model, "fp32", tmp_path)
    rec = recorder.Recorder(r.attention_layers(), branches=r.branches(r.default_guidance), num_steps=2, device="cpu")
    with rec.attach(r.model):
        r.generate([r.default_prompts()[0]], 0, r.make_scheduler(r.default_scheduler, 2), r.default_guidance)
    rec.finish()
    cfg, fields = r.model.config, r.manifest_fields()
    frames, (height, width) = fields["frames"], fields["resolution"]
    if model == "mochi":
        setting = memory.Setting(model, "tiny", 0, cfg.num_layers, cfg.hidden_size,
                                 {"img": ((frames - 1) // 6 + 1) * (height // 16) * (width // 16),
                                  "txt": r.max_sequence_length}, 2, text_in_last=False,
                                 text_width=cfg.pooled_projection_dim)
    else:
        from minidit.pipelines.opensora import latent_frames
        setting = memory.Setting(model, "tiny", 0, 2 * cfg.depth, cfg.hidden_size,
                                 {"img": latent_frames(frames) * -(-height // 16) * -(-width // 16)}, 2)
    assert sorted(setting.captures()) == sorted(int(n) for n in rec.n.flatten() if n > 0)


def test_the_readme_memory_table_is_the_computed_one():
    from minidit.analysis import memory

    assert memory.table() in (ROOT / "README.md").read_text(encoding="utf-8")
