"""tests/gpu_bench.py reduced, on the CPU: the GPU bench's code runs for its three models and prints every line, and
what it reports that does not depend on the clock is right. Timings are printed, never asserted."""

import sys
import warnings

import gpu_bench
import pytest
import torch
from conftest import installed

from minidit.analysis import memory

FLOAT32 = 4  # bytes: the CPU runs in float32


def expected_kva_bytes(name: str) -> int:
    """One step's K, V and A of the reduced models, written out from their configs."""
    bench = gpu_bench.BENCHES[name](reduced=True)
    cfg, batch = bench.cfg, len(bench.branches)
    if name == "pixart":  # self-attention only: K, V and A over the image tokens, all D wide
        tokens = (cfg.sample_size // cfg.patch_size) ** 2
        return cfg.num_layers * 3 * batch * tokens * cfg.hidden_size * FLOAT32
    if name == "flux":  # every layer's K, V and A over [text; image], D wide (single blocks: A before proj_out)
        tokens = (bench.side // 2) ** 2 + bench.text_tokens
        return (cfg.num_layers + cfg.num_single_layers) * 3 * batch * tokens * cfg.hidden_size * FLOAT32
    # Mochi: K and V over [video; text] at the inner width; A of the video at D and of the text at the text stream's
    # width, except in the last block, which has no text output
    tokens = bench.frames * (bench.height // 2) * (bench.width // 2)
    per_layer = (2 * (tokens + bench.text_tokens) + tokens) * cfg.hidden_size
    text_a = (cfg.num_layers - 1) * bench.text_tokens * cfg.pooled_projection_dim
    return batch * (cfg.num_layers * per_layer + text_a) * FLOAT32


@pytest.mark.any_cpu  # the bench's code run end to end: its own numbers, no stored fixture
def test_reduced_bench_on_the_cpu(capsys, monkeypatch):
    """All three models, every line; the K/V/A bytes against the shapes, the recorder's held bytes against them and
    against memory.py; minidit's forward against diffusers' on the very same weight tensors."""
    if not installed("diffusers"):  # hidden (MINIDIT_LIVE=0) or absent: the bench must say so
        monkeypatch.setitem(sys.modules, "diffusers", None)
    results = gpu_bench.main(["--device", "cpu", "--reduced", "--steps", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert list(results) == ["pixart", "flux", "mochi"]
    for name, r in results.items():
        assert "\n".join(r.lines) in out and r.lines[0].startswith(r.title)
        assert [line.split(":")[0] for line in r.lines[1:]] == [
            "  recorder overhead", "  peak memory", "  host syncs per step", "  forward vs diffusers"]
        assert r.lines[2].startswith("  peak memory: n/a (CUDA only); one step's K/V/A ")
        assert r.lines[3] == "  host syncs per step: n/a (CUDA only)"
        assert all(t > 0 for t in r.times.values())

        assert r.kva_bytes == expected_kva_bytes(name)
        recorded, on_host = r.runs["recorded"], r.runs["prev-on-host"]
        # the recorder holds every capture of the previous step, plus float32 work space (or, for small captures,
        # two float32 buffers instead): never less than the step itself; memory.py's rules give it exactly
        assert recorded.held_bytes >= r.kva_bytes
        assert (recorded.held_bytes, recorded.host_bytes) == r.predicted
        assert (on_host.held_bytes, on_host.host_bytes) == r.predicted_on_host

        if installed("diffusers"):
            _, _, err = r.diffusers
            # measured here: 0 (PixArt, FLUX) and 5e-7 (Mochi); diffusers' timestep 1% of the schedule off gives 1e-2
            # to 5e-2, a weight or an input wired differently more
            assert err < 1e-4, f"{name}: minidit and diffusers differ by {err:.1e} on the same weights"
        else:
            assert r.lines[4] == "  forward vs diffusers: diffusers not installed"
    # PixArt's reduced captures are large (1.2 MB): with prev_on_host all of the previous step goes to the host
    assert results["pixart"].runs["prev-on-host"].host_bytes == results["pixart"].kva_bytes


@pytest.mark.any_cpu
def test_fullsize_on_meta():
    """At full size the backbones are built on the meta device only, with the official parameter counts
    (checkpoints.md §12.1), and their K/V/A shapes are memory.py's for the model at its default size."""
    expected = {"pixart": (611_349_152, "pixart-1024"), "flux": (11_901_408_320, "flux-dev"),
                "mochi": (10_027_677_744, "mochi")}
    for name, (count, setting_name) in expected.items():
        bench = gpu_bench.BENCHES[name](reduced=False)
        model = gpu_bench.build(bench, "meta", torch.bfloat16)
        assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == count
        default = next(s for s in memory.SETTINGS if s.model == setting_name)  # the first one: the default size
        assert bench.setting(count).captures() == default.captures()
        assert len(bench.branches) == default.branches


@pytest.mark.any_cpu
def test_the_video_model_is_the_largest_that_fits():
    """Mochi-1 has the most parameters of the video models, and at its default length its bf16 weights and previous
    K, V and A fit in 80 GB; in 30 GB neither it (31.9 GB before activations) nor CogVideoX-5b (39.1) would."""
    assert gpu_bench.video_choice() == "mochi"
    assert gpu_bench.video_choice(budget=30e9) == "cogvideox-2b"


@pytest.mark.any_cpu
def test_sync_count(monkeypatch):
    """The CUDA-only sync count, on the CPU: PyTorch's debug mode is switched to "warn" for the steps and back, and
    each warning it would give (one per step here, from a hook standing in for a device read) counts."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    bench = gpu_bench.MochiBench(reduced=True)
    model = gpu_bench.build(bench, "cpu")
    model.register_forward_pre_hook(lambda *_: warnings.warn("called a synchronizing CUDA operation"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *bench.latent_shape(), generator=g)
    cond = bench.conditioning(g, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for mode in ("plain", "recorded", "prev-on-host"):
            assert gpu_bench.step_loop(bench, model, x, cond, 3, mode, count_syncs=True).syncs == 1.0
    assert modes == ["warn", "default"] * 3
