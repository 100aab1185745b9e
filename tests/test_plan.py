"""Caching plans: the measured greedy plan keeps its promises (budget, kept steps, chain cap, low-change cells
first, accumulated scores), the file is validated with one line per problem, SmoothCache schedules round-trip,
and the baselines have their papers' shapes at the budget."""

import json
from pathlib import Path

import numpy as np
import pytest

from minidit.analysis.aggregate import Run, read_run
from minidit.analysis.rundir import RunDir
from minidit.caching import METHODS, Plan, from_run, load, plan_command
from minidit.caching.baselines import PAB_LATTE, fora, pab, smoothcache
from minidit.caching.plan import equal_cost
from minidit.caching.smoothcache_file import from_smoothcache, to_smoothcache, write_smoothcache
from minidit.errors import MiniditError

N_ELEMENTS, PREV_L1 = 100.0, 50.0  # every cell's n and sum|X_{d-1}|, so rel_l1 = s_abs / PREV_L1


def u_shape(steps: int, layers: int, seed: int = 0) -> np.ndarray:
    """A plausible change [step, layer, component]: high at both ends, a floor in the middle, per cell noise."""
    u = np.linspace(0, 1, steps)[:, None, None]
    noise = np.random.default_rng(seed).uniform(0.8, 1.2, (steps, layers, 2))
    return (0.05 + 0.4 * np.exp(-12 * u) + 0.3 * u ** 6) * noise


def sums_of(change: np.ndarray, tensors: tuple[str, ...], branches: int, scale: float = 1.0) -> np.ndarray:
    """One prompt's sums [layer, stream (img), branch, tensor, transition, 7] whose rel_l1 of A is change[..., 0]
    and of F change[..., 1] (times `scale`); K and V get A's."""
    steps, layers, _ = change.shape
    sums = np.zeros((layers, 1, branches, len(tensors), steps - 1, 7))
    for ti, tensor in enumerate(tensors):
        rel = change[1:, :, 1 if tensor == "F" else 0].T * scale  # [layer, transition]
        sums[:, 0, :, ti, :, 0] = N_ELEMENTS
        sums[:, 0, :, ti, :, 1] = (rel * PREV_L1)[:, None]
        sums[:, 0, :, ti, :, 2] = PREV_L1
        sums[:, 0, :, ti, :, 3:] = 1.0  # s_sq, s_dot, s_cur2, s_prev2: unused by rel_l1
    return sums


def manifest(steps: int, layers: list[dict], tensors: tuple[str, ...], branches: tuple[str, ...]) -> dict:
    return {"model": "fake-dit", "steps": steps, "scheduler": {"name": "ddim"}, "layers": layers, "streams": ["img"],
            "branches": list(branches), "tensors": list(tensors), "timesteps": list(np.linspace(999, 0, steps)),
            "sigmas": list(np.linspace(1, 0, steps)), "guidance": 1.0}


def fake_run(change: np.ndarray, *, kinds: list[str] | None = None, tensors=("K", "V", "A")) -> Run:
    """An in-memory one-prompt, one-branch run whose per-cell changes are `change`."""
    steps, layers, _ = change.shape
    layer_list = [{"name": f"blocks.{i}.attn", "kind": (kinds or ["self"] * layers)[i]} for i in range(layers)]
    sums = sums_of(change, tensors, 1)[None]
    return Run(Path("fake-run"), manifest(steps, layer_list, tensors, ("cond",)), [0], sums, ("cond",))


def longest_chain(reuse: np.ndarray) -> int:
    """The most consecutive reuses of any one cell."""
    longest = 0
    for row in reuse.reshape(len(reuse), -1).T:
        run = 0
        for r in row:
            run = run + 1 if r else 0
            longest = max(longest, run)
    return longest


@pytest.fixture(scope="module")
def run() -> Run:
    return fake_run(u_shape(30, 5), tensors=("K", "V", "A", "F"))


# ---- the measured plan ------------------------------------------------------------------------------------------

