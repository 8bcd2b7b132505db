"""Per-example decode and augmentation: encoded bytes (JPEG/PNG/WEBP) or uint8 pixels -> a square
uint8 crop at `resolution`, with SDXL micro-conditioning (original size, crop top-left).

Resize follows diffusers' SDXL training script: shorter side to `resolution` (bicubic), optional
horizontal flip of the resized image, then a centre or random crop whose top-left is recorded.
Randomness comes from the generator the caller seeds (the source seeds it by (seed, step, slot)),
so a resumed run crops and flips exactly as the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import io
from typing import NamedTuple, Optional, Union

import numpy as np
from PIL import Image

ImageData = Union[bytes, np.ndarray]
SKIP_REASONS = ("corrupt", "no_caption", "small", "aspect")


class SkipSample(Exception):
    """A sample the source substitutes and counts; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Example(NamedTuple):
    pixels: np.ndarray          # uint8 (resolution, resolution, 3)
    original_size: tuple[int, int]   # (height, width) before any resize
    crop_top_left: tuple[int, int]   # (top, left) in the resized (and flipped) image


def decode_image(data: ImageData) -> Image.Image:
    """An RGB PIL image from encoded bytes or uint8 pixels; unreadable data raises SkipSample."""
    if isinstance(data, np.ndarray):
        return Image.fromarray(data.astype(np.uint8)).convert("RGB")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise SkipSample("corrupt", str(e)) from e


def aspect_ratio(height: float, width: float) -> float:
    return max(height, width) / max(1.0, min(height, width))


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """Decode, size checks, resize, flip and crop; see the module docstring.

    `min_size` (shorter side) and `max_aspect_ratio` (longer / shorter, 0: off) are checked on
    the decoded image only when the caller has no metadata size (sources filter on metadata when
    they build their index)."""
    resolution: int
    crop: str = "center"
    flip_prob: float = 0.0
    min_size: int = 0
    max_aspect_ratio: float = 0.0

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop={self.crop!r}: choose 'center' or 'random'")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob={self.flip_prob} must lie in [0, 1]")
        if self.resolution <= 0:
            raise ValueError(f"data.resolution={self.resolution} must be positive")

    def __call__(self, data: ImageData, rng: np.random.Generator,
                 original_size: Optional[tuple[int, int]] = None) -> Example:
        im = decode_image(data)
        if original_size is None:
            original_size = (im.height, im.width)
            self._check_size(*original_size)
        r = self.resolution
        scale = r / min(im.width, im.height)
        size = (max(r, round(im.width * scale)), max(r, round(im.height * scale)))
        im = im.resize(size, Image.BICUBIC)
        if rng.random() < self.flip_prob:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if self.crop == "random":
            top, left = int(rng.integers(0, size[1] - r + 1)), int(rng.integers(0, size[0] - r + 1))
        else:
            top, left = (size[1] - r) // 2, (size[0] - r) // 2
        pixels = np.asarray(im.crop((left, top, left + r, top + r)), np.uint8)
        return Example(pixels, tuple(int(s) for s in original_size), (top, left))

    def _check_size(self, height: int, width: int) -> None:
        if self.min_size and min(height, width) < self.min_size:
            raise SkipSample("small", f"{height}x{width} < min_size {self.min_size}")
        if self.max_aspect_ratio and aspect_ratio(height, width) > self.max_aspect_ratio:
            raise SkipSample("aspect", f"{height}x{width} > max_aspect_ratio {self.max_aspect_ratio}")


def transform_from_config(data_cfg) -> ImageTransform:
    """The ImageTransform of a config's data section."""
    return ImageTransform(data_cfg.resolution, data_cfg.get("crop", "center"),
                          float(data_cfg.get("flip_prob", 0.0)), int(data_cfg.get("min_size", 0)),
                          float(data_cfg.get("max_aspect_ratio", 0.0)))
