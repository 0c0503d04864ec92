"""The paper's augmentations, seeded per record so that any run can be replayed.

Every random choice for a record comes from ``record_rng(seed, epoch, key)``: the same (seed, epoch, key) gives
the same crop and flip whichever worker, block or order the record lands in, and a new epoch gives new ones.

ImageNet (Chen et al. 2020, appendix): train -- resize so the shorter side is uniform in [256, 384], random
224x224 crop; eval -- shorter side 224, centre crop. Then down-sample to the input resolution (IR) with a box
(area) filter. We fold "resize, crop, box-downsample" into one box filter from the crop's footprint in the
original image straight to IR x IR: every output pixel is the average of the original pixels under it, which
is what the chain approximates, with one resampling instead of two.

Large JPEGs are decoded at a reduced DCT scale (Pillow's ``draft``: 1/2, 1/4, 1/8) whenever the crop's footprint
stays at least ``DRAFT_MARGIN`` x IR pixels wide at that scale. Measured on real 500x375 photographs against full
decoding with the same crops: margin 1 changes the output by 3-5 levels (mean abs, of 255), margin 2 by 1-3,
margin 4 by <= 1.4 -- we use 4 and hold it to <= 1.5 in the tests; ``benchmarks/ingest.py`` measures the speed.

CIFAR: train -- reflection-pad 4 pixels, random 32x32 crop, random horizontal flip; eval -- none. Other sizes are
box-resized to IR afterwards.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np
from PIL import Image

from igpt.data.images import BadImage, decode_rgb, open_image, to_rgb

Recipe = Literal["imagenet", "cifar", "none"]
DRAFT_MARGIN = 4  # decode at reduced scale only while the crop keeps >= 4x IR pixels per side


class RecordRng:
    """Uniform numbers for one record, drawn from a keyed hash of (seed, epoch, stream, key).

    Cheap (one blake2b, no generator state to build: a numpy Generator costs ~40 us, more than decoding a CIFAR
    JPEG) and the same on every machine and Python version. Eight independent 64-bit draws per record; the
    transforms need at most four."""

    def __init__(self, seed: int, epoch: int, key: str, stream: int = 0):
        salt = f"{seed}:{epoch}:{stream}".encode()
        digest = hashlib.blake2b(key.encode(), digest_size=64, person=hashlib.blake2b(salt, digest_size=16).digest())
        self._u = np.frombuffer(digest.digest(), dtype="<u8")
        self._i = 0

    def random(self) -> float:
        """Uniform in [0, 1)."""
        if self._i >= len(self._u):
            raise RuntimeError("RecordRng exhausted: a transform drew more than 8 numbers")
        u = int(self._u[self._i]) >> 11  # 53 bits, exactly representable
        self._i += 1
        return u / float(1 << 53)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integers(self, n: int) -> int:
        """Uniform in 0..n-1."""
        return min(int(self.random() * n), n - 1)


def record_rng(seed: int, epoch: int, key: str, stream: int = 0) -> RecordRng:
    """The random stream of one record; ``stream`` separates independent uses (0: augmentation, 1: sampling)."""
    return RecordRng(seed, epoch, key, stream)


def _imagenet_box(w: int, h: int, train: bool, rng: RecordRng | None) -> tuple[float, float, float, float]:
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


def _reflect_index(n: int, pad: int) -> np.ndarray:
    """Indices of a length-n axis reflection-padded by ``pad`` on each side (numpy's 'reflect': edge not repeated)."""
    i = np.arange(-pad, n + pad)
    period = 2 * (n - 1) if n > 1 else 1
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)


def cifar(arr: np.ndarray, ir: int, train: bool, rng: RecordRng | None) -> np.ndarray:
    if train:
        h, w = arr.shape[:2]
        # reflect-pad 4 and crop back to h x w, as one gather (np.pad + slice costs 3x more)
        y, x = rng.integers(9), rng.integers(9)
        rows = _reflect_index(h, 4)[y : y + h]
        cols = _reflect_index(w, 4)[x : x + w]
        if rng.random() < 0.5:
            cols = cols[::-1]
        arr = arr[rows[:, None], cols[None, :]]
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
    max_pixels: int = 0,
) -> np.ndarray:
    """Encoded bytes or a uint8 (H, W, 3) array -> uint8 (IR, IR, 3) under ``recipe``. Raises BadImage (also for
    an encoded image of more than ``max_pixels`` pixels; 0: PIL's default limit)."""
    rng = record_rng(seed, epoch, key) if train else None
    if recipe == "imagenet":
        img = Image.fromarray(image) if isinstance(image, np.ndarray) else open_image(image, max_pixels)
        w, h = img.size
        box = _imagenet_box(w, h, train, rng)
        if draft and img.format == "JPEG":
            scale = max(1.0, (box[2] - box[0]) / (DRAFT_MARGIN * ir))
            try:  # draft picks the largest DCT reduction (1/2, 1/4, 1/8) whose size is still >= the one asked for
                img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
            except (OSError, ValueError) as e:
                raise BadImage(f"cannot decode image: {type(e).__name__}: {e}") from None
        img = to_rgb(img)
        if img.size != (w, h):  # decoded at 1/k: pixel i covers original pixels [i k, (i + 1) k)
            k = 2 ** round(math.log2(w / img.width))
            box = tuple(min(v / k, lim) for v, lim in zip(box, (img.width, img.height) * 2, strict=False))
        return np.asarray(img.resize((ir, ir), Image.BOX, box=box), dtype=np.uint8)
    arr = image if isinstance(image, np.ndarray) else np.asarray(decode_rgb(image, max_pixels))
    if recipe == "cifar":
        return cifar(arr, ir, train, rng)
    if recipe == "none":
        return cifar(arr, ir, False, None)
    raise ValueError(f"unknown transform recipe {recipe!r}")
