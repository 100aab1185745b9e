"""flux-tiny's caption accuracy: how often a generated image shows what its caption says, read by an exact,
untrained detector of the drawn family (shapes.py).

    detect(images)                              -> DetectionResult: (colour, shape, background) of each image
    caption_accuracy(generate, captions, seeds) -> AccuracyReport: sample every (caption, seed), detect, compare
    recipe_generator(recipe)                    the `generate(caption, seed)` of a minidit recipe
    measure(recipe)                             caption_accuracy of a recipe over the default grid
    default_grid()                              the reported grid: 48 captions x 4 seeds
    write_grid_figure(report, path)             the samples, a green or red border each, a caption per row

    python -m minidit.tiny.accuracy [--model flux-tiny] [--steps N] [--out docs/flux-tiny-accuracy.png]

The detector inverts `shapes.compose`, where a pixel is background * (1 - c) + colour * c for the shape's
coverage c in [0, 1]:
1. background = the per-channel median of the 124 border pixels: a shape never covers more than a quarter of
   them (at most the triangle's base, 26 pixels), so the median is the background colour itself;
2. foreground = pixels farther than FOREGROUND_DISTANCE from it (every pixel at least half covered, whatever the
   two colours); the shape colour = the per-channel median of the foreground eroded by 2 pixels (by 1, or not at
   all, if nothing would be left): no anti-aliased edge, and in a blurred sample the purest pixels;
3. each colour is named by its nearest entry of COLOURS (shape) or BACKGROUNDS (background), in the largest
   per-channel difference, and is unmatched (-1) beyond COLOUR_MARGIN of the way to the next name;
4. coverage c = the projection of (pixel - background) on (colour - background), clamped to [0, 1]: for a drawn
   image, the exact coverage `compose` used;
5. shape = the best template: the coverage against every shape's coverage on a grid of centres and half-extents
   (one matmul), each shape's best grid point then refined to the vertex of a parabola through its neighbours
   on each axis and drawn there; unmatched (-1) below SHAPE_MIN_IOU.

IoU of soft coverages a and t is the Tanimoto ratio a.t / (|a|^2 + |t|^2 - a.t): the IoU for binary masks, and 1
only when a = t. A sample matches its caption when all three parts are named as the caption says; it is also
*clean* when its shape's IoU reaches CLEAN_IOU. The thresholds, and the margins measured on drawn images
(tests/test_tiny_accuracy.py):
- colours: the names are at least 0.35 (shape colours: orange, yellow) and 0.23 (backgrounds: black, dark green)
  apart in the largest channel difference; a colour is named when it is within COLOUR_MARGIN = 0.45 of that gap
  of its nearest name (0.158 and 0.104), so never of two names, and a colour halfway between two is neither. A
  drawn colour is within COLOUR_JITTER = 0.05 of its name; a sample's may miss by twice as much again.
- SHAPE_MIN_IOU = 0.8: the nearest shape is named when its IoU reaches it. Things that are no shape of the family
  stay below: two small circles side by side 0.72, a circle beside a square 0.68, a circle of half-extent 6 px
  (smaller than any drawn one) 0.76, blank or noise far below. An ellipse of aspect 1.35 reads as a circle (0.87).
- CLEAN_IOU = 0.92: above the best IoU a drawn image ever reaches with another shape's template (0.903, a
  square against the circle's; a diamond reaches 0.895 against the circle's), well below that of its own shape
  (0.977 at the lowest, a triangle): a clean sample is closer to its shape than any drawing of another shape
  ever is. Generated samples often fall between the two: the right shape with ragged edges or a stray line.
Drawn images blurred by a Gaussian of 1 px or with Gaussian noise of 0.05 (in [0, 1]) are still read right, and
clean. About 4000 images a second on one CPU core, half of it the matmul with the 6480 templates.

Shapes: images uint8 (B, 32, 32, 3), as recipes' `decode` returns them, or float (B, 3, 32, 32) in [-1, 1].
"""

