"""The 512-colour palette: k-means fit, exact quantization through a 2^24 lookup table, save/load.

The palette lives where the official iGPT release and Hugging Face keep it: RGB scaled to [-1, 1]
(``x / 127.5 - 1``), a float32 array of shape (512, 3). A pixel's token is the index of its nearest centre
under squared Euclidean distance in that space, ties going to the lowest index (what ``argmin`` does).

Quantizing a pixel by searching 512 centres costs ~100 images/s on a CPU. Every 8-bit RGB pixel is one of
2^24 colours, so a table of 2^24 uint16 tokens (32 MiB) turns quantization into one gather. Building the
table by brute force is 16.7M x 512 distances (~90 s on 2 cores); :func:`build_lut` prunes instead: it cuts
the colour cube into cells and, for each cell, keeps only the centres that can be nearest to some colour in
it (lower bound of distance <= the smallest upper bound), then runs the exact argmin over those few. The
result is bit-identical to the brute-force table because the surviving candidates' distances are computed
with the very same float64 arithmetic as :func:`nearest_centre`.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igpt.errors import MissingInput, UserError
from igpt.storage import Loc, is_remote, local_copy

N_COLORS = 512
LUT_SIZE = 1 << 24


def to_unit(pixels_u8: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float64 in [-1, 1], the official normalisation (``x / 127.5 - 1``)."""
    return np.asarray(pixels_u8, dtype=np.float64) / 127.5 - 1.0


def _sqdist(a, b):
    """Squared Euclidean distance over the last axis (3), summed in one fixed order so that numpy (the
    reference) and torch (the table builder) give bit-identical float64 results."""
    d0, d1, d2 = (a[..., i] - b[..., i] for i in range(3))
    return (d0 * d0 + d1 * d1) + d2 * d2


