"""Palette fit, lookup-table build and pixel->token throughput, each beside its baseline, from one run.

    .venv/bin/python benchmarks/palette_tokens.py [--cifar ../shared/datasets/cifar10] [--hf-images 300]

Prints: k-means fit time on 1M real CIFAR-10 pixels; LUT build time against a brute-force pass (timed on a
slice of the colour cube and scaled to all 2^24 colours); tokens/s of the LUT, of a plain numpy argmin and of
transformers' ImageGPTImageProcessor on the same decoded images, with their tokens compared.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from igpt.data.palette import LUT_SIZE, Palette, build_lut, nearest_centre

ROOT = Path(__file__).resolve().parents[1]


def load(cifar: Path, n: int) -> np.ndarray:
    files = sorted(cifar.glob("train-*.parquet")) or [ROOT / "igpt" / "data" / "cifar10_sample.parquet"]
    table = pq.read_table(files[0], columns=["image"]).slice(0, n)
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column(0).to_pylist()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cifar", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10")
    ap.add_argument("--hf-images", type=int, default=300)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")

    imgs = load(args.cifar, 1024)  # 1024 images x 1024 pixels = 1,048,576 pixels
    px = imgs.reshape(-1, 3)
    t = time.perf_counter()
    pal = Palette.fit(px, seed=0)
    fit_s = time.perf_counter() - t
    n_distinct = len(np.unique((px[:, 0].astype(np.int64) << 16) | (px[:, 1].astype(np.int64) << 8) | px[:, 2]))
    print(f"palette fit (sklearn KMeans, 512 centres, max_iter 100) on {len(px):,} pixels "
          f"({n_distinct:,} distinct colours): {fit_s:.1f} s")

    t = time.perf_counter()
    lut = build_lut(pal.centres)
    lut_s = time.perf_counter() - t
    # brute force on 1/64 of the cube, timed, then scaled
    c = torch.as_tensor(pal.centres, dtype=torch.float64)
    keys = torch.arange(LUT_SIZE // 64)
    t = time.perf_counter()
    for s in range(0, len(keys), 1 << 16):
        k = keys[s : s + (1 << 16)]
        p = torch.stack([(k >> 16) & 255, (k >> 8) & 255, k & 255], 1).double() / 127.5 - 1
        ((p[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    brute_s = (time.perf_counter() - t) * 64
    print(f"LUT build (pruned cube): {lut_s:.1f} s   |   brute force, all 2^24 colours x 512: ~{brute_s:.0f} s "
          f"(1/64 timed, x64)   |   speed-up {brute_s / lut_s:.0f}x")

    pal = Palette(pal.centres, _lut=lut)
    n_hf = args.hf_images
    sub = imgs[:n_hf]
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        ours = pal.quantize(imgs)
    ours_ips = reps * len(imgs) / (time.perf_counter() - t)
    t = time.perf_counter()
    ref = nearest_centre(sub, pal.centres)
    argmin_ips = n_hf / (time.perf_counter() - t)
    from transformers import ImageGPTImageProcessor

    proc = ImageGPTImageProcessor(clusters=pal.centres, do_resize=False)
    t = time.perf_counter()
    hf = np.asarray(proc(images=list(sub), return_tensors="np")["input_ids"]).reshape(sub.shape[:3])
    hf_ips = n_hf / (time.perf_counter() - t)
    same_hf = np.array_equal(hf, ours[:n_hf])
    same_ref = np.array_equal(ref, ours[:n_hf])
    print(f"pixels->tokens, 32x32 images/s:  LUT {ours_ips:,.0f}   |   numpy argmin {argmin_ips:,.0f}   |   "
          f"HF ImageGPTImageProcessor {hf_ips:,.1f}   |   LUT/HF {ours_ips / hf_ips:,.0f}x")
    print(f"tokens identical: LUT == argmin: {same_ref}; LUT == HF processor: {same_hf} ({n_hf} images)")


if __name__ == "__main__":
    main()
