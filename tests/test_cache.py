"""Sampling with a caching plan (minidit/caching/cache.py) on every model, and its report (report.py).

A plan's sampler is checked against an oracle written another way: the uncached model, every step computed, with
forward hooks that replace a module's output by its last computed one wherever the plan reuses it. The two must
agree exactly, and the cached sampler must not have run any linear layer of a reused module (counted)."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_study import BATCH_CASES, load

import analyze
import minidit
from minidit.caching.cache import FFN, PlanCache
from minidit.caching.plan import Plan
from minidit.caching.report import psnr, ssim
from minidit.errors import MiniditError

STEPS = 4
FIXTURES = ROOT / "tests" / "fixtures"


def checkerboard_plan(recipe, name: str, steps: int = STEPS) -> Plan:
    """A plan that reuses about half the cells, in a pattern that differs by layer and component (chains of one
    and two reuses), coherent with what the model can skip: no feed-forward reuse where a layer has none, and a
    fused layer's attention reused with its feed-forward."""
    layers = recipe.attention_layers()
    s, lc = np.meshgrid(np.arange(steps), np.arange(len(layers) * 2), indexing="ij")
    reuse = (((s + lc) % 3 != 0) & (s > 0)).reshape(steps, len(layers), 2)
    for i, layer in enumerate(layers):
        if not layer.ffn:
            reuse[:, i, FFN] = False
        if layer.f_point == "block":
            reuse[:, i, 0] |= reuse[:, i, FFN]
    return Plan(reuse, name, steps, recipe.default_scheduler, [layer.name for layer in layers], "test", 0.5)


def targets(recipe) -> list[tuple[str, int, int]]:
    """(module path, layer, component) of every module a plan may reuse."""
    out = []
    for i, layer in enumerate(recipe.attention_layers()):
        out += [(layer.name, i, 0)] + [(path, i, FFN) for path in layer.ffn]
    return out


def sample(recipe, prompts, guidance):
    return recipe.generate(prompts, 5, recipe.make_scheduler(recipe.default_scheduler, STEPS), guidance)


def oracle(recipe, plan: Plan, prompts, guidance) -> torch.Tensor:
    """The uncached model, each reused module's output replaced by its last computed one through forward hooks."""
    model, step, kept, handles = recipe.model, [-1], {}, []

    def count(*_):
        step[0] += 1

    def replace(path, layer, component):
        def hook(module, args, output):
            if plan.reuse[step[0], layer, component]:
                return kept[path]
            kept[path] = output
        return hook

    handles.append(model.register_forward_pre_hook(count))
    handles += [model.get_submodule(path).register_forward_hook(replace(*t)) for t in targets(recipe) for path in
                [t[0]]]
    try:
        return sample(recipe, prompts, guidance)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.any_cpu
