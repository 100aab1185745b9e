"""analyze.py on bad input: one clear line, exit code 2, no traceback, an existing run directory untouched."""

import contextlib
import errno
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_dit_folder

spec = importlib.util.spec_from_file_location("analyze", ROOT / "analyze.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)


def test_the_suite_imports_this_checkout():
    """Not another copy of minidit that an editable install points to: the tests test the code beside them."""
    import minidit

    assert Path(minidit.__file__).resolve().parents[1] == ROOT


def run_analyze(argv) -> int:
    """analyze.py's main on the tiny DiT of the `tiny_dit` fixture (argv may name another --model, which wins)."""
    return analyze.main(["--model", "dit-tiny", *(str(a) for a in argv)])


@pytest.fixture(scope="module")
def existing_run(tiny_dit, tmp_path_factory):
    out = tmp_path_factory.mktemp("existing") / "run"
    assert run_analyze(["--weights", tiny_dit, "--steps", "3", "--out", out, "--device", "cpu"]) == 0
    return out


def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def fails_cleanly(capsys, argv, match, run=None):
    before = snapshot(run) if run else None
    code = run_analyze(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    assert match in err[0], err[0]
    if run:
        assert snapshot(run) == before, "the existing run directory was modified"
    return err[0]


def test_unknown_model(capsys, existing_run):
    fails_cleanly(capsys, ["--model", "dit-huge", "--out", existing_run], "unknown model 'dit-huge'", existing_run)


def test_unknown_scheduler(capsys, tiny_dit, existing_run):
    fails_cleanly(capsys, ["--weights", tiny_dit, "--scheduler", "euler", "--out", existing_run],
                  "no scheduler 'euler'", existing_run)


@pytest.mark.parametrize("steps", ["1", "0", "-3"])
def test_too_few_steps(capsys, tiny_dit, existing_run, steps):
    fails_cleanly(capsys, ["--weights", tiny_dit, "--steps", steps, "--out", existing_run], "at least 2",
                  existing_run)


def test_prompt_files(capsys, tiny_dit, existing_run, tmp_path):
    fails_cleanly(capsys, ["--weights", tiny_dit, "--prompts", tmp_path / "none.txt", "--out", existing_run],
                  "does not exist", existing_run)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails_cleanly(capsys, ["--weights", tiny_dit, "--prompts", empty, "--out", existing_run], "has no prompts",
                  existing_run)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    fails_cleanly(capsys, ["--weights", tiny_dit, "--prompts", latin1, "--out", existing_run], "is not UTF-8",
                  existing_run)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("circle\nhexagon\n")
    fails_cleanly(capsys, ["--weights", tiny_dit, "--prompts", unknown, "--out", existing_run],
                  "'hexagon' is not a class", existing_run)
    fails_cleanly(capsys, ["--weights", tiny_dit, "--num-prompts", "40", "--out", existing_run],
                  "more prompts than the 4 available", existing_run)


def test_missing_weights_folder(capsys, existing_run, tmp_path):
    fails_cleanly(capsys, ["--weights", tmp_path / "nowhere", "--out", existing_run], "does not exist", existing_run)
    (tmp_path / "empty").mkdir()
    fails_cleanly(capsys, ["--weights", tmp_path / "empty", "--out", existing_run],
                  "transformer/config.json is missing", existing_run)


def test_truncated_safetensors(capsys, tiny_dit, existing_run, tmp_path):
    broken = shutil.copytree(tiny_dit, tmp_path / "broken")
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    line = fails_cleanly(capsys, ["--weights", broken, "--out", existing_run], "is truncated", existing_run)
    assert "download it again" in line


def test_checkpoint_key_mismatch(capsys, existing_run, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_dit_folder(tmp_path / "keys")
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd.pop("proj_out_2.bias")
    sd["extra.weight"] = sd["proj_out_1.bias"].clone()
    sd["pos_embed.proj.bias"] = sd["pos_embed.proj.bias"][:-1].clone()
    save_file(sd, path)
    line = fails_cleanly(capsys, ["--weights", folder, "--out", existing_run], "does not match DiT", existing_run)
    assert "1 missing (e.g. proj_out_2.bias)" in line
    assert "1 unexpected (e.g. extra.weight)" in line
    assert "pos_embed.proj.bias: expected (16,), found (15,)" in line


def test_no_network(capsys, existing_run, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = fails_cleanly(capsys, ["--model", "dit-xl-256", "--out", existing_run], "facebook/DiT-XL-2-256",
                         existing_run)
    assert "--weights DIR" in line


def test_gated_repository_without_token(capsys, existing_run, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        # built without an HTTP response object, whose type differs across huggingface_hub versions
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, "403 Client Error: access to model facebook/DiT-XL-2-256 is restricted")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    line = fails_cleanly(capsys, ["--model", "dit-xl-256", "--out", existing_run], "is gated", existing_run)
    assert "HF_TOKEN" in line


def test_existing_run_needs_resume_and_same_settings(capsys, tiny_dit, existing_run):
    fails_cleanly(capsys, ["--weights", tiny_dit, "--steps", "3", "--out", existing_run], "pass --resume",
                  existing_run)
    fails_cleanly(capsys, ["--weights", tiny_dit, "--steps", "5", "--out", existing_run, "--resume"],
                  "different steps, timesteps", existing_run)


def test_compare_needs_out_and_real_runs(capsys, existing_run, tmp_path):
    fails_cleanly(capsys, ["--compare", existing_run, existing_run], "needs --out")
    fails_cleanly(capsys, ["--compare", existing_run, tmp_path, "--out", tmp_path / "cmp"], "not a minidit run")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["--steps", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


# ---- file-system errors: paths that cannot be read or written -------------------------------------------

NOBODY = 65534  # the conventional uid of `nobody`: owns nothing here
DENIED = os.strerror(errno.EACCES)  # "Permission denied"


@contextlib.contextmanager
def unprivileged():
    """Permission bits do not bind root: as root, run the block as `nobody` (real and effective uid; the saved uid
    stays root's, so the block's end restores it), so that the kernel itself refuses. Other users run it as is."""
    if os.geteuid() != 0:
        yield
        return
    if not hasattr(os, "setresuid"):
        pytest.skip("running as root on a system without setresuid: cannot drop privileges for this test")
    os.setresuid(NOBODY, NOBODY, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)


@pytest.fixture
def shared_tmp():
    """A temporary folder every user may enter (pytest's tmp_path is private to its owner), for `unprivileged`."""
    folder = Path(tempfile.mkdtemp(prefix="minidit-test-"))
    folder.chmod(0o755)
    yield folder
    for p in (folder, *folder.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(folder)


def readable_copy(folder, to):
    copy = shutil.copytree(folder, to)
    copy.chmod(0o755)  # tmp_path_factory's folders are the owner's only
    return copy


def read_only_copy(run, folder):
    """A copy of `run` that only root could change: folders r-x, files r--."""
    copy = shutil.copytree(run, folder)
    for p in sorted(copy.rglob("*"), reverse=True) + [copy]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return copy


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_the_kernel_cannot_create(capsys, tiny_dit, existing_run):
    """/proc takes no new folders, not even from root."""
    out = "/proc/forbidden/run"
    fails_cleanly(capsys, ["--weights", tiny_dit, "--steps", "3", "--out", out], "/proc/forbidden", existing_run)
    fails_cleanly(capsys, ["--weights", tiny_dit, "--steps", "3", "--out", out, "--resume"], "/proc/forbidden",
                  existing_run)
    fails_cleanly(capsys, ["--compare", existing_run, existing_run, "--out", out], "/proc/forbidden", existing_run)


def test_out_is_or_lies_under_a_file(capsys, tiny_dit, existing_run, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("not a folder\n")
    line = fails_cleanly(capsys, ["--weights", tiny_dit, "--out", file], "is a file, not a folder", existing_run)
    assert line == f"error: --out {file} is a file, not a folder; choose another --out"
    line = fails_cleanly(capsys, ["--weights", tiny_dit, "--out", file / "run"], "is a file", existing_run)
    assert line == (f"error: --out {file / 'run'} cannot be created: {file} is a file, not a folder; "
                    f"choose another --out")
    fails_cleanly(capsys, ["--compare", existing_run, existing_run, "--out", file], "is a file", existing_run)
    assert file.read_text() == "not a folder\n"


def test_out_under_a_read_only_folder(capsys, tiny_dit, existing_run, shared_tmp):
    weights = readable_copy(tiny_dit, shared_tmp / "weights")
    run = readable_copy(existing_run, shared_tmp / "run")
    read_only = shared_tmp / "read-only"
    read_only.mkdir(mode=0o555)
    with unprivileged():
        line = fails_cleanly(capsys, ["--weights", weights, "--out", read_only / "run"], "is not writable", run)
        fails_cleanly(capsys, ["--compare", run, run, "--out", read_only / "cmp"], "is not writable", run)
    assert line == (f"error: --out {read_only / 'run'} cannot be created: {read_only} is not writable "
                    f"({DENIED}); choose another --out")
    assert list(read_only.iterdir()) == []


def test_read_only_run(capsys, tiny_dit, existing_run, shared_tmp):
    """A run directory this user may read but not write: --resume stops before loading weights, --aggregate at
    its first write; neither changes a file."""
    weights = readable_copy(tiny_dit, shared_tmp / "weights")
    run = read_only_copy(existing_run, shared_tmp / "run")
    with unprivileged():
        fails_cleanly(capsys, ["--weights", weights, "--steps", "3", "--out", run, "--resume"],
                      f"--out {run} is not writable", run)
        line = fails_cleanly(capsys, ["--aggregate", run], "cannot write", run)
    assert line == f"error: cannot write {run / 'summary.csv'}: {DENIED}"


def test_prompts_not_a_readable_file(capsys, tiny_dit, existing_run, tmp_path, shared_tmp):
    fails_cleanly(capsys, ["--weights", tiny_dit, "--prompts", tmp_path, "--out", existing_run], "is a folder",
                  existing_run)
    weights = readable_copy(tiny_dit, shared_tmp / "weights")
    secret = shared_tmp / "prompts.txt"
    secret.write_text("circle\n")
    secret.chmod(0o000)
    with unprivileged():
        line = fails_cleanly(capsys, ["--weights", weights, "--prompts", secret, "--out", shared_tmp / "run"],
                             "cannot read prompt file")
    assert line == f"error: cannot read prompt file {secret}: {DENIED}"


def test_weights_not_a_model_folder(capsys, tiny_dit, existing_run, tmp_path):
    file = tiny_dit / "model_index.json"
    fails_cleanly(capsys, ["--weights", file, "--out", existing_run], f"--weights {file} is a file", existing_run)
    no_weights = shutil.copytree(tiny_dit, tmp_path / "no-weights")
    (no_weights / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    fails_cleanly(capsys, ["--weights", no_weights, "--out", existing_run], "transformer holds no weights",
                  existing_run)


def test_unreadable_weights(capsys, tiny_dit, shared_tmp):
    weights = readable_copy(tiny_dit, shared_tmp / "weights")
    (weights / "transformer" / "diffusion_pytorch_model.safetensors").chmod(0o000)
    writable = shared_tmp / "out"
    writable.mkdir(mode=0o777)
    writable.chmod(0o777)  # whatever the umask
    with unprivileged():
        line = fails_cleanly(capsys, ["--weights", weights, "--out", writable / "run"], DENIED)
    assert line == f"error: {weights / 'transformer' / 'diffusion_pytorch_model.safetensors'}: {DENIED}"


def test_aggregate_and_compare_need_runs(capsys, existing_run, tmp_path):
    fails_cleanly(capsys, ["--aggregate", tmp_path / "nowhere"], "not a minidit run directory")
    fails_cleanly(capsys, ["--aggregate", existing_run / "manifest.json"], "not a minidit run directory",
                  existing_run)
    damaged = shutil.copytree(existing_run, tmp_path / "damaged")
    (damaged / "manifest.json").write_text('{"model": "dit-tiny", ')
    fails_cleanly(capsys, ["--aggregate", damaged], "manifest.json is damaged", damaged)
    fails_cleanly(capsys, ["--compare", existing_run, damaged, "--out", tmp_path / "cmp"], "is damaged", damaged)
    assert not (tmp_path / "cmp").exists()


def test_resume_needs_a_run_or_a_new_folder(capsys, tiny_dit, existing_run, tmp_path):
    """--resume on a folder that does not exist starts the run (`make analyze` always passes it); on a folder that
    holds something else it stops."""
    assert run_analyze(["--weights", tiny_dit, "--steps", "3", "--out", tmp_path / "new", "--resume"]) == 0
    assert (tmp_path / "new" / "summary.csv").is_file()
    capsys.readouterr()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    fails_cleanly(capsys, ["--weights", tiny_dit, "--out", tmp_path / "other", "--resume"],
                  "exists and is not a minidit run directory", tmp_path / "other")


def test_disk_full_mid_run_leaves_no_partial_record(capsys, tiny_dit, tmp_path, monkeypatch):
    """The first record's write fails after some bytes, as on a full disk: one error line after the run's start
    line, no record and no temporary file left; --resume then completes the run."""
    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", disk_full)
    out = tmp_path / "run"
    argv = ["--weights", tiny_dit, "--steps", "3", "--out", out, "--device", "cpu"]
    code = run_analyze(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2 and err[0].startswith("dit-tiny: 4 prompts"), err
    assert err[1] == f"error: cannot write {out / 'records' / '000000.npz'}: No space left on device"
    assert list((out / "records").iterdir()) == []
    monkeypatch.undo()
    assert run_analyze(argv + ["--resume"]) == 0
    assert sorted(p.name for p in (out / "records").iterdir()) == [f"{i:06d}.npz" for i in range(4)]


def test_missing_weights_folder_of_an_embedded_model(capsys, existing_run, tmp_path):
    """An embedded model has no Hub repository to name: the line points at its own folder as the example."""
    line = fails_cleanly(capsys, ["--model", "flux-tiny", "--weights", tmp_path / "none", "--out", existing_run],
                         "does not exist", existing_run)
    assert "None" not in line and "weights/flux-tiny" in line


@pytest.mark.parametrize("damage", ["truncated", "wrong-shape", "nan"])
def test_a_damaged_record_is_named_then_recomputed_on_resume(capsys, tiny_dit, existing_run, tmp_path, damage):
    """A record damaged on disk (cut short, sums of another shape, NaN in the sums): aggregation refuses it with one
    line naming it; --resume says which one it recomputes, and the run's summary.csv is again byte for byte the
    undamaged run's."""
    run = shutil.copytree(existing_run, tmp_path / "run")
    summary = (run / "summary.csv").read_bytes()
    record = run / "records" / "000001.npz"
    if damage == "truncated":
        record.write_bytes(record.read_bytes()[:200])
    else:
        with np.load(record) as r:
            sums, meta = r["sums"], r["meta"]
        sums = sums[:, :, :, :, :1] if damage == "wrong-shape" else np.where(sums == sums.max(), np.nan, sums)
        with record.open("wb") as f:
            np.savez(f, sums=sums, meta=meta)
    why = {"truncated": "unreadable", "nan": "non-finite sums",
           "wrong-shape": "sums of shape (2, 1, 2, 3, 1, 7), not this run's (2, 1, 2, 3, 2, 7)"}[damage]
    code = analyze.main(["--aggregate", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert f"record {record} is damaged: {why}" in err[0] and "--resume" in err[0]

    assert run_analyze(["--weights", tiny_dit, "--steps", "3", "--out", run, "--device", "cpu", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"record {record} is damaged ({why}" in err and "recomputing prompt 1" in err
    assert (run / "summary.csv").read_bytes() == summary
