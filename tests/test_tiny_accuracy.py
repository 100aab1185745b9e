"""flux-tiny's caption-accuracy check: the detector reads every drawn caption right with measured margins, flags
corrupted images, caption_accuracy counts what the detector reads, the figure frames each sample by its result,
and the command runs a recipe end to end."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from minidit.errors import MiniditError
from minidit.tiny import accuracy
from minidit.tiny.accuracy import (
    BACKGROUND_TOLERANCE,
    CLEAN_IOU,
    COLOUR_TOLERANCE,
    SHAPE_MIN_IOU,
    UNMATCHED,
    DetectionResult,
    caption_accuracy,
    default_grid,
    detect,
    write_grid_figure,
)
from minidit.tiny.shapes import (
    BACKGROUNDS,
    COLOUR_JITTER,
    COLOURS,
    PARTS,
    SHAPES,
    all_captions,
    caption,
    compose,
    draw_captions,
    parse_caption,
    shape_distances,
)
from minidit.vae.autoencoder_kl import to_uint8

SEEDS = 5  # draws of each of the 192 captions
CIRCLE, SQUARE, TRIANGLE, CROSS = (list(SHAPES).index(s) for s in ("circle", "square", "triangle", "cross"))
RED, BLACK = list(COLOURS).index("red"), list(BACKGROUNDS).index("black")
BLACK_RGB = BACKGROUNDS["black"]


@pytest.fixture(scope="module")
def drawn() -> tuple[torch.Tensor, torch.Tensor, DetectionResult]:
    """Every caption drawn SEEDS times: parts (N, 3), images (N, 3, 32, 32) in [-1, 1] and what `detect` reads."""
    parts = torch.tensor([parse_caption(text) for text in all_captions()]).repeat(SEEDS, 1)
    images = draw_captions(parts, torch.Generator().manual_seed(20241130))
    return parts, images, detect(images)


def draw(shape: int, colour, background, cx: float = 16.0, cy: float = 16.0, r: float = 11.0) -> torch.Tensor:
    """One image (1, 3, 32, 32) of SHAPES[shape] at (cx, cy, r) with exact RGB colours in [0, 1]."""
    return compose(sdf_at(shape, cx, cy, r), torch.tensor([colour]), torch.tensor([background]))


def sdf_at(shape: int, cx: float = 16.0, cy: float = 16.0, r: float = 11.0) -> torch.Tensor:
    """The signed distance (1, 32, 32) of SHAPES[shape] at (cx, cy, r)."""
    return shape_distances(*(torch.tensor([[[v]]]) for v in (cx, cy, r)))[:, shape]


def red_on_black(sdf: torch.Tensor) -> torch.Tensor:
    return compose(sdf, torch.tensor([COLOURS["red"]]), torch.tensor([BLACK_RGB]))


def ellipse_sdf(aspect: float, r: float) -> torch.Tensor:
    """An ellipse stretched `aspect` times horizontally (nearly a signed distance: enough for the coverage)."""
    offset = torch.arange(32.0) + 0.5 - 16
    return torch.hypot(offset[None, None, :] / aspect, offset[None, :, None]) - r


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Images (N, 3, 32, 32) through a separable Gaussian blur of `sigma` pixels (edges replicated)."""
    taps = torch.arange(-3.0, 4.0)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = torch.nn.functional.pad(images.flatten(0, 1)[:, None], (3, 3, 3, 3), mode="replicate")
    x = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, 7)), kernel.view(1, 1, 7, 1))
    return x.reshape(images.shape)


def draw_caption(text: str, seed: int) -> np.ndarray:
    """A perfect model: the caption drawn as the training data is, uint8 (1, 32, 32, 3) like a recipe's decode."""
    return to_uint8(draw_captions(torch.tensor([parse_caption(text)]), torch.Generator().manual_seed(seed)))


def test_reads_every_drawn_caption(drawn):
    """All 960 drawn images, every part right. Measured here (5 seeds) and, in brackets, on 40 seeds:
    true shape IoU >= 0.985 (0.977), a triangle (circle, ring, diamond >= 0.998); any other shape's IoU <= 0.899
    (0.903), a circle against the square's template or back; each image's margin between them >= 0.101 (0.093).
    So CLEAN_IOU = 0.92 sits 0.017 above the one and 0.057 below the other: every drawn image is clean. Colour
    errors <= 0.050 = COLOUR_JITTER, a third of COLOUR_TOLERANCE and half of BACKGROUND_TOLERANCE."""
    parts, _, result = drawn
    assert torch.equal(result.parts, parts)  # colour, shape and background of every image

    rows = torch.arange(len(parts))
    true_iou = result.shape_iou[rows, parts[:, 1]]
    other_iou = result.shape_iou.clone()
    other_iou[rows, parts[:, 1]] = -1
    assert true_iou.min() > CLEAN_IOU + 0.04  # measured 0.985
    assert other_iou.max() < CLEAN_IOU - 0.01  # measured 0.899
    assert (true_iou - other_iou.amax(1)).min() > 0.08  # measured 0.101

    # the drawn colour is within COLOUR_JITTER of its name, and the detector measures it exactly
    assert result.colour_error.max() <= COLOUR_JITTER + 1e-6
    assert result.background_error.max() <= COLOUR_JITTER + 1e-6
    named = torch.tensor(list(COLOURS.values()))[parts[:, 0]]
    assert (result.colour_rgb - named).abs().max() <= COLOUR_JITTER + 1e-6


