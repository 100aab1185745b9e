"""The study at scale: prompts sampled in batches, torchrun's processes filling one run directory, sweeps of step
counts and schedulers, --preset paper, and the faults a long run meets (a second run on its directory, a killed
rank, a file-size limit, a resume with other settings). COCO prompts: tests/test_coco.py; kill -9, SIGTERM and
SIGINT of one process, damaged records: tests/test_analysis.py and tests/test_cli.py."""

import csv
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from test_analysis import PROMPTS, run_cli
from test_cli import fails_cleanly, run_analyze

import minidit
from minidit.analysis import SUMS, RunDir
from minidit.analysis.engine import batches, run_prompts
from minidit.analysis.rundir import LOCK
from minidit.errors import MiniditError

FIXTURES = ROOT / "tests" / "fixtures"
# Every recipe on its tiny Hub-layout copy, at a small size: (model, folder, options). None: built by the test.
BATCH_CASES = {
    "dit-tiny": ("dit-tiny", None, {}),
    "pixart": ("pixart-1024", FIXTURES / "pixart" / "PixArt-XL-2-1024-MS", {"height": 256, "width": 256}),
    "sd3": ("sd3", FIXTURES / "sd3_pipeline" / "stable-diffusion-3-medium-diffusers", {"height": 64, "width": 64}),
    "flux-dev": ("flux-dev", FIXTURES / "flux_pipeline" / "FLUX.1-dev", {"height": 64, "width": 64}),
    "flux-tiny": ("flux-tiny", None, {}),
    "latte": ("latte", FIXTURES / "latte" / "Latte-1", {"height": 64, "width": 64}),
    "cogvideox": ("cogvideox-5b", FIXTURES / "cogvideox" / "CogVideoX-5b", {"height": 48, "width": 64, "frames": 9}),
    "mochi": ("mochi", FIXTURES / "mochi_pipeline" / "mochi-1-preview", {"frames": 7, "height": 32, "width": 32}),
    "opensora": ("opensora", None, {"frames": 17, "height": 32, "width": 48}),
}
TEXTS = ["a cat", "a red fox running through fresh snow", "a dog", "rain on a city street at night, neon"]
# A prompt's record from a batch of several against its batch-of-one record: the batch changes how the CPU's matmul
# kernels block the rows, i.e. the float32 rounding of every activation, and the sums of step-to-step differences
# carry it. Measured on this machine over the cases below, relative to each sum's scale (`assert_close_sums`): at most
# 7.3e-6 with AVX2, 6.6e-6 with ATEN_CPU_CAPABILITY=default; several models' batches are exact here.
BATCH_RTOL = 5e-5


def assert_close_sums(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float = BATCH_RTOL) -> None:
    """Every sum within `rtol` of its scale: its own size, and for s_dot, sqrt(s_cur2 s_prev2) (s_dot is
    derived as (s_cur2 + s_prev2 - s_sq) / 2, which cancels when consecutive steps are nearly orthogonal)."""
    cur2, prev2 = (expected[..., SUMS.index(name)] for name in ("s_cur2", "s_prev2"))
    scale = np.abs(expected)
    scale[..., SUMS.index("s_dot")] = np.sqrt(cur2 * prev2)
    error = np.abs(actual - expected) / np.maximum(scale, 1e-30)
    worst = np.unravel_index(np.argmax(error), error.shape)
    assert error[worst] <= rtol, f"{what}: at {worst}, {actual[worst]} != {expected[worst]}"


def load(case: str, tmp_path: Path):
    name, folder, options = BATCH_CASES[case]
    if case == "opensora":
        from test_opensora_pipeline import assembled_folder

        folder = assembled_folder(tmp_path / "opensora")
    return minidit.load_backbone(name, weights_dir=folder, **options)


def records(run: RunDir) -> dict[int, tuple[np.ndarray, int]]:
    """prompt -> (its sums, the size of the batch it ran in)."""
    shape = run.record_shape()
    return {i: (lambda sums, meta: (sums, meta["batch_size"]))(*run.load_record(i, shape)) for i in sorted(run.done())}