import argparse
import functools
import math
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from minidit.analysis.figures import DPI
from minidit.analysis.rundir import atomic_file, make_folder
from minidit.api import load_backbone, sample
from minidit.errors import MiniditError, error_line
from minidit.pipelines.recipe import Recipe
from minidit.tiny.shapes import (
    BACKGROUNDS,
    COLOUR_JITTER,
    COLOURS,
    IMAGE_SIZE,
    JITTER,
    PARTS,
    SHAPES,
    SIZE_RANGE,
    caption,
    parse_caption,
    shape_distances,
)

PART_NAMES = ("colour", "shape", "background")  # the columns of `parts`, in caption order, as PARTS
UNMATCHED = -1  # a part's index when no name fits

_COLOUR_TABLE = torch.tensor(list(COLOURS.values()))  # (6, 3) RGB in [0, 1]
_BACKGROUND_TABLE = torch.tensor(list(BACKGROUNDS.values()))  # (4, 3)
# Half the smallest distance a shape colour can have from a background once both are jittered: a pixel farther
# than this from the background is at least half covered by the shape (0.19 for the tables of shapes.py).
FOREGROUND_DISTANCE = (torch.cdist(_COLOUR_TABLE, _BACKGROUND_TABLE).min().item()
                       - 2 * math.sqrt(3) * COLOUR_JITTER) / 2
COLOUR_MARGIN = 0.45  # a colour is named within this fraction of the gap to the next name (module docstring)
SHAPE_MIN_IOU = 0.8  # the best template's IoU needed to name a shape (the module docstring says why)
CLEAN_IOU = 0.92  # a clean sample's shape IoU: above any drawing's IoU with another shape's template


def naming_tolerance(table: torch.Tensor) -> float:
    """COLOUR_MARGIN of the smallest gap (largest channel difference) between two names of `table` (N, 3)."""
    gaps = (table[:, None] - table[None]).abs().amax(-1)
    return COLOUR_MARGIN * gaps[~torch.eye(len(table), dtype=torch.bool)].min().item()


COLOUR_TOLERANCE = naming_tolerance(_COLOUR_TABLE)  # 0.158 for the tables of shapes.py
BACKGROUND_TOLERANCE = naming_tolerance(_BACKGROUND_TABLE)  # 0.104

# The template grid: centres within the drawn jitter and a pixel more, half-extents a little beyond SIZE_RANGE.
CENTRE_STEP, RADIUS_STEP = 1.0, 0.5  # pixels; the parabola refines each shape's best point between them
CENTRE_SEARCH = JITTER + 1
RADIUS_SEARCH = (SIZE_RANGE[0] - 0.5, SIZE_RANGE[1] + 0.5)
CHUNK = 256  # images per matmul: bounds the (images, templates) IoU table to a few MB


# ---- the detector ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectionResult:
    """What `detect` read from each image, with the evidence, so that a failure can be explained.

    parts (B, 3): (colour, shape, background) indices into shapes.PARTS, UNMATCHED (-1) where no name fits.
    colour_rgb, background_rgb (B, 3): the measured colours in [0, 1] (NaN: no shape pixels).
    colour_error, background_error (B,): largest channel difference from the nearest name (inf: no shape pixels).
    shape_iou (B, 8): each shape's best template IoU, in SHAPES order.
    shape_fit (B, 8, 3): each shape's best template as (cx, cy, r) in pixels.
    """

    parts: torch.Tensor
    colour_rgb: torch.Tensor
    background_rgb: torch.Tensor
    colour_error: torch.Tensor
    background_error: torch.Tensor
    shape_iou: torch.Tensor
    shape_fit: torch.Tensor

    def __len__(self) -> int:
        return self.parts.shape[0]

    def words(self, i: int) -> tuple[str, str, str]:
        """Image i's (colour, shape, background) names, "?" where unmatched."""
        return tuple(names[k] if k != UNMATCHED else "?" for names, k in zip(PARTS, self.parts[i].tolist()))

    def explain(self, i: int) -> str:
        """One line, each part with its evidence, e.g. 'red (off by 0.03) circle (IoU 0.99; next square 0.88) on
        black (off by 0.01)'; an unmatched part names the nearest candidate: '? (purple, off by 0.35)'."""
        colour, shape, background = self.words(i)
        ious, order = self.shape_iou[i].sort(descending=True)
        shape_text = (f"{shape} (IoU {ious[0]:.2f}; next {PARTS[1][order[1]]} {ious[1]:.2f})" if shape != "?"
                      else f"? ({PARTS[1][order[0]]}, IoU {ious[0]:.2f} < {SHAPE_MIN_IOU})")
        return (f"{_colour_text(colour, self.colour_rgb[i], self.colour_error[i], 0)} {shape_text} on "
                f"{_colour_text(background, self.background_rgb[i], self.background_error[i], 2)}")