def test_uint8_and_float_agree(drawn):
    """The same images as a recipe's uint8 output: the same parts; colours within the rounding (1/2 of 1/255),
    the true shape's IoU within 0.002 (measured 0.0008)."""
    parts, images, as_float = drawn
    as_uint8 = detect(to_uint8(images))
    assert torch.equal(as_uint8.parts, as_float.parts)
    assert (as_uint8.colour_rgb - as_float.colour_rgb).abs().max() <= 0.5 / 255 + 1e-6
    assert (as_uint8.background_rgb - as_float.background_rgb).abs().max() <= 0.5 / 255 + 1e-6
    rows = torch.arange(len(parts))
    iou_difference = as_uint8.shape_iou[rows, parts[:, 1]] - as_float.shape_iou[rows, parts[:, 1]]
    assert iou_difference.abs().max() < 0.002


def test_reads_the_extreme_positions_and_sizes():
    """Each shape at the corners of the drawn range (centre 3 px off on both axes, smallest and largest size)."""
    for shape in range(len(SHAPES)):
        for cx, cy, r in [(13.0, 19.0, 13.0), (19.0, 13.0, 9.5), (13.0, 13.0, 13.0)]:
            result = detect(red_on_black(sdf_at(shape, cx, cy, r)))
            assert result.parts[0].tolist() == [RED, shape, BLACK], (shape, cx, cy, r, result.explain(0))


def test_tolerates_a_soft_or_noisy_sample(drawn):
    """A sample need not be as crisp as the data. Every caption blurred by a 1 px Gaussian still reads right: the
    colour is measured deep inside the shape, not at its soft edge (largest error 0.082; 0.30 with the whole
    foreground); true IoU >= 0.934. With Gaussian noise of 0.05 per channel too: coverage clamped to [0, 1], true
    IoU >= 0.956 (0.937 unclamped)."""
    parts, images, _ = drawn
    parts, images = parts[:192], images[:192]
    noise = 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))  # 0.05 in [0, 1] units
    rows = torch.arange(len(parts))
    for name, x, min_iou in [("blur", blurred(images, 1.0), 0.925), ("noise", images + noise, 0.945)]:
        result = detect(x)
        assert torch.equal(result.parts, parts), name
        assert result.colour_error.max() < COLOUR_TOLERANCE, name
        assert result.shape_iou[rows, parts[:, 1]].min() > min_iou, name


@pytest.mark.parametrize("name, image, expected", [
    # a shape colour that is no name (grey), halfway between two (orange and yellow), or one channel 0.18 off red
    ("grey shape", lambda: draw(CIRCLE, (0.5, 0.5, 0.5), BLACK_RGB), [UNMATCHED, CIRCLE, BLACK]),
    ("orange-yellow", lambda: draw(SQUARE, (0.975, 0.725, 0.1), BLACK_RGB), [UNMATCHED, SQUARE, BLACK]),
    ("red, green +0.18", lambda: draw(SQUARE, (0.9, 0.30, 0.1), BLACK_RGB), [UNMATCHED, SQUARE, BLACK]),
    # ... but 0.14 off in every channel is still red (COLOUR_TOLERANCE = 0.158)
    ("red, 0.14 off", lambda: draw(SQUARE, (0.76, 0.26, 0.24), BLACK_RGB), [RED, SQUARE, BLACK]),
    ("grey background", lambda: draw(TRIANGLE, COLOURS["red"], (0.5, 0.5, 0.5)), [RED, TRIANGLE, UNMATCHED]),
    ("blank", lambda: draw(CIRCLE, COLOURS["red"], BLACK_RGB, r=-5.0), [UNMATCHED, UNMATCHED, BLACK]),
    ("noise", lambda: torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
     [UNMATCHED, UNMATCHED, UNMATCHED]),
    # shapes that are none of the family's; their best IoU: 0.72, 0.68, 0.76, all below SHAPE_MIN_IOU = 0.8
    ("two circles", lambda: red_on_black(torch.minimum(sdf_at(CIRCLE, cx=9, r=6), sdf_at(CIRCLE, cx=23, r=6))),
     [RED, UNMATCHED, BLACK]),
    ("circle and square", lambda: red_on_black(torch.minimum(sdf_at(CIRCLE, cx=10, r=7),
                                                             sdf_at(SQUARE, cx=23, r=7))), [RED, UNMATCHED, BLACK]),
    ("too small", lambda: red_on_black(sdf_at(CIRCLE, r=6.0)), [RED, UNMATCHED, BLACK]),
    # an ellipse of aspect 1.35 is recognisably the circle (0.87), but not a clean one
    ("ellipse", lambda: red_on_black(ellipse_sdf(1.35, 9.0)), [RED, CIRCLE, BLACK]),
])
def test_flags_corrupted_images(name, image, expected):
    result = detect(image())
    assert result.parts[0].tolist() == expected, result.explain(0)
    if expected[1] == UNMATCHED:
        assert result.shape_iou.max() < SHAPE_MIN_IOU
    if name == "ellipse":
        assert result.shape_iou.max() < CLEAN_IOU


