"""Procedurally drawn shapes: the training data of the embedded tiny models, drawn a whole batch at a time.

One axis-aligned shape of `SHAPES` on a plain background, 32x32 RGB in [-1, 1], anti-aliased through signed
distances (a shape may touch the border).
- dit-tiny (`draw_shapes`): a class label per image; any bright hue on any dark background.
- flux-tiny (`draw_captions`): a caption per image, "a red circle on a dark blue background", which determines it:
  the shape, the shape's colour among `COLOURS` and the background's among `BACKGROUNDS` (each a named colour
  with a little jitter); size and position vary as for dit-tiny. 8 shapes x 6 colours x 4 backgrounds = 192
  captions, and two captions that differ in one word give different images.

Shapes: images (n, 3, 32, 32) in [-1, 1]; labels (n,); captions as (n, 3) indices (colour, shape, background).
"""

import math

import torch

IMAGE_SIZE = 32
SIZE_RANGE = (9.5, 13.0)  # half-extent r in pixels (every shape fits in a (2r)^2 box)
JITTER = 3.0  # the shape's centre is within this many pixels of the image centre, on each axis
BAR_HALF_WIDTH = 0.3  # bars and cross arms: half-thickness as a fraction of r
SQUARE_HALF_SIDE = 0.85  # so a square does not look much bigger than a circle of the same r
RING_INNER = 0.5  # inner radius of the ring as a fraction of r

# dit-tiny's colours
BACKGROUND_MAX = 0.35  # background channels uniform in [0, BACKGROUND_MAX]: a dark, muted colour
SATURATION_RANGE = (0.6, 1.0)  # the shape's colour in HSV: any hue, saturated and bright
VALUE_RANGE = (0.75, 1.0)