def nearest_centre(pixels_u8: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Reference quantizer: plain argmin of squared Euclidean distance (float64), any shape (..., 3).

    Slow (every pixel against every centre); it is the definition the lookup table must reproduce.
    """
    flat = to_unit(np.asarray(pixels_u8).reshape(-1, 3))
    c = np.asarray(centres, dtype=np.float64)
    out = np.empty(len(flat), dtype=np.uint16)
    for s in range(0, len(flat), 16384):
        out[s : s + 16384] = _sqdist(flat[s : s + 16384, None, :], c[None, :, :]).argmin(1)
    return out.reshape(np.asarray(pixels_u8).shape[:-1])


def _cell_candidates(centres: torch.Tensor, cell: int) -> torch.Tensor:
    """For each cubic cell of ``cell`` 8-bit levels per side: a bool mask (cells, K) of possible nearest centres.

    A centre can be nearest to some colour of the cell only if its smallest possible distance to the cell
    is <= the smallest, over centres, largest possible distance. Bounds are taken over the cell's grid points
    (``lo``..``hi`` inclusive), with a small slack so float rounding can never drop the true winner.
    """
    n = 256 // cell
    lv = torch.arange(n, dtype=torch.float64) * cell
    lo1 = lv / 127.5 - 1.0  # lowest level in the cell, per axis, in unit space
    hi1 = (lv + cell - 1) / 127.5 - 1.0
    # Per axis and centre: min and max squared distance from the centre's coordinate to the cell's interval.
    c = centres.T[:, None, :]  # (3, 1, K)
    below = (lo1[None, :, None] - c).clamp(min=0)
    above = (c - hi1[None, :, None]).clamp(min=0)
    dmin_ax = (below + above) ** 2  # (3, n, K)
    dmax_ax = torch.maximum((c - lo1[None, :, None]) ** 2, (c - hi1[None, :, None]) ** 2)
    # Sum over the three axes for every (r, g, b) cell: (n, n, n, K).
    dmin = dmin_ax[0][:, None, None] + dmin_ax[1][None, :, None] + dmin_ax[2][None, None, :]
    dmax = dmax_ax[0][:, None, None] + dmax_ax[1][None, :, None] + dmax_ax[2][None, None, :]
    bound = dmax.amin(-1, keepdim=True)
    keep = dmin <= bound + 1e-9
    return keep.reshape(n**3, -1)


def build_lut(centres: np.ndarray, cell: int = 8) -> np.ndarray:
    """The 2^24-entry table: ``lut[(r << 16) | (g << 8) | b]`` = nearest centre of colour (r, g, b).

    Exact: equal to :func:`nearest_centre` on all 2^24 colours (tested on the full cube in the slow suite and
    on samples in the fast one).
    """
    c = torch.as_tensor(np.asarray(centres), dtype=torch.float64)
    keep = _cell_candidates(c, cell)
    n = 256 // cell
    counts = keep.sum(1)
    # Colours of one cell as offsets from the cell's origin colour.
    off = torch.arange(cell)
    orr, og, ob = torch.meshgrid(off, off, off, indexing="ij")
    offs = torch.stack([orr.reshape(-1), og.reshape(-1), ob.reshape(-1)], 1)  # (cell^3, 3)
    lut = torch.empty(LUT_SIZE, dtype=torch.int16)
    cells = torch.arange(n**3)
    origin = torch.stack([cells // (n * n), (cells // n) % n, cells % n], 1) * cell  # (cells, 3)
    # Cells with the same number of candidates are processed together, so no candidate list needs padding.
    for k in counts.unique().tolist():
        group = torch.nonzero(counts == k).squeeze(1)
        per_batch = max(1, (1 << 24) // (cell**3 * k))  # keeps the distance block near 16M entries
        for idx in group.split(per_batch):
            cand = torch.nonzero(keep[idx])[:, 1].reshape(len(idx), k)  # ascending centre indices
            cols = origin[idx][:, None, :] + offs[None]  # (b, cell^3, 3) integer colours
            px = cols.to(torch.float64) / 127.5 - 1.0
            d = _sqdist(px[:, :, None, :], c[cand][:, None, :, :])
            win = cand.gather(1, d.argmin(2))  # first minimum -> lowest index on ties
            key = (cols[..., 0] << 16) | (cols[..., 1] << 8) | cols[..., 2]
            lut[key.reshape(-1)] = win.reshape(-1).to(torch.int16)
    return lut.numpy().view(np.uint16)


def colour_keys(px: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> the 24-bit colour ``(r << 16) | (g << 8) | b``: the lookup table's index.

    Written as a byte view (each pixel padded to ``0 r g b`` and read as a big-endian uint32): one copy instead
    of three casts, two shifts and two ors."""
    out = np.zeros(px.shape[:-1] + (4,), np.uint8)
    out[..., 1:] = px
    return out.view(">u4")[..., 0]


def _digest(centres: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(centres, dtype=np.float32).tobytes()).hexdigest()[:16]


@dataclass
class Palette:
    """512 colour centres in [-1, 1] (float32, (512, 3)) and their lookup table, built lazily and cached."""

    centres: np.ndarray
    _lut: np.ndarray | None = field(default=None, repr=False)
    lut_seconds: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        c = np.asarray(self.centres, dtype=np.float32)
        if c.ndim != 2 or c.shape[1] != 3 or not (1 <= len(c) <= 65535):
            raise UserError(f"palette centres must have shape (K, 3) with 1 <= K <= 65535, got {c.shape}")
        if not np.isfinite(c).all():
            raise UserError("palette centres contain NaN or inf")
        lo, hi = float(c.min()), float(c.max())
        if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
            # a palette in 0..255 maps almost every pixel to one centre: a silently wrong tokenisation
            how = (" (it looks like 0..255 RGB: convert it with centres / 127.5 - 1)" if lo >= 0 and hi <= 255
                   else "")
            raise UserError(f"palette centres must lie in [-1, 1] (RGB scaled as in the official release), "
                             f"found [{lo:.4g}, {hi:.4g}]{how}")
        distinct = len(np.unique(c, axis=0))
        if distinct < len(c):
            raise UserError(f"palette has {len(c) - distinct} repeated centre(s) among {len(c)}: a repeated colour "
                             f"is a token no pixel can map to; refit with fewer colours or more pixels")
        self.centres = c

    @property
    def digest(self) -> str:
        return _digest(self.centres)

    # ---- fitting -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, pixels_u8: np.ndarray, n_colors: int = N_COLORS, seed: int = 0, max_iter: int = 100) -> Palette:
        """k-means (scikit-learn) over a pixel sample (N, 3) uint8, in [-1, 1] space.

        Repeated colours are merged first and weighted by their count: the k-means objective is unchanged
        and the work shrinks to the distinct colours.
        """
        from sklearn.cluster import KMeans

        px = np.asarray(pixels_u8, dtype=np.uint8).reshape(-1, 3)
        if len(px) == 0:
            raise ValueError("cannot fit a palette on zero pixels")
        key = (px[:, 0].astype(np.uint32) << 16) | (px[:, 1].astype(np.uint32) << 8) | px[:, 2]
        uniq, counts = np.unique(key, return_counts=True)
        if len(uniq) < n_colors:
            raise ValueError(f"only {len(uniq)} distinct colours in the sample; need at least {n_colors}")
        cols = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], 1)
        km = KMeans(n_clusters=n_colors, n_init=1, max_iter=max_iter, random_state=seed, algorithm="lloyd")
        km.fit(to_unit(cols), sample_weight=counts.astype(np.float64))
        return cls(km.cluster_centers_.astype(np.float32))

    # ---- quantization ---------------------------------------------------------------------------------
    @property
    def lut(self) -> np.ndarray:
        if self._lut is None:
            t = time.perf_counter()
            self._lut = build_lut(self.centres)
            self.lut_seconds = time.perf_counter() - t
        return self._lut

    def quantize(self, pixels_u8: np.ndarray) -> np.ndarray:
        """uint8 RGB (..., 3) -> uint16 tokens (...): exact nearest centre, via the lookup table."""
        px = np.asarray(pixels_u8)
        if px.dtype != np.uint8 or px.shape[-1] != 3:
            raise ValueError(f"expected uint8 pixels with a last axis of 3, got {px.dtype} {px.shape}")
        return self.lut[colour_keys(px)]

    def dequantize(self, tokens: np.ndarray) -> np.ndarray:
        """uint16 tokens (...) -> uint8 RGB (..., 3), the centre colours (as Hugging Face renders them)."""
        rgb = np.rint(127.5 * (self.centres.astype(np.float64) + 1.0)).clip(0, 255).astype(np.uint8)
        t = np.asarray(tokens)
        if t.size and (t.min() < 0 or t.max() >= len(self.centres)):
            raise ValueError(f"tokens out of range [0, {len(self.centres)})")
        return rgb[t]

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path, with_lut: bool = True) -> str:
        """Write the centres as ``.npy`` float32 (512, 3) — the format of the official release and of
        ``ImageGPTImageProcessor(clusters=...)`` — and the lookup table beside it, named by the centres' hash; to a
        local path or object storage (written locally, then each file put whole). Returns where."""
        if is_remote(path):
            with tempfile.TemporaryDirectory() as tmp:
                self.save(Path(tmp) / Loc(path).name, with_lut)
                Loc(path).parent.put_files(tmp)
            return str(path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, self.centres)
        if with_lut:
            lut_path = self.lut_path(path)
            tmp = lut_path.with_suffix(".tmp.npy")
            np.save(tmp, self.lut)
            tmp.replace(lut_path)  # atomic: a reader never sees a half-written table
        return str(path)

    def lut_path(self, path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(f"{path.stem}.lut-{self.digest}.npy")

    @staticmethod
    def local_file(path: str | Path) -> Path:
        """The palette file as a local path: on object storage, copied down once per process with its lookup table
        beside it, when the bucket has one."""
        if not is_remote(path):
            return Path(path)
        src = Loc(path)
        if not src.exists():
            raise MissingInput(f"palette file not found: {path}")
        local = local_copy(src)
        lut = src.parent / Palette(_centres(local)).lut_path(local).name
        if lut.exists():
            local_copy(lut, beside=local)
        return local

    @classmethod
    def load(cls, path: str | Path) -> Palette:
        """Read centres from ``.npy`` (or ``.npz`` with one array), local or on object storage; reuse a cached
        table when its hash matches."""
        path = cls.local_file(path)
        if not path.exists():
            raise MissingInput(f"palette file not found: {path}")
        pal = cls(_centres(path))
        lut_path = pal.lut_path(path)
        if lut_path.exists():
            lut = np.load(lut_path, mmap_mode="r")
            if lut.shape == (LUT_SIZE,) and lut.dtype == np.uint16:
                pal._lut = np.asarray(lut)
        return pal


def _centres(path: Path) -> np.ndarray:
    """The centres of a local ``.npy`` (or ``.npz`` with one array)."""
    arr = np.load(path)
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr = arr[arr.files[0]]
    return np.asarray(arr)