def fill(recipe, prompts: list[str], out: Path, batch_size: int) -> RunDir:
    """A run directory filled by run_prompts (as analyze.py does, without the aggregation)."""
    from minidit.analysis.engine import build_manifest
    from minidit.pipelines import model_spec

    steps = 3
    scheduler = recipe.make_scheduler(recipe.default_scheduler, steps)
    guidance = max(recipe.default_guidance, 2.0)  # both branches, also for flux-tiny (true CFG)
    manifest = build_manifest(recipe, model_spec("dit-tiny"), weights="w", revision=None, dtype="fp32", device="cpu",
                              scheduler=scheduler, guidance=guidance, seed=3, prompt_source="test",
                              n_prompts=len(prompts), prev_on_host=False)
    run = RunDir(out)
    run.open(manifest, prompts, resume=False)
    run_prompts(recipe, prompts, run, scheduler=scheduler, guidance=guidance, seed=3, batch_size=batch_size,
                progress=False)
    run.release()
    return run


@pytest.mark.any_cpu
@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_a_batch_of_prompts_records_what_batches_of_one_do(case, tmp_path):
    """--batch-size: every model samples several prompts in one batch, [branch: prompts] (each prompt from the
    noise of the seed), and each prompt's record equals its batch-of-one record within BATCH_RTOL. Latte batches
    only prompts of one text length (its batch_key); the others any prompts."""
    recipe = load(case, tmp_path)
    prompts = recipe.default_prompts()[:4] if case in ("dit-tiny", "flux-tiny") else TEXTS
    if case == "pixart":  # its tiny copy's buckets are 1024 px (4096 tokens): two prompts, one batch of both
        prompts = TEXTS[:2]
    recipe.prepare(prompts)
    one = records(fill(recipe, prompts, tmp_path / "one", 1))
    batched = records(fill(recipe, prompts, tmp_path / "batched", 3))
    assert sorted(one) == sorted(batched) == list(range(len(prompts)))
    # 3 prompts per batch; Latte's "a cat" and "a dog" share a text length, the other two differ
    expected = {"latte": [2, 1, 2, 1], "pixart": [2, 2]}.get(case, [3, 3, 3, 1])
    assert [batched[i][1] for i in batched] == expected
    for i in one:
        assert batched[i][0].shape == one[i][0].shape
        assert_close_sums(batched[i][0], one[i][0], f"prompt {i}")
    assert not np.array_equal(one[0][0], one[1][0])  # prompts differ: a batch that mixed them up would be caught


def test_batches_keep_the_order_and_share_a_key():
    assert batches(list(range(7)), 3, key=lambda i: None) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches(list(range(7)), 1, key=lambda i: None) == [[i] for i in range(7)]
    # by parity: full batches as they fill, then the unfilled ones in the order they were opened
    assert batches([0, 1, 2, 3, 4, 5, 6], 3, key=lambda i: i % 2) == [[0, 2, 4], [1, 3, 5], [6]]
    assert batches([1, 0, 3], 2, key=lambda i: i % 2) == [[1, 3], [0]]


def test_latte_batches_prompts_by_text_length(tmp_path):
    recipe = load("latte", tmp_path)
    recipe.prepare(TEXTS)
    keys = [recipe.batch_key(p) for p in TEXTS]
    assert len(set(keys)) > 1 and keys[0] == len(recipe.tokenizer([TEXTS[0]], 120)[1].nonzero())


# ---- torchrun: several processes, one run directory --------------------------------------------------------------