def _colour_text(word: str, rgb: torch.Tensor, error: torch.Tensor, part: int) -> str:
    if not error.isfinite():
        return "? (no shape pixels)"
    if word != "?":
        return f"{word} (off by {error:.2f})"
    index, _ = nearest(rgb[None], _COLOUR_TABLE if part == 0 else _BACKGROUND_TABLE)
    return f"? ({PARTS[part][index]}, off by {error:.2f})"


def as_unit_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) or float (B, 3, 32, 32) in [-1, 1] -> float32 (B, 3, 32, 32) in [0, 1]."""
    x = torch.as_tensor(images)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    if x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1:] == (*size, 3):
        return x.permute(0, 3, 1, 2).float() / 255
    if x.is_floating_point() and x.ndim == 4 and x.shape[1:] == (3, *size):
        return ((x.float() + 1) / 2).clamp(0, 1)
    raise MiniditError(f"images are {x.dtype} {tuple(x.shape)}: expected uint8 (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) "
                       f"or float (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1]")


def coverage(sdf: torch.Tensor) -> torch.Tensor:
    """A shape's coverage from its signed distance, as `shapes.compose` draws it."""
    return (0.5 - sdf).clamp(0, 1)


@functools.cache
def template_bank() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every shape's coverage on the grid (centres CENTRE_STEP apart, half-extents RADIUS_STEP apart), made once.

    Returns templates (8 * Nx * Ny * Nr, 32 * 32) in (shape, cx, cy, r) order, their squared norms, the centres
    (Nx,) (the same for x and y) and the half-extents (Nr,): 8 x 9 x 9 x 10 templates, 27 MB.
    """
    centres = IMAGE_SIZE / 2 + torch.arange(-CENTRE_SEARCH, CENTRE_SEARCH + 1e-6, CENTRE_STEP)
    radii = torch.arange(RADIUS_SEARCH[0], RADIUS_SEARCH[1] + 1e-6, RADIUS_STEP)
    cx, cy, r = (g.reshape(-1, 1, 1) for g in torch.meshgrid(centres, centres, radii, indexing="ij"))
    templates = coverage(shape_distances(cx, cy, r)).transpose(0, 1).flatten(2)  # (S, P, H W)
    templates = templates.flatten(0, 1).contiguous()
    return templates, (templates * templates).sum(1), centres, radii


def tanimoto(dot: torch.Tensor, a_norm: torch.Tensor, t_norm: torch.Tensor) -> torch.Tensor:
    """IoU of soft masks from their dot product and squared norms (0 when both are empty)."""
    return dot / (a_norm + t_norm - dot).clamp_min(1e-12)


def nearest(rgb: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (B,) of the entry of `table` (N, 3) nearest to each colour (B, 3) in the largest channel difference,
    and that difference (inf for a NaN colour)."""
    error, index = (rgb[:, None] - table[None]).abs().amax(-1).nan_to_num(math.inf).min(1)
    return index, error


