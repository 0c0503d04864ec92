"""Set-up cost of a many-epoch training stream, each way beside the others, from one run.

    .venv/bin/python benchmarks/epochs_setup.py [--data ../shared/datasets/cifar10] [--epochs 100]

On the CIFAR-10 training split (Parquet): the time to build the Ray Dataset and the time from there to the first
tokenized batch (what a training run waits for before its first step), then the rate a little later, for

1. ``sources.read(epochs=1)``: one pass (each read unit its own root block);
2. ``sources.read(epochs=N, shuffle_seed=0)``: N passes in one Dataset (one root block, split as the reads go);
3. the same N passes with a root block per unit (``ROOT_BLOCKS_MAX`` raised): why (2) splits as it goes;
4. the old way: N one-pass Datasets, each tokenized for its epoch, unioned.

Every way tokenizes with the CIFAR training augmentation, as pretraining does. Worker processes are warmed first.
The union's later rate is inflated: its other branches have run ahead while the first batch was awaited.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def palette():
    """A 512-colour palette fitted in seconds on 100 real images: token values do not matter here."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from igpt.data.palette import Palette

    images = pq.read_table(ROOT / "igpt" / "data" / "cifar10_sample.parquet").column("image").to_pylist()[:100]
    px = np.concatenate([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).reshape(-1, 3) for b in images])
    return Palette.fit(px, max_iter=5)


def measure(build, batches: int, skip: int = 10) -> tuple[float, float, float]:
    """(seconds to build, seconds from there to the first batch, images/s over ``batches`` batches once ``skip``
    more are out: the first seconds start worker processes and fill queues)."""
    t0 = time.perf_counter()
    ds = build()
    t1 = time.perf_counter()
    it = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    next(it)
    t2 = time.perf_counter()
    for _ in range(skip):
        next(it)
    t3 = time.perf_counter()
    n = sum(next(it).num_rows for _ in range(batches))
    t4 = time.perf_counter()
    it.close()  # stops the stream: the rest of the epochs are never read
    return t1 - t0, t2 - t1, n / (t4 - t3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batches", type=int, default=30, help="batches (read units) the rate is taken over")
    args = p.parse_args()

    import ray

    from igpt.data import ingest, sources
    from igpt.raysetup import configure_data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    configure_data()
    ray.data.DataContext.get_current().enable_progress_bars = False
    lut = ray.put(palette().lut)
    log = ingest.ErrorLog.remote()
    spec = sources.DatasetSpec(args.data, "parquet", "train")
    plan = sources.check(spec)

    def tokens(ds, epoch: int = 0):
        return ingest.tokenize(ds, lut, ingest.TransformSpec("cifar", 32, True, seed=0, epoch=epoch), log)

    def old_way():
        passes = [tokens(sources.read(spec, plan), e) for e in range(args.epochs)]
        return passes[0].union(*passes[1:])

    def root_block_per_unit():
        sources.ROOT_BLOCKS_MAX = 10**9
        try:
            return tokens(sources.read(spec, plan, epochs=args.epochs, shuffle_seed=0))
        finally:
            sources.ROOT_BLOCKS_MAX = saved

    saved = sources.ROOT_BLOCKS_MAX
    measure(lambda: tokens(sources.read(spec, plan)), 2, 0)  # warm the worker processes and their palette table
    ways = {
        "read(epochs=1)": lambda: tokens(sources.read(spec, plan)),
        f"read(epochs={args.epochs}, shuffle_seed=0)": lambda: tokens(
            sources.read(spec, plan, epochs=args.epochs, shuffle_seed=0)),
        f"read(epochs={args.epochs}), a root block per unit": root_block_per_unit,
        f"old: {args.epochs} x read(epochs=1) unioned": old_way,
    }
    print(f"CIFAR-10 train at {args.data}: {plan.count:,} records in {len(plan.units)} read units; 2 CPUs")
    print(f"{'way':<44}{'build s':>9}{'first batch s':>15}{'then images/s':>15}")
    for name, build in ways.items():
        b, first, rate = measure(build, args.batches)
        print(f"{name:<44}{b:>9.2f}{first:>15.2f}{rate:>15,.0f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
