"""Image decoding and resizing shared by every reader: bytes in, uint8 RGB out, or a clear reason why not."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImage(ValueError):
    """A record that cannot be turned into an RGB image; ``str(e)`` is the reason recorded in error reports."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (greyscale, CMYK, RGBA, palette... all become RGB)."""
    if not data:
        raise BadImage("empty record (zero bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so truncation surfaces here and not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode image: {type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise BadImage(f"image has no pixels ({img.width}x{img.height})")
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # composite on white rather than letting transparent pixels keep arbitrary colours
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def to_resolution(img: Image.Image, resolution: int) -> np.ndarray:
    """Down-sample to resolution x resolution with a box (area) filter; uint8 (IR, IR, 3)."""
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BOX)
    return np.asarray(img, dtype=np.uint8)
