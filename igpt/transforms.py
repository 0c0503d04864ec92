"""The paper's augmentations, seeded per record so that any run can be replayed.

Every random choice for a record comes from ``record_rng(seed, epoch, key)``: the same (seed, epoch, key) gives
the same crop and flip whichever worker, block or order the record lands in, and a new epoch gives new ones.

ImageNet (Chen et al. 2020, appendix): train -- resize so the shorter side is uniform in [256, 384], random
224x224 crop; eval -- shorter side 224, centre crop. Then down-sample to the input resolution (IR) with a box
(area) filter. We fold "resize, crop, box-downsample" into one box filter from the crop's footprint in the
original image straight to IR x IR: every output pixel is the average of the original pixels under it, which
is what the chain approximates, with one resampling instead of two.

Large JPEGs are decoded at a reduced DCT scale (Pillow's ``draft``) whenever the crop's footprint stays at least
``DRAFT_MARGIN`` x IR pixels wide at that scale; ``benchmarks/ingest.py`` measures the difference this makes.

CIFAR: train -- reflection-pad 4 pixels, random 32x32 crop, random horizontal flip; eval -- none. Other sizes are
box-resized to IR afterwards.
"""

from __future__ import annotations

import hashlib
import io
from typing import Literal

import numpy as np
from PIL import Image

from igpt.images import decode_rgb, open_image, to_rgb

Recipe = Literal["imagenet", "cifar", "none"]
DRAFT_MARGIN = 2  # decode at reduced scale only while the crop keeps >= 2x IR pixels per side


def record_rng(seed: int, epoch: int, key: str, stream: int = 0) -> np.random.Generator:
    """The random stream of one record; ``stream`` separates independent uses (0: augmentation, 1: sampling)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, h, stream])


def _imagenet_box(w: int, h: int, train: bool, rng: np.random.Generator | None) -> tuple[float, float, float, float]:
    """The crop's footprint in original pixel coordinates (left, top, right, bottom)."""
    short = min(w, h)
    if train:
        s = rng.uniform(256, 384)  # shorter side after the resize
        side = 224 * short / s  # a 224-pixel crop at that scale, in original pixels
        left = rng.uniform(0, w - side)
        top = rng.uniform(0, h - side)
    else:
        side = short  # shorter side 224, centre crop 224: the centred square of the shorter side
        left, top = (w - side) / 2, (h - side) / 2
    return left, top, left + side, top + side


def imagenet(img: Image.Image, ir: int, train: bool, rng: np.random.Generator | None) -> np.ndarray:
    box = _imagenet_box(img.width, img.height, train, rng)
    return np.asarray(img.resize((ir, ir), Image.BOX, box=box), dtype=np.uint8)


def cifar(arr: np.ndarray, ir: int, train: bool, rng: np.random.Generator | None) -> np.ndarray:
    if train:
        h, w = arr.shape[:2]
        padded = np.pad(arr, ((4, 4), (4, 4), (0, 0)), mode="reflect")
        y, x = rng.integers(0, 9, size=2)
        arr = padded[y : y + h, x : x + w]
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
    if arr.shape[:2] != (ir, ir):
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((ir, ir), Image.BOX))
    return np.ascontiguousarray(arr, dtype=np.uint8)


def apply(
    image: bytes | np.ndarray,
    recipe: Recipe,
    ir: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    key: str = "",
    draft: bool = True,
) -> np.ndarray:
    """Encoded bytes or a uint8 (H, W, 3) array -> uint8 (IR, IR, 3) under ``recipe``. Raises BadImage."""
    rng = record_rng(seed, epoch, key) if train else None
    if recipe == "imagenet":
        if isinstance(image, np.ndarray):
            img = Image.fromarray(image)
        elif draft:
            img = _open_with_draft(image, ir, train, rng)
            if train:  # the draft open consumed the crop draws; replay them on the decoded size
                rng = record_rng(seed, epoch, key)
        else:
            img = decode_rgb(image)
        return imagenet(img, ir, train, rng)
    arr = image if isinstance(image, np.ndarray) else np.asarray(decode_rgb(image))
    if recipe == "cifar":
        return cifar(arr, ir, train, rng)
    if recipe == "none":
        return cifar(arr, ir, False, None)
    raise ValueError(f"unknown transform recipe {recipe!r}")


def _open_with_draft(data: bytes, ir: int, train: bool, rng: np.random.Generator | None) -> Image.Image:
    """Decode a JPEG at the smallest DCT scale (1/1, 1/2, 1/4, 1/8) that keeps the crop >= DRAFT_MARGIN*IR wide."""
    img = open_image(data)
    if img.format == "JPEG":
        w, h = img.size
        left, _, right, _ = _imagenet_box(w, h, train, rng)
        scale = max(1.0, (right - left) / (DRAFT_MARGIN * ir))
        try:  # draft picks the largest reduction whose size is still >= the one asked for
            img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
        except (OSError, ValueError) as e:
            raise BadImage(f"cannot decode image: {type(e).__name__}: {e}") from None
    return to_rgb(img)
