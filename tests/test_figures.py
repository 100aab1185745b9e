"""Figures from synthetic run directories: files are real PNGs, one y-range is shared by every panel of the
per-layer grid, heatmaps put layer 0 at the top, and compare() measures what it says on known curves."""

import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from minidit.analysis import figures
from minidit.analysis.aggregate import Run, read_run
from minidit.analysis.recorder import TENSORS
from minidit.analysis.rundir import RunDir
from minidit.errors import MiniditError

ELEMENTS = 1000.0  # n of every recorded cell
SCALE = 2.0  # mean |X| of every tensor, so rel_l1 = l1 / SCALE


def default_curve(layer: int, stream: int, tensor: int, u: np.ndarray, prompt: int) -> np.ndarray:
    """A plausible l1 curve: large at the first steps, a floor, a rise at the end; each layer and tensor its own."""
    rng = np.random.default_rng(1000 * layer + 10 * stream + tensor)
    base = 10 ** rng.uniform(-2, 0) * (1 + 0.5 * tensor)
    shape = 3 * np.exp(-rng.uniform(4, 12) * u) + 0.2 + rng.uniform(0, 1.5) * u ** 3
    return base * shape * (1 + 0.3 * np.sin(prompt + 3 * u + layer))


def make_run(path: Path, *, layers: list[dict], streams=("img",), branches=("cond",), steps=20, prompts=3,
             curve=default_curve, model="synthetic-dit", scheduler="ddim", tensors=TENSORS) -> Run:
    """A run directory whose l1 in every recorded cell is `curve(layer, stream, tensor, u, prompt)`.

    A layer records the streams listed in its "streams" (default: img only); other cells stay empty (n = 0).
    """
    u = np.arange(1, steps) / (steps - 1)
    manifest = {"model": model, "steps": steps, "scheduler": {"name": scheduler},
                "timesteps": list(np.linspace(999, 0, steps)), "sigmas": list(np.linspace(1, 0, steps)),
                "guidance": 4.0 if len(branches) > 1 else 1.0, "layers": layers, "streams": list(streams),
                "branches": list(branches), "tensors": list(tensors)}
    run_dir = RunDir(path)
    run_dir.open(manifest, [f"prompt {p}" for p in range(prompts)], resume=False)
    for p in range(prompts):
        sums = np.zeros((len(layers), len(streams), len(branches), len(tensors), steps - 1, 7))
        for li, layer in enumerate(layers):
            for si, stream in enumerate(streams):
                if stream not in layer.get("streams", ("img",)):
                    continue
                for bi in range(len(branches)):
                    for ti in range(len(tensors)):
                        l1 = curve(li, si, ti, u, p) * (1 + 0.2 * bi)
                        n, prev2 = ELEMENTS, ELEMENTS * SCALE ** 2
                        s_sq = n * l1 ** 2
                        sums[li, si, bi, ti] = np.stack(np.broadcast_arrays(
                            n, n * l1, n * SCALE, s_sq, prev2 - s_sq / 2, prev2, prev2), axis=-1)
        run_dir.write_record(p, sums, {"prompt": p})
    return read_run(path)


def self_layers(n: int) -> list[dict]:
    return [{"name": f"blocks.{i}.attn", "kind": "self"} for i in range(n)]


def flux_layers() -> list[dict]:
    """FLUX.1's 57 layers: 19 double-stream, then 38 single-stream blocks whose A is taken before the projection."""
    both = ("img", "txt")
    return ([{"name": f"transformer_blocks.{i}.attn", "kind": "joint", "streams": both} for i in range(19)]
            + [{"name": f"single_transformer_blocks.{i}.attn", "kind": "joint", "streams": both,
                "a_point": "pre_proj"} for i in range(38)])


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature and that the image decodes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert imread(path).shape[:2] == (height, width)
    return width, height


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> Run:
    return make_run(tmp_path_factory.mktemp("six") / "run", layers=self_layers(6), branches=("cond", "uncond"))


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Run:
    return make_run(tmp_path_factory.mktemp("flux") / "run", layers=flux_layers(), streams=("img", "txt"),
                    steps=50, model="synthetic-flux", scheduler="flow-euler")


@pytest.mark.parametrize("n", [1, 6, 24, 28, 30, 42, 48, 56, 57])
def test_grid_layout_is_landscape_and_nearly_full(n):
    rows, cols, cells = figures.grid_layout([n])
    assert cols <= figures.MAX_COLUMNS and rows * cols >= n
    assert rows * cols - n < cols  # no empty row
    assert n < 4 or cols >= rows - 2
    assert len(set(cells)) == n and all(0 <= r < rows and 0 <= c < cols for r, c in cells)


