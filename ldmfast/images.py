"""Images in and out of the pipeline: PIL <-> tensors in [-1, 1], masks, grids, atomic PNGs.

Pixel values map as x = 2 p / 255 - 1 on the way in and p = round(255 (x + 1) / 2), clamped, on
the way out (diffusers' ``VaeImageProcessor`` and the CompVis scripts do the same).
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Iterable, List, Sequence, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["to_tensor", "mask_to_tensor", "to_pil", "make_grid", "save_png", "save_images"]

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray, Sequence[Image.Image]]


def _pil_to_array(img: Image.Image, mode: str) -> np.ndarray:
    return np.asarray(img.convert(mode), dtype=np.float32)


def to_tensor(image: ImageLike, device=None, dtype=torch.float32) -> torch.Tensor:
    """An image or a batch of them as a (B, 3, H, W) tensor in [-1, 1].

    Accepts a PIL image, a list of equally sized PIL images, a uint8 array (H, W, 3) or
    (B, H, W, 3), or a tensor (3, H, W) / (B, 3, H, W) already in [-1, 1] (returned as is,
    moved and cast).
    """
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError("an image tensor must be (3, H, W) or (B, 3, H, W), "
                             f"got {tuple(image.shape)}")
        return x.to(device=device, dtype=dtype)
    if isinstance(image, Image.Image):
        arr = _pil_to_array(image, "RGB")[None]
    elif isinstance(image, np.ndarray):
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


def save_png(image: Image.Image, path) -> str:
    """Writes a PNG atomically: to a temporary file in the target folder, then ``os.replace``,
    so a reader never sees a half-written file and an interrupted run leaves no partial one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_images(images: Sequence[Image.Image], out) -> List[str]:
    """One image to ``out``; several to ``<stem>-<i>.png`` each plus their grid at ``out``."""
    out = os.fspath(out)
    if len(images) == 1:
        return [save_png(images[0], out)]
    stem, ext = os.path.splitext(out)
    paths = [save_png(im, f"{stem}-{i:03d}{ext or '.png'}") for i, im in enumerate(images)]
    paths.append(save_png(make_grid(images), out))
    return paths