@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_a_plan_skips_what_it_reuses_and_nothing_else(case, tmp_path):
    """On every model: a plan reusing nothing reproduces the uncached sample exactly; a plan reusing about half
    the cells equals the oracle exactly (the reused outputs are the right ones, and skipping the modules changes
    nothing else); no linear layer of a reused module runs, every one of a computed module does."""
    recipe = load(case, tmp_path)
    prompts = ["a red circle on a black background", "a blue cross on a dark green background"] \
        if case == "flux-tiny" else (recipe.default_prompts()[:2] if case == "dit-tiny" else ["a cat", "a dog"])
    if case == "pixart":  # its tiny copy's buckets are 1024 px (4096 tokens): one prompt
        prompts = prompts[:1]
    recipe.prepare(prompts)
    guidance = max(recipe.default_guidance, 2.0)  # both branches in the batch
    layers = recipe.attention_layers()
    reference = sample(recipe, prompts, guidance)

    none = checkerboard_plan(recipe, case)
    none = Plan(np.zeros_like(none.reuse), case, STEPS, none.scheduler, none.layers, "test", 0.0)
    with PlanCache(recipe.model, layers, none).sampling():
        assert torch.equal(sample(recipe, prompts, guidance), reference)

    plan = checkerboard_plan(recipe, case)
    calls = np.zeros(plan.reuse.shape, dtype=int)  # linear layers run, per (step, layer, component)
    step = [-1]
    owner = {}  # each linear layer -> the innermost plan module holding it
    for path, layer, component in sorted(targets(recipe), key=lambda t: t[0].count(".")):
        for sub in recipe.model.get_submodule(path).modules():
            if isinstance(sub, torch.nn.Linear):
                owner[sub] = (layer, component)
    # every matmul of a block belongs to a module a plan can skip, but its modulation's (adaLN: norm*) and its
    # cross-attention's when those layers are not recorded (PixArt, Latte, Open-Sora without --cross-attention)
    blocks = tuple(layer.name.rsplit(".", 1)[0] + "." for layer in layers)
    left = [name for name, m in recipe.model.named_modules() if isinstance(m, torch.nn.Linear) and m not in owner
            and name.startswith(blocks) and not any(part in name for part in (".norm", ".attn2.", ".cross_attn."))]
    assert not left, f"matmuls in the blocks that no plan can skip: {left}"
    handles = [recipe.model.register_forward_pre_hook(lambda *_: step.__setitem__(0, step[0] + 1))]
    for linear, (layer, component) in owner.items():
        handles.append(linear.register_forward_hook(
            lambda *_, cell=(layer, component): calls.__setitem__((step[0], *cell), calls[(step[0], *cell)] + 1)))
    cache = PlanCache(recipe.model, layers, plan)
    try:
        with cache.sampling():
            cached = sample(recipe, prompts, guidance)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(cached, oracle(recipe, plan, prompts, guidance))
    assert not torch.equal(cached, reference)  # the plan did change the sample
    has_module = np.array([[True, bool(layer.ffn)] for layer in layers])
    assert (calls[plan.reuse] == 0).all()
    assert (calls[~plan.reuse & has_module[None]] > 0).all()
    per_cell = {c: sum(1 for t in targets(recipe) if t[2] == c) for c in (0, FFN)}  # modules per component
    assert cache.skipped[0] == plan.reuse[:, :, 0].sum()
    assert cache.skipped[FFN] == sum(plan.reuse[:, i, FFN].sum() * len(layer.ffn) for i, layer in enumerate(layers))
    assert cache.skipped[0] + cache.computed[0] == STEPS * per_cell[0]
    assert cache.peak_kept_bytes > 0
    assert all(type(m).__name__ != "Reusable" for m in recipe.model.modules())  # unwrapped after sampling


@pytest.mark.any_cpu
def test_plans_the_model_cannot_follow_are_refused(tmp_path):
    recipe = load("flux-tiny", tmp_path)
    layers = recipe.attention_layers()
    plan = checkerboard_plan(recipe, "flux-tiny")
    single = next(i for i, layer in enumerate(layers) if layer.f_point == "block")
    bad = plan.reuse.copy()
    bad[1, single] = [False, True]
    with pytest.raises(MiniditError, match="without its attention at step 1.*reuse both cells or neither"):
        PlanCache(recipe.model, layers, Plan(bad, "flux-tiny", STEPS, "flux", plan.layers, "test", 0.5))
    with pytest.raises(MiniditError, match="called the backbone 2 times; the caching plan has 4 steps"):
        with PlanCache(recipe.model, layers, plan).sampling():
            recipe.generate(["a red circle on a black background"], 0, recipe.make_scheduler("flux", 2), 1.0)
    caption = "a red circle on a black background"
    with PlanCache(recipe.model, layers, plan).sampling():
        expected = recipe.generate([caption], 0, recipe.make_scheduler("flux", STEPS), recipe.default_guidance)
    assert torch.equal(minidit.sample(recipe, caption, plan=plan)[0], expected)  # the API: the plan's steps
    with pytest.raises(MiniditError, match="record without the plan"):
        minidit.sample(recipe, caption, plan=plan, record=True)
    with pytest.raises(MiniditError, match="with 4 steps; the run has 5"):
        minidit.sample(recipe, caption, plan=plan, steps=5)
    pixart = load("pixart", tmp_path)
    pixart.cross_attention = True
    cross = checkerboard_plan(pixart, "pixart-1024")
    reuse = cross.reuse.copy()
    reuse[2, -1, FFN] = True
    with pytest.raises(MiniditError, match=r"feed-forward of transformer_blocks\.\d+\.attn2 at step 2, but that layer "
                                           r"\(cross\) has no feed-forward of its own"):
        PlanCache(pixart.model, pixart.attention_layers(), Plan(reuse, "pixart-1024", STEPS, "dpm-solver++",
                                                                 cross.layers, "test", 0.5))