def test_colour_tolerance_names_at_most_one_colour():
    """No colour is within its table's tolerance (largest channel difference) of two names, so naming is
    unambiguous; and a drawn colour (within COLOUR_JITTER) is always named."""
    for table, tolerance in ((COLOURS, COLOUR_TOLERANCE), (BACKGROUNDS, BACKGROUND_TOLERANCE)):
        rgb = torch.tensor(list(table.values()))
        gaps = (rgb[:, None] - rgb[None]).abs().amax(-1) + torch.eye(len(rgb)) * 9
        assert gaps.min() > 2 * tolerance  # 0.35 (orange, yellow) and 0.23 (black, dark green)
        assert tolerance > 2 * COLOUR_JITTER


def test_perfect_generator_scores_one():
    captions, seeds = default_grid()
    report = caption_accuracy(draw_caption, captions, seeds, progress=False)
    assert report.accuracy == 1.0 and report.clean_accuracy == 1.0
    assert report.part_accuracy == {"colour": 1.0, "shape": 1.0, "background": 1.0}
    assert len(report.captions) == len(report.seeds) == len(report.images) == 192
    for k, part in enumerate(("colour", "shape", "background")):
        confusion = report.confusion(part)
        assert confusion.shape == (len(PARTS[k]), len(PARTS[k]) + 1)
        assert torch.equal(confusion.diag(), torch.bincount(report.expected[:, k], minlength=len(PARTS[k])))
    assert report.summary().splitlines()[0].startswith("caption accuracy 100.0% (192 of 192 samples)")


@pytest.mark.parametrize("changed", [0, 1, 2])
def test_one_word_changed_scores_zero_for_that_part(changed):
    """A model that draws the caption with one word replaced by the next name: that part 0, the others 1."""
    def one_word_off(text: str, seed: int) -> np.ndarray:
        parts = list(parse_caption(text))
        parts[changed] = (parts[changed] + 1) % len(PARTS[changed])
        return draw_caption(caption(*(names[k] for names, k in zip(PARTS, parts))), seed)

    captions, _ = default_grid()
    report = caption_accuracy(one_word_off, captions, [0, 1], progress=False)
    part = ("colour", "shape", "background")[changed]
    assert report.accuracy == 0.0
    assert report.part_accuracy == {name: float(name != part) for name in report.part_accuracy}
    n = len(PARTS[changed])
    confusion = report.confusion(part)
    wanted = torch.bincount(report.expected[:, changed], minlength=n)
    assert torch.equal(confusion[torch.arange(n), (torch.arange(n) + 1) % n], wanted)  # every i read as i + 1
    assert confusion.sum() == wanted.sum() == len(report.captions)
    pairs = report.mistakes()[part]
    assert sum(pairs.values()) == len(report.captions)
    assert all(PARTS[changed].index(got) == (PARTS[changed].index(want) + 1) % n for want, got in pairs)


def test_an_empty_image_is_unmatched():
    """A model that draws only the background: colour and shape unmatched (the confusion's last column)."""
    def background_only(text: str, seed: int) -> np.ndarray:
        background = torch.tensor([BACKGROUNDS[PARTS[2][parse_caption(text)[2]]]])
        return to_uint8(compose(torch.full((1, 32, 32), 5.0), background, background))

    report = caption_accuracy(background_only, default_grid()[0], [0], progress=False)
    assert report.part_accuracy == {"colour": 0.0, "shape": 0.0, "background": 1.0}
    for k, part in enumerate(("colour", "shape")):
        confusion = report.confusion(part)
        assert torch.equal(confusion[:, -1], torch.bincount(report.expected[:, k], minlength=len(PARTS[k])))
        assert confusion[:, :-1].sum() == 0
        assert all(got == "?" for _, got in report.mistakes()[part])
    assert "no shape pixels" in report.detection.explain(0)