def _name(rgb: torch.Tensor, table: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest`, UNMATCHED beyond `tolerance`."""
    index, error = nearest(rgb, table)
    return torch.where(error <= tolerance, index, UNMATCHED), error


def _vertex(f_minus: torch.Tensor, f0: torch.Tensor, f_plus: torch.Tensor) -> torch.Tensor:
    """Offset in grid steps, within [-1/2, 1/2], of the maximum of the parabola through (-1, 0, 1) -> f."""
    curvature = f_minus - 2 * f0 + f_plus
    offset = 0.5 * (f_minus - f_plus) / curvature.clamp(max=-1e-9)
    return torch.where(curvature < 0, offset, 0.0).clamp(-0.5, 0.5)


def _fit_shapes(cover: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each shape's best template for coverages (B, 32, 32): IoU (B, 8) and (cx, cy, r) (B, 8, 3)."""
    templates, t_norm, centres, radii = template_bank()
    b, s, nc, nr = cover.shape[0], len(SHAPES), len(centres), len(radii)
    a = cover.flatten(1)
    a_norm = (a * a).sum(1, keepdim=True)
    grid = tanimoto(a @ templates.T, a_norm, t_norm).reshape(b, s, nc, nc, nr)  # (B, S, cx, cy, r)

    best = grid.flatten(2).argmax(2)  # (B, S)
    index = torch.stack(torch.unravel_index(best, (nc, nc, nr)), -1)  # (B, S, 3): grid indices of cx, cy, r
    sizes = torch.tensor([nc, nc, nr])
    bi, si = torch.arange(b)[:, None], torch.arange(s)[None]
    at = lambda k: grid[bi, si, k[..., 0], k[..., 1], k[..., 2]]  # IoU at grid indices (B, S, 3)
    coarse_iou = at(index)
    offsets = []
    for axis in range(3):  # a parabola along each axis, where both neighbours exist
        step = torch.zeros(3, dtype=torch.long)
        step[axis] = 1
        inside = (index[..., axis] > 0) & (index[..., axis] < sizes[axis] - 1)
        lo, hi = (index - step).clamp_min(0), torch.minimum(index + step, sizes - 1)
        offsets.append(torch.where(inside, _vertex(at(lo), coarse_iou, at(hi)), 0.0))
    steps = torch.tensor([CENTRE_STEP, CENTRE_STEP, RADIUS_STEP])
    grid_fit = torch.stack([centres[index[..., 0]], centres[index[..., 1]], radii[index[..., 2]]], -1)
    fit = grid_fit + torch.stack(offsets, -1) * steps  # (B, S, 3)

    pixel = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    dx = (pixel - fit[..., 0, None, None]).expand(b, s, IMAGE_SIZE, IMAGE_SIZE)
    dy = (pixel[:, None] - fit[..., 1, None, None]).expand(b, s, IMAGE_SIZE, IMAGE_SIZE)
    r = fit[..., 2, None, None]
    drawn = torch.stack([f(dx[:, k], dy[:, k], r[:, k]) for k, f in enumerate(SHAPES.values())], 1)
    drawn = coverage(drawn).flatten(2)  # (B, S, H W): each shape at its refined fit
    refined_iou = tanimoto((drawn * a[:, None]).sum(2), a_norm, (drawn * drawn).sum(2))
    better = refined_iou > coarse_iou  # the parabola's vertex is a guess: keep the grid point if it is better
    return torch.where(better, refined_iou, coarse_iou), torch.where(better[..., None], fit, grid_fit)


@torch.no_grad()
def detect(images: np.ndarray | torch.Tensor) -> DetectionResult:
    """Read (colour, shape, background) from images of shapes.py's caption family (the module docstring says how)."""
    x = as_unit_images(images)
    chunks = [_detect(x[i:i + CHUNK]) for i in range(0, max(len(x), 1), CHUNK)]
    return DetectionResult(*(torch.cat(parts) for parts in zip(*chunks)))


def _detect(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)  # (B, 3, 124)
    background = border.median(2).values  # (B, 3)
    offset = x - background[:, :, None, None]  # (B, 3, H, W)
    foreground = (offset * offset).sum(1) > FOREGROUND_DISTANCE**2  # (B, H, W)
    pick = foreground
    for size in (3, 5):  # the foreground eroded by 1 pixel, then by 2, as long as anything is left
        eroded = -F.max_pool2d(-foreground[:, None].float(), size, stride=1, padding=size // 2)[:, 0] > 0.5
        pick = torch.where(eroded.flatten(1).any(1)[:, None, None], eroded, pick)
    colour = x.flatten(2).where(pick.flatten(1)[:, None], math.nan).nanmedian(2).values  # (B, 3); NaN: no shape

    direction = (colour - background).nan_to_num(0.0)  # (B, 3); 0 when there is no shape
    length2 = (direction * direction).sum(1).clamp_min(1e-12)
    cover = ((offset * direction[:, :, None, None]).sum(1) / length2[:, None, None]).clamp(0, 1)  # (B, H, W)
    shape_iou, shape_fit = _fit_shapes(cover)

    colour_index, colour_error = _name(colour, _COLOUR_TABLE, COLOUR_TOLERANCE)
    background_index, background_error = _name(background, _BACKGROUND_TABLE, BACKGROUND_TOLERANCE)
    best_iou, shape_index = shape_iou.max(1)
    shape_index = torch.where(best_iou >= SHAPE_MIN_IOU, shape_index, UNMATCHED)
    parts = torch.stack([colour_index, shape_index, background_index], 1)
    return parts, colour, background, colour_error, background_error, shape_iou, shape_fit


# ---- caption accuracy ------------------------------------------------------------------------------------------

Generate = Callable[[str, int], np.ndarray]  # (caption, seed) -> uint8 (1, 32, 32, 3)


@dataclass(frozen=True)
class AccuracyReport:
    """Samples of (caption, seed) pairs, what was detected in each, and how often it matched.

    captions, seeds: per sample (N,); images uint8 (N, 32, 32, 3); expected (N, 3) indices into shapes.PARTS.
    """

    captions: list[str]
    seeds: list[int]
    images: np.ndarray
    expected: torch.Tensor
    detection: DetectionResult
    matches: torch.Tensor = field(init=False)  # (N, 3) bool: each part detected as its caption says

    def __post_init__(self):
        object.__setattr__(self, "matches", self.detection.parts == self.expected)

    @property
    def correct(self) -> torch.Tensor:
        """(N,) bool: shape, colour and background all match."""
        return self.matches.all(1)

    @property
    def accuracy(self) -> float:
        return self.correct.float().mean().item()

    @property
    def clean(self) -> torch.Tensor:
        """(N,) bool: correct, and the shape drawn as closely as CLEAN_IOU."""
        rows = torch.arange(len(self.expected))
        return self.correct & (self.detection.shape_iou[rows, self.expected[:, 1]] >= CLEAN_IOU)

    @property
    def clean_accuracy(self) -> float:
        return self.clean.float().mean().item()

    @property
    def part_accuracy(self) -> dict[str, float]:
        return {name: self.matches[:, k].float().mean().item() for k, name in enumerate(PART_NAMES)}

    def confusion(self, part: str) -> torch.Tensor:
        """(n, n + 1) counts of the part's expected name (rows) against the detected one (columns, the last one
        UNMATCHED), in PARTS order."""
        k = PART_NAMES.index(part)
        n = len(PARTS[k])
        detected = self.detection.parts[:, k].where(self.detection.parts[:, k] != UNMATCHED, n)
        return torch.bincount(self.expected[:, k] * (n + 1) + detected, minlength=n * (n + 1)).reshape(n, n + 1)

    def mistakes(self) -> dict[str, Counter]:
        """Per part, how often each (expected, detected) name pair occurred among the mismatches."""
        out = {}
        for k, name in enumerate(PART_NAMES):
            wrong = (~self.matches[:, k]).nonzero()[:, 0].tolist()
            out[name] = Counter((PARTS[k][self.expected[i, k]], self.detection.words(i)[k]) for i in wrong)
        return out

    def summary(self) -> str:
        """The overall and per-part accuracy, then the confusions, most frequent first."""
        n = len(self.captions)
        parts = ", ".join(f"{name} {value:.1%}" for name, value in self.part_accuracy.items())
        lines = [f"caption accuracy {self.accuracy:.1%} ({int(self.correct.sum())} of {n} samples); {parts}; "
                 f"clean (shape IoU >= {CLEAN_IOU}) {self.clean_accuracy:.1%}"]
        for part, counts in self.mistakes().items():
            if counts:
                pairs = ", ".join(f"{want} -> {got} x{c}" for (want, got), c in counts.most_common())
                lines.append(f"  {part} confusions: {pairs}")
        return "\n".join(lines)


def caption_accuracy(generate: Generate, captions: Sequence[str], seeds: Sequence[int],
                     progress: bool = True) -> AccuracyReport:
    """Generate every caption with every seed (caption-major) and compare what `detect` reads with the caption."""
    expected = []
    for text in captions:
        parts = parse_caption(text)
        if parts is None:
            example = caption(*(names[0] for names in PARTS))
            raise MiniditError(f"{text!r} is not a flux-tiny caption: expected one like {example!r}")
        expected.append(parts)
    pairs = [(text, seed) for text in captions for seed in seeds]
    if not pairs:
        raise MiniditError("caption_accuracy needs at least one caption and one seed")
    images = []
    for text, seed in tqdm(pairs, desc="sampling", disable=None if progress else True):
        image = np.asarray(generate(text, seed))
        if image.dtype != np.uint8 or image.shape != (1, IMAGE_SIZE, IMAGE_SIZE, 3):
            raise MiniditError(f"generate({text!r}, {seed}) gave {image.dtype} {image.shape}: expected uint8 "
                               f"(1, {IMAGE_SIZE}, {IMAGE_SIZE}, 3)")
        images.append(image[0])
    images = np.stack(images)
    expected = torch.tensor(expected).repeat_interleave(len(seeds), 0)
    return AccuracyReport([t for t, _ in pairs], [s for _, s in pairs], images, expected, detect(images))


def recipe_generator(recipe: Recipe, steps: int | None = None, scheduler: str | None = None,
                     guidance: float | None = None) -> Generate:
    """`generate(caption, seed)` from a minidit recipe: `minidit.sample` (the recipe's defaults where None), decoded."""
    def generate(text: str, seed: int) -> np.ndarray:
        latents, _ = sample(recipe, text, steps=steps, scheduler=scheduler, guidance=guidance, seed=seed)
        return recipe.decode(latents)

    return generate


DEFAULT_SEEDS = (0, 1, 2, 3)


def default_grid() -> tuple[list[str], list[int]]:
    """The reported grid: 48 captions x seeds 0-3 = 192 samples.

    Every (colour, shape) pair once, since binding a colour to a shape is what a text-to-image model gets wrong,
    with background (colour + shape) mod 4: each background 12 times, twice with each colour and once or twice
    with each shape. Four seeds per caption tell a caption the model cannot draw (wrong on every seed) from
    occasional misses; 192 samples put the standard error of an accuracy p at most 3.6 points (sqrt(p(1-p)/192)).
    """
    colours, shapes, backgrounds = PARTS
    captions = [caption(c, s, backgrounds[(i + j) % len(backgrounds)])
                for i, c in enumerate(colours) for j, s in enumerate(shapes)]
    return captions, list(DEFAULT_SEEDS)


# ---- the figure ------------------------------------------------------------------------------------------------

CELL_SCALE = 2  # 32 x 32 samples drawn at 64 x 64, pixel for pixel
BORDER_PX = 3  # the frame: green, all three parts match; red, one or more do not
MATCH_RGB, MISMATCH_RGB = (0, 150, 0), (210, 0, 0)  # no drawn image has such a pixel, so frames can be counted
BLOCK_ROWS = 24  # captions per column block: the default grid's 48 in two blocks side by side
# Layout in pixels at DPI 120: gaps, the note under a sample (two lines of 6.5 pt), the captions' column, a title
# line (9 pt); and how many characters fit a line of a caption (8 pt), of a note, and a title character's width.
PAD, NOTE_H, CAPTION_W, LINE_H = 8, 26, 215, 18
CAPTION_CHARS, NOTE_CHARS, TITLE_CHAR_W = 27, 16, 8


def write_grid_figure(report: AccuracyReport, path: str | Path, title: str | None = None) -> Path:
    """The samples, a row per caption (wrapped on two lines at its left) and a column per seed, each framed green
    (all three parts read as the caption says) or red (the parts read otherwise written under it).
    Rows run down blocks of BLOCK_ROWS side by side; pixels are placed 1:1 (`figimage`)."""
    captions, seeds = list(dict.fromkeys(report.captions)), list(dict.fromkeys(report.seeds))
    where = {pair: i for i, pair in enumerate(zip(report.captions, report.seeds))}
    cell = IMAGE_SIZE * CELL_SCALE + 2 * BORDER_PX
    row_h, block_w = cell + NOTE_H, CAPTION_W + len(seeds) * (cell + PAD) + PAD
    blocks, rows = math.ceil(len(captions) / BLOCK_ROWS), min(len(captions), BLOCK_ROWS)
    width = blocks * block_w + PAD
    parts = ", ".join(f"{name} {value:.0%}" for name, value in report.part_accuracy.items())
    head = (f"{title + ': ' if title else ''}{int(report.correct.sum())} of {len(report.captions)} samples match "
            f"their caption ({report.accuracy:.1%}); {parts}; {report.clean_accuracy:.0%} clean (shape IoU >= "
            f"{CLEAN_IOU}). Green frame: colour, shape and background all read as the caption says; red: the parts "
            "read otherwise are under the image.")
    head = textwrap.fill(head, max(40, width // TITLE_CHAR_W))
    title_h = LINE_H * (head.count("\n") + 1) + PAD + LINE_H  # the title, then the seed labels
    height = title_h + rows * row_h + PAD
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    fig.text(0.5, 1 - PAD / height, head, ha="center", va="top", fontsize=9)

    for block in range(blocks):
        for c, seed in enumerate(seeds):
            x = PAD + block * block_w + CAPTION_W + c * (cell + PAD)
            fig.text((x + cell / 2) / width, (height - title_h + 2) / height, f"seed {seed}", ha="center",
                     va="bottom", fontsize=8)
    for r, text in enumerate(captions):
        block, row = divmod(r, BLOCK_ROWS)
        x0, top = PAD + block * block_w, height - title_h - row * row_h  # figimage counts pixels from the bottom
        fig.text((x0 + CAPTION_W - PAD) / width, (top - cell / 2) / height, textwrap.fill(text, CAPTION_CHARS),
                 ha="right", va="center", fontsize=8)
        for c, seed in enumerate(seeds):
            i = where.get((text, seed))
            if i is None:
                continue
            image = np.repeat(np.repeat(report.images[i], CELL_SCALE, 0), CELL_SCALE, 1)
            framed = np.empty((cell, cell, 3), np.uint8)
            framed[...] = MATCH_RGB if report.correct[i] else MISMATCH_RGB
            framed[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = image
            x = x0 + CAPTION_W + c * (cell + PAD)
            fig.figimage(framed, xo=x, yo=top - cell, origin="upper")
            if not report.correct[i]:
                read = zip(PART_NAMES, report.detection.words(i), report.matches[i])
                wrong = [word if word != "?" else f"no {part}" for part, word, ok in read if not ok]
                note = textwrap.fill(", ".join(wrong), NOTE_CHARS)
                fig.text((x + cell / 2) / width, (top - cell - 2) / height, note, ha="center", va="top",
                         fontsize=6.5, color="#b00000", linespacing=1.0)
    path = Path(path)
    make_folder(path.parent)
    with atomic_file(path) as f:  # a failed write leaves no half-written image
        fig.savefig(f, format=path.suffix.lstrip(".") or None, dpi=DPI, facecolor="white")
    return path


# ---- the command -----------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-tiny", help="a text-to-image model drawing shapes.py's captions "
                                                        "(default: flux-tiny)")
    p.add_argument("--weights", metavar="DIR", help="a local folder in the model's Hub layout instead of the default")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--scheduler", help="sampler name (default: the model's own)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--out", default="docs/flux-tiny-accuracy.png", help="the figure (default: %(default)s)")
    return p.parse_args(argv)


def measure(recipe: Recipe, steps: int | None = None, scheduler: str | None = None,
            guidance: float | None = None) -> AccuracyReport:
    """The caption accuracy of a recipe over `default_grid()` (its own defaults where None)."""
    captions, seeds = default_grid()
    recipe.prepare(captions)  # e.g. encode each caption once, not once per seed
    return caption_accuracy(recipe_generator(recipe, steps, scheduler, guidance), captions, seeds)


def run(args: argparse.Namespace) -> AccuracyReport:
    recipe = load_backbone(args.model, weights_dir=args.weights)
    report = measure(recipe, args.steps, args.scheduler, args.guidance)
    print(report.summary())
    print(f"figure: {write_grid_figure(report, args.out, title=args.model)}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (MiniditError, OSError) as e:  # OSError: a file-system failure at a place that does not report its own
        print(error_line(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
