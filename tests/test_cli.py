"""analyze.py on bad input: one clear line, exit code 2, no traceback, an existing run directory untouched."""

import hashlib
import importlib.util
import shutil

import pytest
from conftest import ROOT, write_dit_folder

spec = importlib.util.spec_from_file_location("analyze", ROOT / "analyze.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)


@pytest.fixture(scope="module")
def existing_run(tiny_dit, tmp_path_factory):
    out = tmp_path_factory.mktemp("existing") / "run"
    assert analyze.main(["--weights", str(tiny_dit), "--steps", "3", "--out", str(out), "--device", "cpu"]) == 0
    return out


def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def fails_cleanly(capsys, argv, match, run=None):
    before = snapshot(run) if run else None
    code = analyze.main([str(a) for a in argv])
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
