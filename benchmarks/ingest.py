"""Ingestion throughput, each figure beside its baseline, from one run.

    .venv/bin/python benchmarks/ingest.py [--cifar ../shared/datasets/cifar10] [--n 50000] [--hf 300]

1. Real CIFAR-10 shards -> tokens through Ray Data (read_parquet -> decode -> quantize, the quantize job's
   path), against bare JPEG decoding of the same records (one process per core, no Ray) and against
   transformers' ImageGPTImageProcessor on the same images.
2. ImageNet-like JPEGs (~500x375, built from real photographs: scikit-learn's two sample images and
   scikit-image's colour photographs, random crops and rescales re-encoded at quality 90): the ImageNet train
   transform at IR 32 and 64, with and without reduced-scale (draft) decoding, against bare full decoding.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _decode_all(images: list[bytes]) -> int:
    for b in images:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    return len(images)


def bare_decode(images: list[bytes], procs: int) -> float:
    """images/s of plain Pillow decoding to RGB arrays, split over ``procs`` processes (no Ray)."""
    chunks = [images[i::procs] for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_decode_all, [c[:50] for c in chunks])  # warm the workers
        rates = []
        for _ in range(2):  # best of two, as for our pipeline
            t = time.perf_counter()
            n = sum(pool.map(_decode_all, chunks))
            rates.append(n / (time.perf_counter() - t))
        return max(rates)


def _udf_in_process(cifar: Path, files: list[Path], palette, n: int) -> float:
    """images/s of the reader + tokenize UDFs called directly, no Ray: what our per-record code costs."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from igpt.data import ingest, sources

    class _Log:  # stands in for the ErrorLog actor handle; ingest._lut reads the cache filled below
        class add:  # noqa: N801
            @staticmethod
            def remote(*_):
                return None

    class _Ref:
        def hex(self):
            return "bench"

    ingest._LUT_CACHE["bench"] = palette.lut
    get = ingest.ray.get
    ingest.ray.get = lambda x: x  # noqa: E731 - the fake log returns None; nothing else is fetched
    try:
        read = sources._ParquetRows(sources.DatasetSpec(str(cifar)), pafs.LocalFileSystem())
        tok = ingest._Tokenize([_Ref()], ingest.TransformSpec("cifar", 32, False), _Log())
        t = time.perf_counter()
        done = 0
        for f in files:
            for g in range(pq.ParquetFile(f).num_row_groups):
                done += tok(read(pa.table({"file": [str(f)], "row_group": [g], "rows": [1000]}))).num_rows
                if done >= n:
                    return done / (time.perf_counter() - t)
        return done / (time.perf_counter() - t)
    finally:
        ingest.ray.get = get