def test_budget_zero_computes_everything(run):
    for method in METHODS.values():
        assert not method(run, 0.0).reuse.any()


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.37, 0.45])
def test_measured_plan_hits_the_budget_and_keeps_its_rules(run, budget):
    plan = from_run(run, budget, granularity="cell", keep_first=3, keep_last=2, max_reuse=2)
    cell = 0.5 / (plan.steps * 5 * 1.0)  # one cell's share: half a block of one layer at one step
    assert budget <= plan.skipped_fraction() < budget + cell + 1e-12
    assert not plan.reuse[:3].any() and not plan.reuse[-2:].any()
    assert longest_chain(plan.reuse) <= 2


def test_measured_plan_prefers_low_change_cells():
    change = np.full((12, 4, 2), 1.0)
    change[:, 2, 0] = 0.01  # layer 2's attention barely changes
    plan = from_run(fake_run(change, tensors=("K", "V", "A", "F")), 9 * 0.5 / (12 * 4), granularity="cell",
                    keep_first=2, keep_last=1, max_reuse=9)  # exactly the 9 reusable cells of layer 2's attention
    assert plan.reuse[2:11, 2, 0].all() and plan.reuse.sum() == 9


def test_candidates_are_scored_by_the_accumulated_change():
    """Layer 1 changes 0.6 a step, layer 0 1.0: after reusing steps 1 and 3 of layer 1, reusing its step 2 too
    would carry step 0's output to step 3 (0.6 x 3 = 1.8), worse than one step of layer 0 (1.0)."""
    change = np.ones((4, 2, 2))
    change[:, 1] = 0.6
    plan = from_run(fake_run(change), 3 * 0.5 / 8, granularity="cell", keep_first=1, keep_last=0,
                    max_reuse=3)  # attention only
    assert plan.reuse[[1, 3], 1, 0].all() and not plan.reuse[2, 1, 0]
    assert plan.reuse[:, 0, 0].sum() == 1


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.37, 0.45])
def test_the_default_plan_reuses_whole_steps(run, budget):
    """granularity "step": every cell of a chosen step, the steps chosen by the same greedy rules on the change
    averaged over layers and components; the budget reached within one step's share."""
    plan = from_run(run, budget, keep_first=3, keep_last=2, max_reuse=2)
    assert plan.method == "measured" and plan.source["granularity"] == "step"
    per_step = plan.reuse.reshape(plan.steps, -1)
    assert (per_step == per_step[:, :1]).all()
    assert budget <= plan.skipped_fraction() < budget + 1 / plan.steps + 1e-12
    assert not plan.reuse[:3].any() and not plan.reuse[-2:].any() and longest_chain(plan.reuse) <= 2


def test_whole_steps_are_chosen_by_the_layer_averaged_change():
    change = np.full((12, 4, 2), 1.0)
    change[5] = 0.5  # step 5 changes half as much as the others, in every layer and component
    change[7, :, 0], change[7, :, 1] = 0.1, 3.0  # step 7: attention still, feed-forward loud (on average 1.55)
    change[4, 0, 0] = 0.0  # step 4: one layer's attention is still, the average is not
    plan = from_run(fake_run(change, tensors=("K", "V", "A", "F")), 1 / 12, max_reuse=9)
    assert np.flatnonzero(plan.reuse.all(axis=(1, 2))).tolist() == [5] and plan.reuse.sum() == 8
    attention_only = from_run(fake_run(change), 0.5 / 12, max_reuse=9)  # no F: a step reuses its attention
    assert attention_only.reuse[7, :, 0].all() and attention_only.reuse.sum() == 4


def test_a_run_without_f_plans_attention_only(run):
    without_f = fake_run(u_shape(30, 5))
    plan = from_run(without_f, 0.2)
    assert plan.reuse[..., 0].any() and not plan.reuse[..., 1].any()
    assert plan.source["tensors"] == {"attn": "A", "ffn": None} and "--ffn" in plan.source["note"]
    with pytest.raises(MiniditError, match="attention only.*--ffn"):
        from_run(without_f, 0.45)


def test_a_fused_block_reuses_both_cells_together():
    change = u_shape(20, 3)
    fused_run = fake_run(change, tensors=("K", "V", "A", "F"))
    fused_run.manifest["layers"][2]["f_point"] = "block"
    plan = from_run(fused_run, 0.3)
    assert plan.reuse[:, 2, 1].any() and np.array_equal(plan.reuse[:, 2, 0], plan.reuse[:, 2, 1])