def torchrun(*args: str, procs: int = 2) -> subprocess.Popen:
    """analyze.py under torchrun on this machine's CPUs (gloo), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={procs}", str(ROOT / "analyze.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """dit-tiny's 9 prompts x 12 steps in one process: the run the others must equal."""
    tmp = tmp_path_factory.mktemp("study")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 3) + "\n")
    common = ["--model", "dit-tiny", "--prompts", str(prompts), "--steps", "12", "--device", "cpu"]
    whole = tmp / "whole"
    done = subprocess.run([sys.executable, str(ROOT / "analyze.py"), *common, "--out", str(whole)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return common, whole


@pytest.mark.any_cpu
def test_two_torchrun_processes_equal_one_process(study, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): each rank samples every other prompt into the shared directory and rank 0
    aggregates: summary.csv and cv.csv byte for byte those of one process."""
    common, whole = study
    out = tmp_path / "two"
    proc = torchrun(*common, "--out", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "in 2 processes" in err and err.count("done: 9 prompts") == 1  # rank 0 alone reports
    for name in ("summary.csv", "cv.csv"):
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    assert RunDir(out).manifest()["n_prompts_done"] == 9


def workers(torchrun_pid: int) -> list[int]:
    """The processes torchrun started (its ranks, each in a session of its own)."""
    found = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def environment(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")


@pytest.mark.any_cpu
def test_a_killed_rank_leaves_the_others_records_and_resume_under_torchrun_finishes(study, tmp_path):
    """kill -9 of rank 1 mid-run: torchrun stops rank 0 (SIGTERM), the records written stay whole (no temporary
    file), and --resume under torchrun samples only the missing prompts: summary.csv equals the uninterrupted run's."""
    common, whole = study
    out = tmp_path / "killed"
    proc = torchrun(*common, "--out", str(out))
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "records").glob("[0-9]*.npz"))) < 2:
        time.sleep(0.02)
    rank1 = next(pid for pid in workers(proc.pid) if "RANK=1" in environment(pid))
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = len(list((out / "records").glob("[0-9]*.npz")))
    assert 2 <= done < 9 and not list((out / "records").glob(".tmp-*")), err
    assert not (out / "summary.csv").exists()

    proc = torchrun(*common, "--out", str(out), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"{done} of 9 prompts already done" in err
    assert (out / "summary.csv").read_bytes() == (whole / "summary.csv").read_bytes()


@pytest.mark.any_cpu
@pytest.mark.parametrize("moment", ["aggregating"])
def test_kill_9_at_other_moments_then_resume(study, tmp_path, moment):
    """kill -9 once the run directory is opened (no record yet) and once every record is written (aggregation and
    figures under way; tests/test_analysis.py kills mid-run): --resume then gives the uninterrupted run's
    summary.csv byte for byte."""
    common, whole = study
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "analyze.py"), *common, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ,
                                                                                       "OMP_NUM_THREADS": "1"})
    reached = {"opened": lambda: (out / "manifest.json").exists(),
               "aggregating": lambda: len(list((out / "records").glob("[0-9]*.npz"))) == 9}[moment]
    deadline = time.time() + 120
    while time.time() < deadline and not reached():
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert not (out / "summary.csv").exists() or moment == "aggregating"
    resumed = run_cli(*common, "--out", str(out), "--resume", env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "summary.csv").read_bytes() == (whole / "summary.csv").read_bytes()
    assert (out / "cv.csv").read_bytes() == (whole / "cv.csv").read_bytes()


# ---- the run lock -------------------------------------------------------------------------------------------------