def photographs(n: int, seed: int = 0) -> list[bytes]:
    """ImageNet-like JPEGs from real photographs: random crops, rescaled to ~500x375, quality 90."""
    from skimage import data as skd
    from sklearn.datasets import load_sample_images

    sources = list(load_sample_images().images)
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
        with contextlib.suppress(Exception):  # a missing optional image only narrows the mix
            sources.append(getattr(skd, name)())
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = Image.fromarray(sources[i % len(sources)]).convert("RGB")
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        tw = int(rng.uniform(400, 560))
        img = src.crop((x, y, x + cw, y + ch)).resize((tw, max(1, int(tw * ch / cw))), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out, len(sources)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cifar", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10")
    ap.add_argument("--n", type=int, default=50_000, help="CIFAR-10 train records to tokenize")
    ap.add_argument("--hf", type=int, default=300, help="images for the (slow) HF processor baseline")
    ap.add_argument("--photos", type=int, default=400)
    args = ap.parse_args()
    cores = os.cpu_count()
    import ray

    from igpt.data import ingest, sources
    from igpt.data.palette import Palette
    from igpt.data.sources import DatasetSpec

    files = sorted(args.cifar.glob("train-*.parquet"))
    table = pq.read_table(files, columns=["key", "image"]).slice(0, args.n)
    images = table["image"].to_pylist()
    print(f"machine: {cores} cores; CIFAR-10 records: {len(images):,} from {len(files)} shard(s)")

    # a palette on the same data, and its table, outside the timings
    rgb = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[:300]])
    palette = Palette.fit(rgb.reshape(-1, 3), max_iter=10)
    palette.lut  # noqa: B018 - build it now

    bare1 = bare_decode(images, 1)
    bare_n = bare_decode(images, cores)

    # our per-record code alone (the tokenize UDF over the same Parquet row groups), one process, no Ray
    in_process = _udf_in_process(args.cifar, files, palette, args.n)
    bare_n_in = bare_decode(images, 1)

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    from igpt.raysetup import configure_data

    configure_data()
    ray.data.DataContext.get_current().enable_progress_bars = False
    lut = ray.put(palette.lut)
    spec = DatasetSpec(str(args.cifar), "parquet", "train", max_images=args.n)
    plan = sources.check(spec)
    rates = []
    for _ in range(3):  # the first pass also warms Ray's worker processes; the best of the others counts
        log = ingest.ErrorLog.remote()
        t = time.perf_counter()
        n = 0
        ds = ingest.tokenize(sources.read(spec, plan), lut, ingest.TransformSpec("cifar", 32, False), log)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            n += batch.num_rows
        rates.append(n / (time.perf_counter() - t))
    ours = max(rates[1:])
    log = ingest.ErrorLog.remote()
    t = time.perf_counter()
    n = 0
    ds = ingest.tokenize(sources.read(spec, plan), lut, ingest.TransformSpec("cifar", 32, True, seed=1), log)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        n += batch.num_rows
    ours_aug = n / (time.perf_counter() - t)
    ray.shutdown()

    from transformers import ImageGPTImageProcessor

    proc = ImageGPTImageProcessor(clusters=palette.centres, do_resize=False)
    sub = images[: args.hf]
    t = time.perf_counter()
    pics = [Image.open(io.BytesIO(b)).convert("RGB") for b in sub]
    hf_tokens = proc(images=pics, return_tensors="np")["input_ids"]
    hf = len(sub) / (time.perf_counter() - t)
    same = np.array_equal(np.asarray(hf_tokens).reshape(len(sub), -1),
                          palette.quantize(np.stack([np.asarray(p) for p in pics])).reshape(len(sub), -1))

    print("\nCIFAR-10 shards -> tokens (images/s)")
    print(f"  ours, Ray Data on {cores} CPUs, eval (no augmentation):  {ours:>9,.0f}")
    print(f"  ours, Ray Data on {cores} CPUs, train augmentation:      {ours_aug:>9,.0f}")
    print(f"  bare JPEG decode, {cores} processes (same records):      {bare_n:>9,.0f}   -> ours = "
          f"{100 * ours / bare_n:.0f}% (augmented {100 * ours_aug / bare_n:.0f}%)")
    print(f"  bare JPEG decode, 1 process:                           {bare1:>9,.0f}")
    print(f"  ours without Ray, 1 process (read+decode+tokenize):    {in_process:>9,.0f}   -> "
          f"{100 * in_process / bare_n_in:.0f}% of bare decoding in one process ({bare_n_in:,.0f} in the same minute)")
    print(f"  HF ImageGPTImageProcessor, 1 process ({len(sub)} images): {hf:>9,.1f}   -> ours = {ours / hf:,.0f}x "
          f"(per core {ours / cores / hf:,.0f}x); identical tokens: {same}")

    from igpt.data import transforms

    photos, n_src = photographs(args.photos)
    sizes = [Image.open(io.BytesIO(p)).size for p in photos]
    print(f"\nImageNet-like JPEGs: {len(photos)} from {n_src} real photographs, mean size "
          f"{np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f}; one process")
    t = time.perf_counter()
    _decode_all(photos)
    base = len(photos) / (time.perf_counter() - t)
    print(f"  bare full decode:                                  {base:>8,.0f} images/s")
    for ir in (32, 64):
        for draft in (False, True):
            t = time.perf_counter()
            for i, p in enumerate(photos):
                transforms.apply(p, "imagenet", ir, True, seed=0, epoch=0, key=str(i), draft=draft)
            r = len(photos) / (time.perf_counter() - t)
            print(f"  ImageNet train transform, IR {ir}, draft {'on ' if draft else 'off'}:      {r:>8,.0f} images/s")
        diffs = [np.abs(transforms.apply(p, "imagenet", ir, True, key=str(i), draft=True).astype(int)
                        - transforms.apply(p, "imagenet", ir, True, key=str(i), draft=False).astype(int)).mean()
                 for i, p in enumerate(photos[:100])]
        print(f"    draft vs full decode at IR {ir}: mean abs difference {np.mean(diffs):.2f} of 255 levels "
              f"(max over images {np.max(diffs):.2f})")


if __name__ == "__main__":
    main()