def test_from_a_run_directory_pools_the_guidance_branches(tmp_path):
    """Written through RunDir with ["K", "V", "A", "F"] and two branches: the plan reads F and the pooled "all"."""
    change = u_shape(10, 3)
    layers = [{"name": f"blocks.{i}.attn", "kind": "self", "f_point": "ffn"} for i in range(3)]
    run_dir = RunDir(tmp_path / "run")
    run_dir.open(manifest(10, layers, ("K", "V", "A", "F"), ("uncond", "cond")), ["a cat"], resume=False)
    sums = sums_of(change, ("K", "V", "A", "F"), 2)
    sums[:, :, 0, :, :, 1] *= 3  # the uncond half changes three times as much: pooled, rel_l1 doubles
    run_dir.write_record(0, sums, {})
    plan = from_run(read_run(tmp_path / "run"), 0.25)
    assert plan.source["branch"] == "all" and plan.source["tensors"] == {"attn": "A", "ffn": "F"}
    assert plan.reuse[..., 1].any() and plan.model == "fake-dit" and plan.scheduler == "ddim"


# ---- the file ---------------------------------------------------------------------------------------------------

def test_plan_file_round_trip(run, tmp_path):
    plan = from_run(run, 0.3)
    plan.save(tmp_path / "plan.json")
    assert load(tmp_path / "plan.json") == plan


def broken(plan: Plan, edit) -> dict:
    data = json.loads(plan.to_json())
    edit(data)
    return data


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["reuse"].pop(), "reuse has 29 entries along the step axis; the plan states 30 steps"),
    (lambda d: d["reuse"][4].pop(), "reuse[4] has 4 entries along the layer axis"),
    (lambda d: d["reuse"][0][1].__setitem__(0, True), "step 0 reuses blocks.1.attn attn, but nothing"),
    (lambda d: d.update(colour="blue", router=1), "unknown keys colour, router"),
    (lambda d: d.pop("model"), "missing keys model"),
    (lambda d: d.update(steps=28), "reuse has 30 entries along the step axis; the plan states 28 steps"),
    (lambda d: d["layers"].pop(), "reuse[0] has 5 entries along the layer axis; the plan states 4 layers"),
    (lambda d: d["reuse"][3][2].__setitem__(1, 1), "reuse[3][2][1] is 1, not true or false"),
    (lambda d: d.update(skipped_fraction=0.9), "skipped_fraction 0.9 disagrees with the mask"),
    (lambda d: d.update(version=2), "format version 2; this minidit reads version 1"),
    (lambda d: d.pop("format"), "not a minidit caching plan"),
    (lambda d: d["cost"][0].__setitem__(0, -1), "cost[0][0] is -1, not a number >= 0"),
])
def test_plan_file_problems_are_one_line_each(run, tmp_path, edit, words):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(broken(from_run(run, 0.3), edit)))
    with pytest.raises(MiniditError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)) and words in message


def test_unreadable_plan_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    for path, words in [(tmp_path / "bad.json", "is not a JSON caching plan"), (tmp_path / "none.json", "cannot read")]:
        with pytest.raises(MiniditError, match=words):
            load(path)


def test_check_against_names_the_mismatch(run):
    plan = from_run(run, 0.2)
    names = list(plan.layers)
    plan.check_against("fake-dit", names, 30, "ddim")
    for args, message in [(("fake-dit", names, 14), "this plan is for fake-dit with 30 steps; the run has 14"),
                          (("flux-tiny", names, 30), "this plan is for fake-dit; the run is flux-tiny"),
                          (("fake-dit", names[:3], 30), "this plan is for 5 layers of fake-dit; the run has 3"),
                          (("fake-dit", names[:4] + ["x"], 30), "layer 4 is 'blocks.4.attn'; the run's is 'x'"),
                          (("fake-dit", names, 30, "flow-euler"), "sampled with ddim; the run uses flow-euler")]:
        with pytest.raises(MiniditError, match=message.replace("(", r"\(")):
            plan.check_against(*args)