@pytest.mark.any_cpu
def test_a_second_run_on_a_held_directory_is_refused_and_a_killed_run_leaves_no_lock(study, tmp_path):
    common, whole = study
    out = tmp_path / "held"
    first = subprocess.Popen([sys.executable, str(ROOT / "analyze.py"), *common, "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "records" / "000000.npz").exists():
        time.sleep(0.02)
    second = run_cli(*common, "--out", str(out), "--resume")
    refused = (f"error: {out} is in use by another run (process {first.pid} on {os.uname().nodename}): wait for it "
               f"to end, or choose another --out")
    assert second.returncode == 2 and second.stderr.strip() == refused
    ranks = torchrun(*common, "--out", str(out), "--resume")  # rank 0 says why before torchrun's own report
    _, err = ranks.communicate(timeout=120)
    assert ranks.returncode != 0 and err.splitlines()[0] == refused, err
    first.kill()  # kill -9: the OS releases the lock with the process
    first.wait()
    again = RunDir(out)
    again.hold()  # free at once (resuming after a kill is tested above and in test_analysis.py)
    again.release()
    assert (out / "manifest.json").exists() and (out / LOCK).exists()  # a started run keeps its directory


def test_the_lock_is_per_run_and_released(tmp_path):
    run, again = RunDir(tmp_path / "r"), RunDir(tmp_path / "r")
    run.hold()
    with pytest.raises(MiniditError, match=f"in use by another run \\(process {os.getpid()} on"):
        again.hold()  # a second holder, even in this process
    run.release()
    again.hold()
    again.release()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(MiniditError, match="is not a minidit run directory"):
        RunDir(tmp_path / "mine").hold()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # no lock file left in a user's folder


# ---- a file-size limit, resumes with other settings --------------------------------------------------------------

@pytest.mark.any_cpu
def test_a_file_size_limit_stops_the_run_cleanly(study, tmp_path):
    """ulimit -f (RLIMIT_FSIZE) below a record's size, as a disk that fills: one line naming the record and the
    OS's reason, exit 2, no record and no temporary file; --resume without the limit then completes the run."""
    common, whole = study
    out = tmp_path / "limited"
    limit = 8192  # bytes: the manifest (about 5 kB) fits, a record (about 20 kB) does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, str(ROOT / "analyze.py"), *common, "--out", str(out)], capture_output=True,
                          text=True, timeout=300, preexec_fn=limited)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines[-1] == f"error: cannot write {out / 'records' / '000000.npz'}: {os.strerror(27)}"  # EFBIG
    assert list((out / "records").iterdir()) == []
    resumed = run_cli(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "summary.csv").read_bytes() == (whole / "summary.csv").read_bytes()


@pytest.mark.any_cpu
def test_resume_names_every_setting_that_differs(capsys, tmp_path):
    """--resume with other settings than the manifest's is refused, naming the fields; other prompts in a file of the
    same name count (the manifest keeps the prompts' digest)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 3) + "\n")
    out = tmp_path / "run"
    base = ["--model", "dit-tiny", "--prompts", prompts, "--steps", "3", "--device", "cpu", "--out", out]
    assert run_analyze(base[2:]) == 0
    capsys.readouterr()
    prompts.write_text("\n".join(reversed(PROMPTS * 3)) + "\n")
    fails_cleanly(capsys, [*base[2:], "--resume"], "different prompts_sha256", out)
    prompts.write_text("\n".join(PROMPTS * 3) + "\n")
    line = fails_cleanly(capsys, [*base[2:], "--resume", "--seed", "1", "--guidance", "2", "--dtype", "bf16"],
                         "it was run with different", out)
    assert "dtype, guidance, seed" in line


# ---- sweeps --------------------------------------------------------------------------------------------------------

@pytest.mark.any_cpu
def test_a_sweep_runs_every_combination_and_compares_them(capsys, tmp_path):
    """--steps 3,5 --scheduler flux,sd3: four runs under the parent directory, each what its own command makes, and
    their comparison (compare.csv against the first, the overlays)."""
    out = tmp_path / "sweep"
    argv = ["--model", "flux-tiny", "--num-prompts", "1", "--device", "cpu"]
    assert analyze_main([*argv, "--steps", "3,5", "--scheduler", "flux,sd3", "--out", out]) == 0
    names = ["flux-3steps", "flux-5steps", "sd3-3steps", "sd3-5steps"]  # schedulers outer, as in the parent's name
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    alone = tmp_path / "alone"  # one of them, as its own command
    assert analyze_main([*argv, "--steps", "5", "--scheduler", "sd3", "--out", alone]) == 0
    assert (out / "sd3-5steps" / "summary.csv").read_bytes() == (alone / "summary.csv").read_bytes()
    assert [RunDir(out / name).manifest()["steps"] for name in names] == [3, 5, 3, 5]
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == set(names[1:]) and {r["reference"] for r in rows} == {names[0]}
    assert (out / "compare_l1.png").stat().st_size > 10_000
    err = capsys.readouterr().err
    assert "sweep 4 of 4: sd3, 5 steps" in err


def analyze_main(argv) -> int:
    import analyze

    return analyze.main([str(a) for a in argv])


def test_sweep_flags_are_checked_before_loading(capsys, tmp_path):
    for argv, match in [(["--steps", "3,3"], "give each value once"), (["--steps", "3,x"], "invalid int value"),
                        (["--scheduler", "flux,"], "give each value once")]:
        with pytest.raises(SystemExit):
            analyze_main(["--model", "flux-tiny", *argv])
        assert match in capsys.readouterr().err
    assert analyze_main(["--model", "flux-tiny", "--steps", "3,1", "--out", tmp_path / "s"]) == 2
    assert "--steps must be at least 2" in capsys.readouterr().err
    assert analyze_main(["--model", "flux-tiny", "--scheduler", "flux,ddim", "--out", tmp_path / "s"]) == 2
    assert "no scheduler 'ddim'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---- --preset paper ------------------------------------------------------------------------------------------------

def test_preset_paper_fills_the_flags_not_given():
    import analyze

    args = analyze.parse_args(["--model", "mochi", "--preset", "paper", "--prompts", "p.txt", "--steps", "8"])
    analyze.apply_preset(args)
    assert (args.steps, args.scheduler, args.guidance, args.seed) == ([8], ["mochi"], 4.5, [42])  # --steps given wins
    assert (args.frames, args.height, args.width, args.dtype, args.num_prompts) == (49, 480, 848, "bf16", 100)
    args = analyze.parse_args(["--model", "pixart", "--preset", "paper"])
    with pytest.raises(MiniditError, match="runs 1000 prompts: pass them with --prompts FILE"):
        analyze.apply_preset(args)
    with pytest.raises(MiniditError, match="has no settings for dit-tiny"):
        analyze.apply_preset(analyze.parse_args(["--model", "dit-tiny", "--preset", "paper"]))
    with pytest.raises(MiniditError, match="unknown preset 'fast'"):
        analyze.apply_preset(analyze.parse_args(["--preset", "fast"]))


def test_preset_error_is_one_line(capsys):
    assert analyze_main(["--model", "sd3", "--preset", "paper"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --preset paper runs 1000 prompts")


def test_the_missing_prompts_and_a_share_of_them(tmp_path, capsys):
    """missing_prompts lists what a resumed run still needs (rank 0 lists it for every rank under torchrun), and
    run_prompts samples the share it is given (rank r of K: every K-th from the r-th)."""
    from minidit.analysis.engine import build_manifest, missing_prompts
    from minidit.pipelines import model_spec

    recipe = minidit.load_backbone("dit-tiny")
    prompts = recipe.default_prompts()[:4] * 2
    out = RunDir(tmp_path / "shared")
    scheduler = recipe.make_scheduler("ddim", 3)
    manifest = build_manifest(recipe, model_spec("dit-tiny"), weights="w", revision=None, dtype="fp32",
                              device="cpu", scheduler=scheduler, guidance=4.0, seed=0, prompt_source="test",
                              n_prompts=len(prompts), prev_on_host=False)
    out.open(manifest, prompts, resume=False)
    assert missing_prompts(out, len(prompts)) == list(range(8))
    done = run_prompts(recipe, prompts, out, scheduler=scheduler, guidance=4.0, seed=0,
                       todo=list(range(8))[1::3], progress=False)
    assert done["done"] == 3 and out.done() == {1, 4, 7}
    assert missing_prompts(out, len(prompts)) == [0, 2, 3, 5, 6]
    assert "resuming: 3 of 8 prompts already done" in capsys.readouterr().err
    out.release()
