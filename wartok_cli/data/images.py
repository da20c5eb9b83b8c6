"""Decoding image files and bringing any Pillow image to the recipe's channels and side.

Image folders collected from the web contain every mode Pillow supports: CMYK JPEGs,
palette PNGs with a transparent colour, 16-bit scans, images with an alpha
channel. Each is converted to 8-bit grayscale ('L') or RGB; transparency is
composited on black, the colour that padding uses too. A file that cannot be
decoded raises ``UndecodableImage`` so that the caller can skip it and record why.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Suffixes of the files an image folder reads, compared in lower case.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Exceptions that Pillow's decoders raise on a damaged or unsupported file: UnidentifiedImageError and
# "image file is truncated" are OSErrors, a broken PNG chunk is a SyntaxError, a damaged
# deflate stream a zlib.error, a short header a struct.error or EOFError.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class UndecodableImage(Exception):
    """An image file that cannot be decoded or converted; the message is the reason."""


def open_image(path: Path, draft_side: int | None = None) -> Image.Image:
    """Decode one image file completely, upright according to its EXIF orientation.

    ``draft_side`` lets the JPEG decoder scale down by a power of two while both sides stay
    at least that many pixels, which makes large photographs much faster to read.
    """
    try:
        with Image.open(path) as opened:
            if draft_side is not None:
                opened.draft(None, (draft_side, draft_side))
            opened.load()
            # exif_transpose returns a new image, so the file can be closed afterwards.
            return ImageOps.exif_transpose(opened)
    except DECODE_ERRORS as error:
        raise UndecodableImage(f"{type(error).__name__}: {error}") from error


def array_to_image(array: np.ndarray) -> Image.Image:
    """Wrap one uint8 array, (H, W) or (H, W, C) with C in 1 to 4, as a Pillow image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    # Pillow picks the mode from the shape: L, LA, RGB or RGBA.
    return Image.fromarray(np.ascontiguousarray(array))


def _to_8bit(picture: Image.Image) -> Image.Image:
    """Map the integer and float modes (I;16*, I, F) to 8-bit grayscale."""
    values = np.asarray(picture)
    if picture.mode.startswith("I;16"):
        scaled = values.astype(np.float64) / 257.0
    elif picture.mode == "I":
        # NOTE: mode I does not record a bit depth. Values above 255 are read as 16-bit data
        # (the usual content of a 32-bit TIFF or of a 16-bit PNG in older Pillow), others as 8-bit.
        clipped = np.clip(values, 0, 65535).astype(np.float64)
        scaled = clipped / 257.0 if clipped.max(initial=0) > 255 else clipped
    else:
        # NOTE: float images have no standard range either; [0, 1] is assumed when no value
        # exceeds 1, and [0, 255] otherwise.
        finite = np.nan_to_num(values.astype(np.float64))
        scaled = finite * 255.0 if finite.max(initial=0) <= 1.0 else finite
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _has_alpha(picture: Image.Image) -> bool:
    return picture.mode in _ALPHA_MODES or "transparency" in picture.info


def to_channels(picture: Image.Image, channels: int) -> Image.Image:
    """Convert an image of any mode to 'L' (``channels`` 1) or 'RGB' (``channels`` 3).

    Transparent pixels are composited on black. Raises ``UndecodableImage`` for a mode
    that Pillow cannot convert.
    """
    target = "L" if channels == 1 else "RGB"
    try:
        if picture.mode.startswith("I") or picture.mode == "F":
            picture = _to_8bit(picture)
        if _has_alpha(picture):
            rgba = picture.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            picture = Image.alpha_composite(black, rgba).convert("RGB")
        if picture.mode != target:
            picture = picture.convert(target)
    except (ValueError, OSError) as error:
        raise UndecodableImage(f"cannot convert mode {picture.mode} to {target}: {error}") from error
    return picture


def fit_image(picture: Image.Image, resolution: int, fit: str) -> Image.Image:
    """Bring an image to a square of side ``resolution``, keeping its mode.

    'resize' scales the shorter side to the resolution (bicubic) and centre-crops the longer
    one. 'pad' keeps the scale: it centre-crops what is larger and centres what is smaller
    on black.
    """
    width, height = picture.size
    if fit == "resize":
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        picture = picture.resize(size, Image.Resampling.BICUBIC)
        width, height = picture.size
    canvas = Image.new(picture.mode, (resolution, resolution))
    canvas.paste(picture, ((resolution - width) // 2, (resolution - height) // 2))
    return canvas