def test_plan_command_writes_the_plan(tmp_path):
    change = u_shape(8, 2)
    layers = [{"name": f"blocks.{i}.attn", "kind": "self"} for i in range(2)]
    run_dir = RunDir(tmp_path / "run")
    run_dir.open(manifest(8, layers, ("K", "V", "A"), ("cond",)), ["a cat"], resume=False)
    run_dir.write_record(0, sums_of(change, ("K", "V", "A"), 1), {})
    plan = plan_command(tmp_path / "run", 0.25, tmp_path / "plan.json", method="fora")
    assert load(tmp_path / "plan.json") == plan and plan.method == "fora"
    with pytest.raises(MiniditError, match="unknown plan method 'lazy'"):
        plan_command(tmp_path / "run", 0.25, tmp_path / "plan.json", method="lazy")


# ---- SmoothCache's schedule -------------------------------------------------------------------------------------

# Written from their format (smooth_cache_helper.py reads it, their calibration writes it this way): 7 steps,
# lookahead 2, first and last computed.
SMOOTHCACHE_EXAMPLE = '{\n    "attn": [1,0,0,1,0,1,1],\n    "mlp": [1,0,1,0,1,0,1]\n}\n'


def test_a_smoothcache_schedule_round_trips(tmp_path):
    (tmp_path / "theirs.json").write_text(SMOOTHCACHE_EXAMPLE)
    names = [f"blocks.{i}.attn" for i in range(3)]
    plan = from_smoothcache(tmp_path / "theirs.json", names, model="fake-dit", scheduler="ddim")
    assert plan.steps == 7 and plan.reuse[:, :, 0].sum() == 3 * 3 and plan.reuse[:, :, 1].sum() == 3 * 3
    write_smoothcache(to_smoothcache(plan), tmp_path / "ours.json")
    assert (tmp_path / "ours.json").read_text() == SMOOTHCACHE_EXAMPLE


def test_a_smoothcache_plan_round_trips(run):
    plan = smoothcache(run, 0.3)
    back = from_smoothcache(to_smoothcache(plan), list(plan.layers), model=plan.model, scheduler=plan.scheduler)
    assert np.array_equal(back.reuse, plan.reuse) and back.skipped_fraction() == plan.skipped_fraction()


def test_smoothcache_per_block_keys(run):
    plan = from_run(run, 0.3, granularity="cell")  # differs per layer: one list cannot hold it
    with pytest.raises(MiniditError, match="one attn list for every layer.*per_block=True"):
        to_smoothcache(plan)
    schedule = to_smoothcache(plan, per_block=True)
    assert set(schedule) == {f"{c}-{i}" for c in ("attn", "mlp") for i in range(5)}
    back = from_smoothcache(schedule, list(plan.layers), model=plan.model, scheduler=plan.scheduler)
    assert np.array_equal(back.reuse, plan.reuse)
    mixed = from_smoothcache({"attn": [1, 0, 1], "attn-1": [1, 1, 1]}, ["b.0.attn", "b.1.attn"], model="m",
                             scheduler="s")  # a block's own key wins over the component's
    assert mixed.reuse[:, :, 0].tolist() == [[False, False], [True, False], [False, False]]


@pytest.mark.parametrize("schedule, words", [({"ff": [1, 0]}, "unknown key 'ff'"),
                                             ({"attn": [1, 0], "mlp": [1, 0, 1]}, "different lengths"),
                                             ({"attn": [1, 2]}, "list of 0 and 1"), ({}, "JSON object")])
def test_bad_smoothcache_schedules(schedule, words):
    with pytest.raises(MiniditError, match=words):
        from_smoothcache(schedule, ["b.0.attn"], model="m", scheduler="s")


# ---- baselines --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.3, 0.6, 0.1])
def test_fora_is_a_uniform_period(run, budget):
    plan = fora(run, budget)
    per_step = plan.reuse.reshape(plan.steps, -1)
    assert (per_step == per_step[:, :1]).all()  # every layer and component alike
    computed = np.flatnonzero(~per_step[:, 0])
    interval, warmup = plan.source["interval"], plan.source.get("warmup")
    if warmup is None:  # the paper's schedule: 0, o, o + N, ...
        assert set(computed) == {0} | set(range(plan.source["offset"], plan.steps, interval))
    else:  # below half: a computed warm-up 0 .. w - 1, then every N-th from w
        assert set(computed) == set(range(warmup)) | set(range(warmup, plan.steps, interval))
    steps = np.arange(30)
    achievable = {np.mean(((steps - o) % n != 0) & (steps > 0)) for n in range(1, 31) for o in range(n)}
    achievable |= {np.mean(((steps - w) % n != 0) & (steps > w)) for n in range(2, 31) for w in range(2, 30)}
    assert abs(plan.skipped_fraction() - budget) == min(abs(a - budget) for a in achievable)
    if budget < 0.4:  # no uniform period skips between 0 and about half
        assert warmup is not None
    print(f"FORA at {budget}: interval {interval}, {plan.source}, reached {plan.skipped_fraction():.3f}")


