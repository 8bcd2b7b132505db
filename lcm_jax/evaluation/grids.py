"""Image grids: the PNGs people look at (sample grids of training runs, the CLI, the demo)."""
from __future__ import annotations

import io
import math
import os
from typing import Optional, Sequence

import numpy as np

from lcm_jax import fs


def save_grid(images: np.ndarray, path: str, nrow: int, labels: Optional[Sequence[str]] = None,
              pad: int = 2) -> tuple[int, int]:
    """Writes images (N, H, W, 3), float [0, 1] or uint8, as a PNG grid of `nrow` per row.

    `labels`, one per grid row, are drawn in a column on the left; `path` may be a gs:// URL.
    Returns (width, height).
    """
    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
    n, h, w, _ = images.shape
    rows = math.ceil(n / nrow)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"save_grid: {len(labels)} labels for {rows} rows of {nrow} images")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if labels is None else int(max(probe.textlength(t, font=font) for t in labels)) + 2 * pad
    grid = Image.new("RGB", (label_w + nrow * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        grid.paste(Image.fromarray(image), (label_w + pad + c * (w + pad), pad + r * (h + pad)))
    for r, text in enumerate(labels or []):
        draw.text((pad, pad + r * (h + pad) + h // 2 - 6), text, fill="black", font=font)
    png = io.BytesIO()
    grid.save(png, format="PNG")
    fs.makedirs(os.path.dirname(path) or ".")
    with fs.open(path, "wb") as f:
        f.write(png.getvalue())
    return grid.size
