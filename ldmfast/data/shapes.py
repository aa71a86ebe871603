"""A built-in toy data set: one coloured shape on a plain background, with a caption.

Every sample is a pure function of ``(seed, split, index)``: its attributes come from a
counter-based hash (splitmix64) evaluated for a whole batch of indices at once, and drawing is
vectorised over the batch with anti-aliased coverage from 2x2 supersampling, so a batch of 64
images costs a few milliseconds and a training run can start at any step without replaying the
stream.

Images are 64x64 RGB in [-1, 1]. Attributes: a shape (circle, square, triangle), an object
colour (seven named colours), a background colour from a separate dark/grey palette (so the
object always stands out), a size (small, large) and a position (left, right, top, bottom,
center). Captions name the colour and shape and, for some samples, the size and the position:
"a red circle", "a small blue square on the left".

The ``HELDOUT`` (colour, shape) pairs never occur in the "train" split; the "heldout" split
holds only them, the "val" split every pair, so a model can be tested on compositions it never
saw. ``judge(image)`` reads (colour, shape) back from pixels, for quality tests of generated
images.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["COLOURS", "BACKGROUNDS", "SHAPES", "SIZES", "POSITIONS", "HELDOUT", "IMAGE_SIZE",
           "pairs", "vocabulary", "attributes", "render", "caption", "ShapesBatches",
           "ShapesDataset", "judge", "judge_batch"]

IMAGE_SIZE = 64

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 180, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
# Dark and neutral backgrounds: every one is at least ~100 (RGB, 0..255) from every object colour.
BACKGROUNDS = {
    "black": (12, 12, 12),
    "dark grey": (64, 64, 64),
    "grey": (110, 110, 110),
    "navy": (16, 24, 64),
    "brown": (64, 40, 24),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
HELDOUT = (("green", "triangle"), ("purple", "circle"), ("orange", "square"))
SPLITS = {"train": 0, "val": 1, "heldout": 2}

_COLOUR_NAMES = tuple(COLOURS)
_BG_NAMES = tuple(BACKGROUNDS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_BG_RGB = np.array([BACKGROUNDS[c] for c in _BG_NAMES], dtype=np.float32)
# Half-extent (pixels) of the object's bounding box, drawn uniformly from these ranges.
_RADIUS = {"small": (7.0, 10.0), "large": (15.0, 21.0)}
# Nominal centre as a fraction of the side, per position; jittered by +-3 px, then clamped so
# that the object stays inside the image.
_CENTRE = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
           "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
_JITTER = 3.0


def pairs(split: str = "train"):
    """The (colour, shape) pairs a split draws from."""
    every = [(c, s) for c in _COLOUR_NAMES for s in SHAPES]
    if split == "train":
        return [p for p in every if p not in HELDOUT]
    if split == "val":
        return every
    if split == "heldout":
        return list(HELDOUT)
    raise ValueError(f"unknown split {split!r} (train, val, heldout)")


def vocabulary():
    """Every word a caption can contain, in a fixed order (the tokenizer's vocabulary)."""
    words = ["a"] + list(_COLOUR_NAMES) + list(SHAPES) + list(SIZES)
    for phrase in _POSITION_PHRASE.values():
        words += [w for w in phrase.split() if w not in words]
    return words


# ----------------------------------------------------------------------------- random numbers

def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s splitmix64 finaliser: a bijective 64-bit mix, wrapping arithmetic."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, split: int, index: np.ndarray, field: int) -> np.ndarray:
    """U[0, 1) for each index, independent across (seed, split, field)."""
    key = _splitmix64(np.uint64(seed & 0xFFFFFFFF) * np.uint64(1 << 20)
                      + np.uint64(split * 1024 + field))
    h = _splitmix64(index.astype(np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def attributes(indices, seed: int = 0, split: str = "train") -> dict:
    """The attributes of samples ``indices`` (ints >= 0) as arrays, for ``render``/``caption``.

    Keys: colour, shape, background, size, position, template (ints indexing the tuples above);
    radius, cx, cy (float pixels)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if (idx < 0).any():
        raise ValueError("sample indices must be >= 0")
    sid = SPLITS.get(split)
    if sid is None:
        raise ValueError(f"unknown split {split!r} (train, val, heldout)")
    u = [_uniform(seed, sid, idx, f) for f in range(9)]
    allowed = pairs(split)
    pair = np.minimum((u[0] * len(allowed)).astype(np.int64), len(allowed) - 1)
    colour = np.array([_COLOUR_NAMES.index(allowed[p][0]) for p in pair], dtype=np.int64)
    shape = np.array([SHAPES.index(allowed[p][1]) for p in pair], dtype=np.int64)
    background = np.minimum((u[1] * len(_BG_NAMES)).astype(np.int64), len(_BG_NAMES) - 1)
    size = (u[2] < 0.5).astype(np.int64)  # 0 small, 1 large
    position = np.minimum((u[3] * len(POSITIONS)).astype(np.int64), len(POSITIONS) - 1)
    lo = np.where(size == 1, _RADIUS["large"][0], _RADIUS["small"][0])
    hi = np.where(size == 1, _RADIUS["large"][1], _RADIUS["small"][1])
    radius = lo + (hi - lo) * u[4]
    centre = np.array([_CENTRE[p] for p in POSITIONS])[position] * IMAGE_SIZE
    cx = centre[:, 0] + (2 * u[5] - 1) * _JITTER
    cy = centre[:, 1] + (2 * u[6] - 1) * _JITTER
    # keep a 1-pixel margin around the bounding box
    cx = np.clip(cx, radius + 1, IMAGE_SIZE - 1 - radius)
    cy = np.clip(cy, radius + 1, IMAGE_SIZE - 1 - radius)
    template = np.minimum((u[7] * 4).astype(np.int64), 3)
    return {"colour": colour, "shape": shape, "background": background, "size": size,
            "position": position, "template": template, "radius": radius, "cx": cx, "cy": cy}


def caption(attrs: dict, i: int) -> str:
    """The caption of sample i of ``attrs``: "a [size] colour shape [position phrase]"."""
    words = ["a"]
    t = int(attrs["template"][i])
    if t in (1, 3):
        words.append(SIZES[int(attrs["size"][i])])
    words += [_COLOUR_NAMES[int(attrs["colour"][i])], SHAPES[int(attrs["shape"][i])]]
    if t in (2, 3):
        words.append(_POSITION_PHRASE[POSITIONS[int(attrs["position"][i])]])
    return " ".join(words)


def _coverage(attrs: dict, size: int) -> np.ndarray:
    """Fraction (B, H, W) of each pixel inside the object, from 2x2 subsamples per pixel."""
    cx = attrs["cx"].astype(np.float32)[:, None, None]
    cy = attrs["cy"].astype(np.float32)[:, None, None]
    r = attrs["radius"].astype(np.float32)[:, None, None]
    shape = attrs["shape"][:, None, None]
    step = np.float32(IMAGE_SIZE / size)  # geometry is defined on the 64x64 grid
    base = np.arange(size, dtype=np.float32)
    cover = np.zeros((len(attrs["cx"]), size, size), dtype=np.float32)
    for oy in (0.25, 0.75):
        for ox in (0.25, 0.75):
            dx = ((base + np.float32(ox)) * step)[None, None, :] - cx
            dy = ((base + np.float32(oy)) * step)[None, :, None] - cy
            circle = dx * dx + dy * dy <= r * r
            square = (np.abs(dx) <= r) & (np.abs(dy) <= r)
            # apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r): the half
            # width grows linearly from 0 at the apex to r at the base
            triangle = (dy <= r) & (np.abs(dx) <= (dy + r) * np.float32(0.5))
            inside = np.where(shape == 0, circle, np.where(shape == 1, square, triangle))
            cover += inside
    return cover * 0.25


def render(attrs: dict, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images (B, 3, size, size) float32 in [-1, 1] for ``attrs`` (the same scene at any size:
    the geometry lives on the 64x64 grid)."""
    cover = _coverage(attrs, size)[:, None]
    fg = _COLOUR_RGB[attrs["colour"]][:, :, None, None]
    bg = _BG_RGB[attrs["background"]][:, :, None, None]
    img = np.rint(bg + (fg - bg) * cover)  # on the 8-bit grid, as a PNG of it would read back
    return torch.from_numpy(img).div_(127.5).sub_(1.0)


class ShapesBatches:
    """Fast batches of one split: ``batch(indices)`` -> {"image", "caption", "colour", "shape",
    "label", "index"}.

    ``for_step(step, batch_size, rank, world)`` gives the batch a training step uses: indices
    ``[(step * world + rank) * batch_size, ...)``, so each rank sees distinct samples and a
    resumed run continues the stream exactly.
    """

    def __init__(self, split: str = "train", seed: int = 0, size: int = IMAGE_SIZE):
        pairs(split)  # validates the name
        self.split, self.seed, self.size = split, int(seed), size

    def batch(self, indices) -> dict:
        attrs = attributes(indices, self.seed, self.split)
        n = len(attrs["cx"])
        return {"image": render(attrs, self.size),
                "caption": [caption(attrs, i) for i in range(n)],
                "colour": [_COLOUR_NAMES[c] for c in attrs["colour"]],
                "shape": [SHAPES[s] for s in attrs["shape"]],
                # class label: the (colour, shape) pair's index in pairs("val")
                "label": torch.as_tensor(attrs["colour"] * len(SHAPES) + attrs["shape"]),
                "index": torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))}

    def for_step(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        start = (int(step) * world + rank) * batch_size
        return self.batch(np.arange(start, start + batch_size))


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` samples of a split as a map-style Dataset of dicts: image (3, 64, 64) in
    [-1, 1], caption, colour, shape, background, size, position."""

    def __init__(self, split: str = "train", length: int = 10000, seed: int = 0,
                 size: int = IMAGE_SIZE):
        pairs(split)
        self.split, self.length, self.seed, self.size = split, int(length), int(seed), size

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        attrs = attributes([i], self.seed, self.split)
        return {"image": render(attrs, self.size)[0], "caption": caption(attrs, 0),
                "colour": _COLOUR_NAMES[int(attrs["colour"][0])],
                "shape": SHAPES[int(attrs["shape"][0])],
                "background": _BG_NAMES[int(attrs["background"][0])],
                "size": SIZES[int(attrs["size"][0])],
                "position": POSITIONS[int(attrs["position"][0])]}


# ----------------------------------------------------------------------------------- the judge

def _as_uint8_hwc(image) -> np.ndarray:
    """An image as float32 (H, W, 3) in 0..255 from a tensor in [-1, 1], an array or PIL."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.dim() == 4:
            x = x[0]
        return ((x.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    return arr.astype(np.float32)


def judge(image):
    """(colour, shape) of the object in an image, read from the pixels alone.

    The background is the median colour of the border pixels; object pixels are those at least
    60 (of 255) away from it. Rows and columns with fewer than two object pixels are dropped
    before the bounding box is taken, so stray pixels of a generated image do not stretch it.
    The colour is the palette entry nearest to the median object pixel. The shape comes from the
    box: the fill ratio (square 1, circle pi/4, triangle 1/2) and how much fuller the bottom half
    is than the top half (a triangle's apex points up).

    ("none", "none") unless the image is one object on a plain background: most border pixels
    near the background colour, most object pixels near their median colour, that colour near
    a palette entry, the object pixels inside their box and filling a third of it (so noise
    or a scatter of blobs is never read as a shape).
    """
    img = _as_uint8_hwc(image)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    # an object may touch the border (a large one placed to a side), but most of it is plain
    if np.mean(np.linalg.norm(border - bg, axis=-1) < 40.0) < 0.7:
        return ("none", "none")
    mask = np.linalg.norm(img - bg, axis=-1) > 60.0
    rows = np.nonzero(mask.sum(1) >= 2)[0]
    cols = np.nonzero(mask.sum(0) >= 2)[0]
    if len(rows) < 3 or len(cols) < 3:
        return ("none", "none")
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = mask[y0:y1, x0:x1]
    pixels = img[y0:y1, x0:x1][box]
    centre = np.median(pixels, axis=0)
    nearest = np.linalg.norm(_COLOUR_RGB - centre, axis=1)
    if (box.sum() < 0.9 * mask.sum() or nearest.min() > 90.0
            or box.mean() < 0.35 or np.mean(np.linalg.norm(pixels - centre, axis=-1) < 100.0) < 0.6):
        return ("none", "none")
    colour = _COLOUR_NAMES[int(np.argmin(nearest))]
    fill = box.mean()
    half = box.shape[0] // 2
    top, bottom = box[:half].mean(), box[box.shape[0] - half:].mean()
    if bottom - top > 0.3:
        shape = "triangle"
    elif fill > 0.89:
        shape = "square"
    elif fill > 0.6:
        shape = "circle"
    else:
        shape = "triangle"
    return (colour, shape)


def judge_batch(images):
    """``judge`` for each image of a batch (B, 3, H, W) or a list."""
    return [judge(im) for im in images]