def test_pab_broadcasts_attention_in_its_window_with_a_pyramid():
    kinds = ["self", "temporal", "cross", "spatial"]
    video = fake_run(u_shape(50, 4), kinds=kinds)
    timesteps = np.asarray(video.manifest["timesteps"])
    window = (timesteps > 100) & (timesteps < 800)
    paper = np.zeros((50, 4), dtype=bool)  # the paper's settings: intervals 2, 3, 6 inside (100, 800)
    for layer, interval in enumerate([2, 3, 6, 2]):
        paper[:, layer] = window & (np.arange(50) % interval != 0)
    plan = pab(video, paper.sum() * 0.5 / (50 * 4))
    assert plan.source["scale"] == 1 and plan.source["widen_steps"] == 0
    assert np.array_equal(plan.reuse[..., 0], paper) and not plan.reuse[..., 1].any()
    for budget in (0.1, 0.3):
        plan = pab(video, budget)
        assert not plan.reuse[..., 1].any() and abs(plan.skipped_fraction() - budget) < 0.02
        spans = {role: plan.source[role]["interval"] for role in PAB_LATTE}
        assert spans["spatial"] <= spans["temporal"] <= spans["cross"]
        print(f"PAB at {budget}: reached {plan.skipped_fraction():.3f}, scale {plan.source['scale']}, "
              f"widened {plan.source['widen_steps']} steps")


@pytest.mark.parametrize("budget", [0.15, 0.35])
def test_smoothcache_is_uniform_over_layers_per_component(run, budget):
    plan = smoothcache(run, budget)
    assert (plan.reuse == plan.reuse[:, :1]).all()
    assert not plan.reuse[0].any() and not plan.reuse[-1].any() and longest_chain(plan.reuse) <= 3
    assert abs(plan.skipped_fraction() - budget) < 0.05
    print(f"SmoothCache at {budget}: alpha {plan.source['alpha']:.4f}, reached {plan.skipped_fraction():.3f}")


def test_costs_weigh_the_budget(run):
    cost = equal_cost(5)
    cost[:, 0] = 0.25  # attention a quarter of each block
    plan = from_run(run, 0.2, cost=cost)
    assert plan.skipped_fraction() == pytest.approx((plan.reuse * cost).sum() / (30 * cost.sum()))
    assert plan.skipped_fraction() >= 0.2


@pytest.mark.any_cpu  # a command run end to end: no stored fixture
def test_the_plan_command(tmp_path, capsys):
    """analyze.py --plan RUN --budget F --out PLAN.json on a real run: the file loads, is for that run's model, steps
    and layers, and skips the budget; a missing --budget and an unknown method are one line each."""
    import analyze

    run = tmp_path / "run"
    assert analyze.main(["--model", "dit-tiny", "--steps", "12", "--num-prompts", "2", "--out", str(run)]) == 0
    for method in ("measured", "fora", "pab", "smoothcache"):
        out = tmp_path / f"{method}.json"
        assert analyze.main(["--plan", str(run), "--budget", "0.2", "--method", method, "--out", str(out)]) == 0
        plan = load(out)
        manifest = RunDir(run).manifest()
        plan.check_against("dit-tiny", [layer["name"] for layer in manifest["layers"]], 12)
        assert plan.method == method and abs(plan.skipped_fraction() - 0.2) <= 0.05
    capsys.readouterr()
    assert analyze.main(["--plan", str(run), "--out", str(tmp_path / "x.json")]) == 2
    assert analyze.main(["--plan", str(run), "--budget", "0.2", "--method", "magic", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --plan RUN needs --budget F (the fraction of block computations to skip) and --out "
                   "PLAN.json (a folder, with several budgets or methods)",
                   "error: unknown plan method 'magic': choose one of measured, measured-cells, fora, pab, smoothcache"]
