"""Torch-free image loading with the safety checks every user-facing input path shares (predict, export, serve).

`probe` reads only the header and turns the ways a file can be bad (missing, empty, not an image, a decompression
bomb) into one short reason. `load_rgb` decodes with Pillow and numpy only: first frame, EXIF orientation applied,
grayscale/palette/RGBA/CMYK/16-bit made 8-bit RGB. `resize` and `normalize` mirror the torch contract in
`birdcli/data/dataset.py` (antialiased bilinear resize, skipped at the right size; `(x / 255 - mean) / std`) so a
backend without torch (ONNX) can preprocess the same way.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 16_000 * 16_000  # the limit of birdcli.data.dataset.decode: more is a decompression bomb, not a photo
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """A file that cannot be used as an image; the message is the one-line reason."""


@dataclass(frozen=True)
class Header:
    format: str
    width: int
    height: int
    mode: str
    frames: int


def probe(path: str | os.PathLike[str]) -> Header:
    """Read the header only; raise ImageError with a short reason for any file we must not decode."""
    p = Path(path)
    if p.is_dir():
        raise ImageError("is a folder")
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except OSError as e:
        raise ImageError(f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(p) as im:
                header = Header(im.format or "?", im.size[0], im.size[1], im.mode, getattr(im, "n_frames", 1))
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        raise ImageError(f"declares {declared} (decompression bomb?)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unknown or broken format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"corrupt image header: {reason(e)}") from None
    if header.width < 1 or header.height < 1:
        raise ImageError(f"declares an empty {header.width}x{header.height} image")
    if header.width * header.height > MAX_PIXELS:
        raise ImageError(
            f"declares {header.width}x{header.height} pixels, over the {MAX_PIXELS // 10**6} MP limit "
            "(decompression bomb?)"
        )
    return header


def to_rgb(im: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, 8-bit RGB (16-bit scaled down, alpha dropped, CMYK converted)."""
    im.seek(0)
    im = ImageOps.exif_transpose(im) or im
    if im.mode in SIXTEEN_BIT_MODES:
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Any image file -> uint8 (H, W, 3), or ImageError naming why not (truncated, corrupt, bomb, ...)."""
    probe(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                rgb = to_rgb(im)
                rgb.load()
    except ImageError:
        raise
    except Exception as e:  # any decoder failure is a property of the file
        raise ImageError(reason(e)) from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) with antialiased bilinear resizing; untouched at the right size."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W): `(x / 255 - mean) / std`, the model's input."""
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - m) / s


def reason(e: BaseException) -> str:
    """One short line for a decoder exception."""
    if isinstance(e, ImageError):
        return str(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = text.lower()
    if "truncated" in low or "premature end" in low:
        return f"truncated or corrupt image ({text})"
    if isinstance(e, MemoryError):
        return "out of memory while decoding"
    return text