@pytest.mark.any_cpu
def test_the_report_command(tmp_path, capsys):
    """A run with F, plans at one budget from every method, and --cache-plan on them: one row per plan, the
    uncached row exact, the plans' skips counted in FLOPs; a plan for another model or step count is one line."""
    run, plans, out = tmp_path / "run", tmp_path / "plans", tmp_path / "report"
    base = ["--model", "dit-tiny", "--steps", "8", "--num-prompts", "2"]
    assert analyze.main([*base, "--ffn", "--out", str(run)]) == 0
    assert analyze.main(["--plan", str(run), "--budget", "0,0.3", "--method", "measured,fora", "--out",
                         str(plans)]) == 0
    assert sorted(p.name for p in plans.iterdir()) == ["fora-0.3.json", "fora-0.json", "measured-0.3.json",
                                                       "measured-0.json"]
    capsys.readouterr()
    assert analyze.main([*base, "--cache-plan", str(plans), "--seed", "1,2", "--batch-size", "2", "--out",
                         str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| plan | budget |") and len(table.splitlines()) == 2 + 5
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["uncached", "measured-0", "fora-0", "measured-0.3", "fora-0.3"]  # by budget, then method
    assert report["seeds"] == [1, 2] and len(report["prompts"]) == 2
    for name in ("uncached", "fora-0", "measured-0"):  # budget 0: the uncached samples, exactly
        assert rows[name]["rel_err_max"] == 0 and rows[name]["flops_skipped"] == 0
        assert rows[name]["psnr"] == float("inf")  # dit-tiny draws pixels: identical images
        assert rows[name]["ssim"] == 1.0 and rows[name]["accuracy"] == rows["uncached"]["accuracy"]
    for name in ("fora-0.3", "measured-0.3"):
        row = rows[name]
        assert row["rel_err_max"] > 0 and row["extra_mb"] > 0
        assert 0 < row["flops_skipped"] < 1
    # FORA skips whole steps of blocks: that share of the blocks' FLOPs, of a total that also holds the embedders
    # and the final layer
    fora = rows["fora-0.3"]
    assert 0.5 * fora["skipped_fraction"] < fora["flops_skipped"] < fora["skipped_fraction"]
    assert fora["attn_calls_skipped"] == fora["ffn_calls_skipped"] == pytest.approx(fora["skipped_fraction"])
    assert (out / "quality_vs_speedup.png").stat().st_size > 10_000
    assert (out / "report.md").read_text() == table

    capsys.readouterr()
    assert analyze.main(["--model", "flux-tiny", "--cache-plan", str(plans / "fora-0.3.json"), "--out",
                         str(tmp_path / "x")]) == 2
    assert analyze.main([*base[:2], "--steps", "10", "--cache-plan", str(plans / "fora-0.3.json"), "--out",
                         str(tmp_path / "x")]) == 2
    assert analyze.main([*base, "--cache-plan", str(tmp_path / "nowhere.json")]) == 2
    assert analyze.main([*base, "--seed", "1,2", "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --cache-plan fora-0.3: this plan is for dit-tiny; the run is flux-tiny: make a plan for flux-tiny",
        "error: --cache-plan fora-0.3: this plan is for dit-tiny with 8 steps; the run has 10",
        f"error: --cache-plan {tmp_path / 'nowhere.json'} does not exist: pass plan files written by analyze.py "
        "--plan, or a folder of them",
        "error: a run has one seed (every prompt starts from its noise): give --seed one value"]


# ---- image quality --------------------------------------------------------------------------------------------

def test_psnr_and_ssim_against_scikit_image():
    """SSIM as scikit-image computes it (structural_similarity with gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255: Wang et al.'s settings), on image pairs drawn from a seeded
    generator (integers: the same on every CPU); the values are in tests/fixtures/ssim.json, written by
    tests/reference/generate_ssim.py. PSNR from its definition."""
    fixture = json.loads((FIXTURES / "ssim.json").read_text())
    for case in fixture["cases"]:
        a, b = ssim_pair(case["seed"], case["noise"])
        assert abs(ssim(a, b) - case["ssim"]) < 1e-9, case
    a = np.full((2, 16, 16, 3), 100, dtype=np.uint8)
    assert psnr(a, a) == float("inf") and ssim(a, a) == 1.0
    assert psnr(a + 5, a) == pytest.approx(10 * np.log10(255**2 / 25))


def ssim_pair(seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 batches (2, 32, 32, 3): smooth random images and a noisy copy."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(2, 8, 8, 3)).repeat(4, axis=1).repeat(4, axis=2)
    other = np.clip(base + rng.integers(-int(noise), int(noise) + 1, size=base.shape), 0, 255)
    return base.astype(np.uint8), other.astype(np.uint8)