def test_caption_accuracy_refuses_bad_input():
    with pytest.raises(MiniditError, match="not a flux-tiny caption"):
        caption_accuracy(draw_caption, ["a red fox"], [0], progress=False)
    with pytest.raises(MiniditError, match="expected uint8"):
        caption_accuracy(lambda text, seed: np.zeros((1, 64, 64, 3), np.uint8), default_grid()[0][:1], [0],
                         progress=False)


def test_default_grid():
    """Every (colour, shape) pair once; each background 12 times, twice with every colour; the same every call."""
    captions, seeds = default_grid()
    assert (captions, seeds) == default_grid() and seeds == [0, 1, 2, 3]
    parts = torch.tensor([parse_caption(text) for text in captions])
    pairs = {(c, s) for c, s, _ in parts.tolist()}
    assert len(captions) == len(pairs) == len(COLOURS) * len(SHAPES)
    assert torch.bincount(parts[:, 2]).tolist() == [12] * len(BACKGROUNDS)
    assert torch.bincount(parts[:, 0] * len(BACKGROUNDS) + parts[:, 2]).tolist() == [2] * 24


def test_figure_frames_each_sample_by_its_result(tmp_path):
    """Green frames on the matches, red on the mismatches, exactly: counted by their pixels in the PNG."""
    def half_wrong(text: str, seed: int) -> np.ndarray:
        c, s, b = parse_caption(text)
        return draw_caption(caption(PARTS[0][c], PARTS[1][(s + seed) % len(SHAPES)], PARTS[2][b]), seed)

    captions = default_grid()[0][:30]  # two column blocks
    report = caption_accuracy(half_wrong, captions, [0, 1, 2], progress=False)
    assert int(report.correct.sum()) == 30  # seed 0 is right, seeds 1 and 2 draw another shape
    path = write_grid_figure(report, tmp_path / "accuracy.png", title="test")
    pixels = (imread(path)[..., :3] * 255).round().astype(int)
    frame = (accuracy.IMAGE_SIZE * accuracy.CELL_SCALE + 2 * accuracy.BORDER_PX) ** 2 - (
        accuracy.IMAGE_SIZE * accuracy.CELL_SCALE) ** 2  # pixels in one frame
    for rgb, count in [(accuracy.MATCH_RGB, 30), (accuracy.MISMATCH_RGB, 60)]:
        assert (pixels == rgb).all(-1).sum() == count * frame


class DrawingRecipe:
    """A stand-in for flux-tiny that draws its caption: the members `minidit.sample` and the command use."""

    name = "drawing"
    schedulers = ("exact",)
    default_scheduler = "exact"
    default_steps, default_guidance = 1, 0.0

    def __init__(self):
        self.prepared = None

    def prepare(self, prompts: list[str]) -> None:
        self.prepared = list(prompts)

    def make_scheduler(self, name: str, steps: int) -> None:
        return None

    def generate(self, prompts: list[str], seed: int, scheduler, guidance: float) -> torch.Tensor:
        return torch.cat([draw_captions(torch.tensor([parse_caption(p)]), torch.Generator().manual_seed(seed))
                          for p in prompts])

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(latents)


def test_command_end_to_end(monkeypatch, capsys, tmp_path):
    recipe = DrawingRecipe()
    monkeypatch.setattr(accuracy, "load_backbone", lambda name, weights_dir=None: recipe)
    out = tmp_path / "docs" / "acc.png"
    assert accuracy.main(["--out", str(out)]) == 0
    assert recipe.prepared == default_grid()[0]
    assert capsys.readouterr().out.startswith("caption accuracy 100.0% (192 of 192 samples)")
    assert imread(out).shape[2] in (3, 4)


def test_command_errors_are_one_line(capsys, tmp_path):
    assert accuracy.main(["--model", "no-such-model", "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown model 'no-such-model'")


def test_ragged_shape_matches_but_is_not_clean():
    """A drawn cross with its lower arm cut short (as flux-tiny sometimes draws one) is still the nearest shape and
    above SHAPE_MIN_IOU, so it matches its caption, but below CLEAN_IOU: it counts in accuracy, not in clean."""
    sdf = sdf_at(CROSS)
    y = torch.arange(32.0)[:, None] + 0.5
    sdf = torch.where(y > 16 + 0.55 * 11.0, sdf.abs() + 1, sdf)  # cut the lower arm 55% of the way down
    result = detect(red_on_black(sdf))
    assert result.parts[0].tolist() == [RED, CROSS, BLACK], result.explain(0)
    assert SHAPE_MIN_IOU <= result.shape_iou[0].max() < CLEAN_IOU
