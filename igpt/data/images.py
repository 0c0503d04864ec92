"""Image decoding and resizing shared by every reader: bytes in, uint8 RGB out, or a clear reason why not."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImage(ValueError):
    """A record that cannot be turned into an RGB image; ``str(e)`` is the reason recorded in error reports."""


# PIL warns above MAX_IMAGE_PIXELS (~89.5M: ~270 MB decoded) and refuses above twice that, before decoding
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
PIL_HARD_LIMIT = 2 * Image.MAX_IMAGE_PIXELS


def open_image(data: bytes, max_pixels: int = 0) -> Image.Image:
    """Identify encoded image bytes (no pixel decoding yet, so callers may still ask for a reduced-scale draft).

    ``max_pixels``: an image whose header declares more pixels is refused before decoding (0: PIL's default
    MAX_IMAGE_PIXELS): a 20,000 x 20,000 scan would otherwise take 1.2 GB of a read task's memory."""
    if not data:
        raise BadImage("empty record (zero bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # not an OSError: it would kill the whole read task
        raise BadImage(f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode image: {type(e).__name__}: {e}") from None
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if img.width * img.height > limit:
        raise BadImage(f"image of {img.width}x{img.height} = {img.width * img.height:,} pixels is over the limit of "
                       f"{limit:,} (--limits.max_pixels)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode an opened image and make it RGB (greyscale, CMYK, RGBA, palette, 16-bit... all become RGB)."""
    try:
        img.load()  # decode now, so truncation surfaces here and not later
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
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
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16-bit / 32-bit greyscale: scale to 8 bits instead of clipping (PIL's convert clips at 255)
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int = 0) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, or raise :class:`BadImage` with the reason."""
    return to_rgb(open_image(data, max_pixels))


def to_resolution(img: Image.Image, resolution: int) -> np.ndarray:
    """Down-sample to resolution x resolution with a box (area) filter; uint8 (IR, IR, 3)."""
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BOX)
    return np.asarray(img, dtype=np.uint8)