def test_grid_layout_starts_a_row_per_layer_family(flux):
    groups = figures.layer_groups(flux, list(range(57)))
    assert [len(g) for g in groups] == [19, 38]  # double-stream, then single-stream blocks
    rows, cols, cells = figures.grid_layout([19, 38])
    assert (rows, cols) == (9, 7) and cells[19] == (3, 0) and cells[18] == (2, 4)
    rows, cols, cells = figures.grid_layout([28, 28])  # Latte: spatial, then temporal
    assert (rows, cols) == (8, 7) and cells[28] == (4, 0)
    rows, cols, cells = figures.grid_layout([1] * 10)  # many small families: plain order
    assert cells == [divmod(i, cols) for i in range(10)]


def test_layer_grid_shares_one_y_range(six):
    mean = six.stats("l1")[0][:, 0, six.branches.index("all")]  # the default branch pools cond and uncond
    fig = figures.layer_grid_figure(six, "l1")
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert len(panels) == 6 and all(len(ax.lines) == 3 for ax in panels)
    limits = {ax.get_ylim() for ax in panels}
    assert len(limits) == 1
    lo, hi = limits.pop()
    assert all(ax.get_yscale() == "log" for ax in panels)
    assert lo <= mean.min() and mean.max() <= hi and hi / lo < 1.6 * mean.max() / mean.min()
    assert [ax.get_title() for ax in panels] == [f"{i} self" for i in range(6)]
    np.testing.assert_allclose(panels[2].lines[1].get_ydata(), mean[2, 1])  # layer 2's V is the mean over prompts
    assert panels[0].lines[0].get_xdata()[0] == 1  # the first transition at the left
    assert "branch all" in fig.get_suptitle() and "3 prompts" in fig.get_suptitle()


def test_layer_grid_writes_png(six, tmp_path):
    written = figures.layer_grid(six, "rel_l1", tmp_path / "grid.png", branch="cond")
    assert written == [tmp_path / "grid.png"]
    width, height = png_size(written[0])
    assert width > 600 and height > 300


def test_txt_grid_has_only_the_layers_with_text(tmp_path):
    layers = [{"name": "a", "kind": "joint", "streams": ("img", "txt")}, {"name": "b", "kind": "self"},
              {"name": "c", "kind": "joint", "streams": ("img", "txt")}]
    run = make_run(tmp_path / "run", layers=layers, streams=("img", "txt"), steps=6)
    txt = [ax.get_title() for ax in figures.layer_grid_figure(run, "l1", stream="txt").axes if ax.lines]
    img = [ax.get_title() for ax in figures.layer_grid_figure(run, "l1", stream="img").axes if ax.lines]
    assert txt == ["0 joint", "2 joint"] and img == ["0 joint", "1 self", "2 joint"]


def test_bad_arguments_are_user_errors(six, tmp_path):
    with pytest.raises(MiniditError, match="metric"):
        figures.layer_grid(six, "l2", tmp_path / "x.png")
    with pytest.raises(MiniditError, match="branch"):
        figures.heatmap(six, "l1", tmp_path / "x.png", branch="both")
    with pytest.raises(MiniditError, match="stream"):
        figures.layer_grid(six, "l1", tmp_path / "x.png", stream="txt")
    assert not (tmp_path / "x.png").exists()


def test_heatmap_puts_layer_zero_on_top(flux, tmp_path):
    fig = figures.heatmap_figure(flux, "l1", stream="txt")
    mean = flux.stats("l1")[0][:, flux.streams.index("txt"), 0]
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3 and len(fig.axes) == 6  # K, V, A and a colour bar each
    for ti, image in enumerate(images):
        np.testing.assert_allclose(image.get_array().filled(np.nan), mean[:, ti])
        left, right, bottom, top = image.get_extent()
        assert top < bottom and (left, right) == (0.5, 49.5)  # row 0 (layer 0) drawn at the top
        assert image.norm.vmin > 0 and image.norm.vmin <= mean[:, ti].min() and image.norm.vmax >= mean[:, ti].max()
    png_size(figures.heatmap(flux, "l1", tmp_path / "heat.png")[0])


