"""Images in and out of the pipeline: PIL <-> tensors in [-1, 1], masks, grids, atomic PNGs.

Pixel values map as x = 2 p / 255 - 1 on the way in and p = round(255 (x + 1) / 2), clamped, on
the way out (diffusers' ``VaeImageProcessor`` and the CompVis scripts do the same).
"""
from __future__ import annotations

import math
import os
from typing import Iterable, List, Sequence, Union

import numpy as np
import torch
from PIL import Image

from . import fileio

__all__ = ["to_tensor", "mask_to_tensor", "to_pil", "make_grid", "save_png", "save_images", "check_outputs"]

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray, Sequence[Image.Image]]


def _pil_to_array(img: Image.Image, mode: str) -> np.ndarray:
    return np.asarray(img.convert(mode), dtype=np.float32)


def to_tensor(image: ImageLike, device=None, dtype=torch.float32) -> torch.Tensor:
    """An image or a batch of them as a (B, 3, H, W) tensor in [-1, 1].

    Accepts a PIL image, a list of equally sized PIL images, a uint8 array (H, W, 3) or
    (B, H, W, 3), a uint8 tensor (3, H, W) / (B, 3, H, W) as torchvision reads images (scaled
    like the arrays), or a floating tensor (3, H, W) / (B, 3, H, W) already in [-1, 1] (returned
    as is, moved and cast).
    """
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError("an image tensor must be (3, H, W) or (B, 3, H, W), "
                             f"got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return (x.to(dtype=torch.float32) / 127.5 - 1.0).to(device=device, dtype=dtype)
        if not image.is_floating_point():
            # Other integer ranges (16-bit PNGs, labels) have no one meaning as pixel values.
            raise ValueError(f"an image tensor must be uint8 (0..255) or floating point in "
                             f"[-1, 1], got {image.dtype}")
        return x.to(device=device, dtype=dtype)
    if isinstance(image, Image.Image):
        arr = _pil_to_array(image, "RGB")[None]
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            # A float array may hold [0, 1] or [0, 255]: guessing would silently wash the image
            # out or blow it up, so the caller says which by converting.
            raise ValueError(f"an image array must be uint8 (H, W, 3) or (B, H, W, 3), got "
                             f"{image.dtype}; convert it (np.uint8) or pass a tensor in [-1, 1]")
        arr = image.astype(np.float32)
        arr = arr[None] if arr.ndim == 3 else arr
    else:
        images = list(image)
        if not images:
            raise ValueError("no images given")
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"images in a batch must have one size, got {sorted(sizes)}")
        arr = np.stack([_pil_to_array(im, "RGB") for im in images])
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected RGB images (H, W, 3), got an array of shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return x.to(device=device, dtype=dtype)


def mask_to_tensor(mask, device=None, dtype=torch.float32, threshold: float = 0.5) -> torch.Tensor:
    """A mask as a (B, 1, H, W) tensor of 0s and 1s (1 where the mask is white / >= threshold).

    Accepts a PIL image (any mode, read as grey levels / 255), an array (H, W) or (B, H, W) in
    [0, 1], or a tensor (H, W), (1, H, W) or (B, 1, H, W) in [0, 1]. Binarised like the LDM
    inpainting script.
    """
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(_pil_to_array(mask, "L") / 255.0)
    elif isinstance(mask, np.ndarray):
        m = torch.from_numpy(mask.astype(np.float32))
    elif isinstance(mask, torch.Tensor):
        m = mask.float()
    else:
        raise TypeError("a mask must be a PIL image, an array or a tensor, "
                        f"not {type(mask).__name__}")
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None] if m.shape[0] != 1 else m[None]
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"a mask must be (H, W), (1, H, W) or (B, 1, H, W), got {tuple(m.shape)}")
    return (m >= threshold).to(device=device, dtype=dtype)


def to_pil(x: torch.Tensor) -> List[Image.Image]:
    """A (B, 3, H, W) or (3, H, W) tensor in [-1, 1] as a list of RGB PIL images."""
    if x.dim() == 3:
        x = x[None]
    arr = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    arr = (arr * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]


def make_grid(images: Iterable[Image.Image], rows: int | None = None, pad: int = 2) -> Image.Image:
    """Images of one size tiled row by row on a white background; ``rows`` defaults to the
    squarest layout."""
    images = list(images)
    if not images:
        raise ValueError("no images to tile")
    n = len(images)
    if rows is None:
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
    else:
        cols = math.ceil(n / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def output_paths(out, n: int) -> List[str]:
    """The files ``save_images`` writes for ``n`` images: ``out`` alone, or ``<stem>-<i>.png``
    for each image and their grid at ``out``."""
    out = os.fspath(out)
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i:03d}{ext}" for i in range(n)] + [out]


def check_outputs(out, n: int = 1, overwrite: bool = False, arg: str = "out",
                  flag: str = "overwrite=True") -> List[str]:
    """Refuses, before any work, output names ``save_images`` could not honour: not ending in
    .png, naming a folder, or an existing file (unless ``overwrite``; a file that is not a PNG
    image, a model say, is never replaced). Returns the paths."""
    if not os.fspath(out).lower().endswith(".png"):
        raise ValueError(f"{arg}: {os.fspath(out)!r} must end in .png (images are written as PNG)")
    paths = output_paths(out, n)
    for path in paths:
        if os.path.isfile(path) and not _is_png(path):
            raise FileExistsError(f"{arg}: {path!r} exists and is not a PNG image; refusing to "
                                  "replace it")
        fileio.check_writable(path, overwrite, arg, flag)
    return paths


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def save_png(image: Image.Image, path, overwrite: bool = False) -> str:
    """Writes a PNG atomically (``ldmfast.fileio.atomic_path``), so a reader never sees a
    half-written file and an interrupted run leaves no partial one. An existing file is replaced
    only with ``overwrite`` and only if it is a PNG."""
    return _write(check_outputs(path, 1, overwrite, arg="path"), [image], overwrite)[0]


def save_images(images: Sequence[Image.Image], out, overwrite: bool = False) -> List[str]:
    """One image to ``out``; several to ``<stem>-<i>.png`` each plus their grid at ``out``.
    Every name is checked (``check_outputs``) before the first is written; a missing folder is
    created."""
    paths = check_outputs(out, len(images), overwrite)
    if len(images) > 1:
        images = list(images) + [make_grid(images)]
    return _write(paths, images, overwrite)


def _write(paths, images, overwrite) -> List[str]:
    # checked names (check_outputs), one image each, in a folder made if missing
    os.makedirs(os.path.dirname(os.path.abspath(paths[0])), exist_ok=True)
    for im, path in zip(images, paths):
        with fileio.atomic_path(path, replace=overwrite) as tmp:
            im.save(tmp, format="PNG")
    return paths