# flux-tiny's colours: RGB in [0, 1], each channel jittered by up to COLOUR_JITTER
COLOURS = {"red": (0.9, 0.12, 0.1), "orange": (1.0, 0.55, 0.05), "yellow": (0.95, 0.9, 0.15),
           "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.4, 1.0), "purple": (0.65, 0.25, 0.9)}
BACKGROUNDS = {"black": (0.04, 0.04, 0.04), "dark blue": (0.05, 0.1, 0.35), "dark green": (0.05, 0.27, 0.1),
               "dark red": (0.33, 0.05, 0.06)}
COLOUR_JITTER = 0.05


def _box(dx: torch.Tensor, dy: torch.Tensor, half_w: torch.Tensor, half_h: torch.Tensor) -> torch.Tensor:
    return torch.maximum(dx.abs() - half_w, dy.abs() - half_h)


def _triangle(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Upward isosceles triangle filling its (2r)^2 box: apex at the top centre, base along the bottom."""
    side = math.sqrt(5)  # the slanted edges have outward normals (+-2, -1) / sqrt(5), y pointing down
    return torch.stack([dy - r, (2 * dx - dy - r) / side, (-2 * dx - dy - r) / side]).amax(0)


# Signed distance in pixels (negative inside) of each shape, from the offsets (dx, dy) to the centre and r.
SHAPES = {
    "circle": lambda dx, dy, r: torch.hypot(dx, dy) - r,
    "square": lambda dx, dy, r: _box(dx, dy, SQUARE_HALF_SIDE * r, SQUARE_HALF_SIDE * r),
    "triangle": _triangle,
    "cross": lambda dx, dy, r: torch.minimum(_box(dx, dy, r, BAR_HALF_WIDTH * r), _box(dx, dy, BAR_HALF_WIDTH * r, r)),
    "ring": lambda dx, dy, r: (torch.hypot(dx, dy) - (1 + RING_INNER) / 2 * r).abs() - (1 - RING_INNER) / 2 * r,
    "horizontal bar": lambda dx, dy, r: _box(dx, dy, r, BAR_HALF_WIDTH * r),
    "vertical bar": lambda dx, dy, r: _box(dx, dy, BAR_HALF_WIDTH * r, r),
    "diamond": lambda dx, dy, r: (dx.abs() + dy.abs() - r) / math.sqrt(2),
}
CLASSES = tuple(SHAPES)  # dit-tiny's class names, in label order


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def signed_distances(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, shapes, 32, 32): every shape's signed distance at one random size and centre per image."""
    r = _uniform((n, 1, 1), *SIZE_RANGE, generator)
    cx = IMAGE_SIZE / 2 + _uniform((n, 1, 1), -JITTER, JITTER, generator)
    cy = IMAGE_SIZE / 2 + _uniform((n, 1, 1), -JITTER, JITTER, generator)
    return shape_distances(cx, cy, r)


def shape_distances(cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(n, shapes, 32, 32) signed distances of every shape at centres (cx, cy) and half-extents r, each (n, 1, 1)."""
    n = r.shape[0]
    pixel = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5  # pixel centres
    dx = (pixel[None, None, :] - cx).expand(n, IMAGE_SIZE, IMAGE_SIZE)
    dy = (pixel[None, :, None] - cy).expand(n, IMAGE_SIZE, IMAGE_SIZE)
    return torch.stack([f(dx, dy, r) for f in SHAPES.values()], dim=1)


def compose(sdf: torch.Tensor, shape_rgb: torch.Tensor, background_rgb: torch.Tensor) -> torch.Tensor:
    """Images (n, 3, 32, 32) in [-1, 1] from a shape's signed distance (n, 32, 32) and colours (n, 3) in [0, 1]."""
    coverage = (0.5 - sdf).clamp(0, 1)[:, None]  # (n, 1, H, W): a one-pixel anti-aliased edge
    image = background_rgb[:, :, None, None] * (1 - coverage) + shape_rgb[:, :, None, None] * coverage
    return image * 2 - 1


# ---- dit-tiny: a class label per image -----------------------------------------------------------------

def _any_colours(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Background and shape colours (n, 3) in [0, 1]: a dark background, a bright shape of any hue."""
    background = BACKGROUND_MAX * torch.rand(n, 3, generator=generator)
    hue = torch.rand(n, 1, generator=generator)
    saturation = _uniform((n, 1), *SATURATION_RANGE, generator)
    value = _uniform((n, 1), *VALUE_RANGE, generator)
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * hue) % 6  # HSV -> RGB, the (R, G, B) sectors
    shape = value * (1 - saturation * torch.minimum(k, 4 - k).clamp(0, 1))
    return background, shape


def draw_shapes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """dit-tiny's data: n random images (n, 3, 32, 32) in [-1, 1] and their class labels (n,)."""
    labels = torch.randint(len(CLASSES), (n,), generator=generator)
    sdf = signed_distances(n, generator)[torch.arange(n), labels]  # (n, H, W)
    background, shape = _any_colours(n, generator)
    return compose(sdf, shape, background), labels


# ---- flux-tiny: a caption per image --------------------------------------------------------------------

PARTS = (tuple(COLOURS), CLASSES, tuple(BACKGROUNDS))  # the words a caption picks from, in caption order


def caption(colour: str, shape: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def all_captions() -> list[str]:
    """The 192 captions, colour slowest, background fastest."""
    return [caption(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def caption_index(parts: torch.Tensor) -> torch.Tensor:
    """(n,) rows of `all_captions()` of captions given as (n, 3) (colour, shape, background) indices."""
    return (parts[:, 0] * len(SHAPES) + parts[:, 1]) * len(BACKGROUNDS) + parts[:, 2]


def parse_caption(text: str) -> tuple[int, int, int] | None:
    """(colour, shape, background) indices of a caption of `caption`'s form, or None if it is not one."""
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            for k, b in enumerate(BACKGROUNDS):
                if text == caption(c, s, b):
                    return i, j, k
    return None


def random_parts(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) random (colour, shape, background) indices, each uniform."""
    return torch.stack([torch.randint(len(p), (n,), generator=generator) for p in PARTS], dim=1)


def _named(table: dict[str, tuple[float, float, float]], index: torch.Tensor, generator: torch.Generator):
    rgb = torch.tensor(list(table.values()))[index]  # (n, 3)
    return (rgb + _uniform(rgb.shape, -COLOUR_JITTER, COLOUR_JITTER, generator)).clamp(0, 1)


def draw_captions(parts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """flux-tiny's data: the images (n, 3, 32, 32) in [-1, 1] of captions given as (n, 3) indices."""
    n = parts.shape[0]
    sdf = signed_distances(n, generator)[torch.arange(n), parts[:, 1]]
    return compose(sdf, _named(COLOURS, parts[:, 0], generator), _named(BACKGROUNDS, parts[:, 2], generator))