@pytest.mark.any_cpu
def test_write_figures_standard_set(flux, tmp_path):
    written = figures.write_figures(flux, tmp_path / "figures")
    names = sorted(p.name for p in written)
    assert names == sorted(f"{kind}_{metric}_{stream}_cond.png" for kind in ("grid", "heatmap")
                           for metric in ("l1", "rel_l1") for stream in ("img", "txt"))
    sizes = {p.name: png_size(p) for p in written}
    width, height = sizes["grid_l1_img_cond.png"]  # 57 panels, 7 columns x 9 rows of ~2.3 x 1.55 in at 120 dpi
    assert 1900 < width < 2100 and 1700 < height < 1900


def piecewise_log_curve(knots: np.ndarray):
    """Curves that are piecewise linear in log10 between knots at u = k / (len(knots) - 1), per layer and tensor.

    Sampled at any step count whose u grid contains the knots, linear interpolation of log values recovers
    the same function exactly, so two such runs are identical functions of u.
    """
    knot_u = np.linspace(0, 1, knots.shape[-1])

    def curve(layer, stream, tensor, u, prompt):
        return 10 ** np.interp(u, knot_u, knots[layer, tensor]) * (1 + 0.1 * prompt)

    return curve


def test_compare_identical_functions_of_u(tmp_path):
    rng = np.random.default_rng(0)
    knots = rng.uniform(-3, 0, size=(4, 3, 8))  # [layer, tensor, knot]: knots at u = k / 7
    curve = piecewise_log_curve(knots)
    runs = [make_run(tmp_path / f"run{steps}", layers=self_layers(4), steps=steps, curve=curve)
            for steps in (8, 15, 29)]  # u = k/7, k/14, k/28: every grid holds the knots
    other = piecewise_log_curve(knots[:, :, ::-1].copy())
    runs.append(make_run(tmp_path / "reversed", layers=self_layers(4), steps=15, curve=other))
    rows = figures.compare(runs, ["8 steps", "15 steps", "29 steps", "reversed"], "l1", tmp_path / "cmp.png")
    png_size(tmp_path / "cmp.png")
    assert len(rows) == 9 and {r["tensor"] for r in rows} == set(TENSORS)
    assert set(rows[0]) == {"reference", "run", "tensor", "metric", "pearson_log", "mean_abs_log10_ratio",
                            "n_layers"}
    for row in rows:
        assert row["reference"] == "8 steps" and row["n_layers"] == 4
        if row["run"] == "reversed":
            assert row["pearson_log"] < 0.9 and row["mean_abs_log10_ratio"] > 0.1
        else:
            assert abs(row["pearson_log"] - 1) < 1e-9 and row["mean_abs_log10_ratio"] < 1e-9


def test_curve_similarity_of_a_scaled_curve():
    u_ref, u_other = np.arange(1, 10) / 9, np.arange(1, 19) / 18
    ref = 10 ** (-2 + np.sin(3 * u_ref))[None]
    other = 100 * 10 ** (-2 + np.sin(3 * u_other))[None]  # the same shape, 100x larger, sampled more finely
    r, ratio, n = figures.curve_similarity(u_ref, ref, u_other, other)
    assert n == 1 and r > 0.99 and abs(ratio - 2) < 0.02
    flat = np.ones_like(ref)
    assert figures.curve_similarity(u_ref, flat, u_other, other)[2] == 0  # correlation undefined: layer left out


def test_compare_refuses_different_layers(six, flux, tmp_path):
    with pytest.raises(MiniditError, match="different models layer by layer is meaningless"):
        figures.compare([six, flux], ["dit", "flux"], "l1", tmp_path / "cmp.png")
    renamed = make_run(tmp_path / "renamed", layers=[{"name": f"other.{i}", "kind": "self"} for i in range(6)])
    with pytest.raises(MiniditError, match="layers differ"):
        figures.compare([six, renamed], ["a", "b"], "l1", tmp_path / "cmp.png")
    assert not (tmp_path / "cmp.png").exists()


def test_sample_grid_upscales_tiny_images(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [np.full((32, 32, 3), c, dtype=np.uint8) for c in colors]
    path = figures.sample_grid(images, ["golden retriever", "red panda", "volcano"], tmp_path / "samples.png")[0]
    width, height = png_size(path)
    assert width >= 3 * 128 and height >= 128
    pixels = (imread(path)[..., :3] * 255).round().astype(int)
    for c in colors:
        ys, xs = np.nonzero((pixels == c).all(axis=-1))
        assert ys.max() - ys.min() + 1 == 128 and xs.max() - xs.min() + 1 == 128 and len(ys) == 128 * 128
    with pytest.raises(MiniditError, match="uint8"):
        figures.sample_grid([np.zeros((8, 8), dtype=np.uint8)], ["gray"], tmp_path / "bad.png")
