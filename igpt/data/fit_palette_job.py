"""Fit the k-means colour palette on pixels sampled across a dataset with Ray Data.

    python -m pipelines.fit_palette --data.path ../shared/datasets/cifar10 --data.format parquet
    ray job submit --working-dir . -- python -m pipelines.fit_palette --data.path s3://bucket/imagenet ...

Each record is decoded and brought to the input resolution with the *eval* transform, and the same number of
pixels is drawn from each (seeded by its key), so the sample spreads evenly over the dataset. Outputs, in
``<storage_path>/<name>/`` and as MLflow artifacts: ``palette.npy`` (float32 (K, 3), the HF/official format),
``swatch.png``, ``errors.tsv`` (every skipped record with its reason) and ``summary.json``. The palette's lookup
table (every 24-bit colour's token, 32 MB) is cached beside ``palette.npy`` on disk, named by the palette's hash,
and not logged: it is a function of the palette, rebuilt from it in a few seconds wherever it is missing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from igpt import cli
from igpt.config import IngestLimits, PaletteConfig, TrackingConfig, TransformConfig
from igpt.data import ingest, sources
from igpt.data.palette import Palette
from igpt.data.sources import DatasetSpec
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.raysetup import init_ray
from igpt.storage import Loc
from igpt.track.tracking import JobRun


@dataclass
class FitPaletteJobConfig:
    """Sample pixels across a dataset with Ray Data and fit the k-means palette."""

    name: str = _help("run name (also the output folder under storage_path)", default="palette")
    storage_path: PathStr = _help("folder for outputs (the palette, its table, swatch, report)", default="runs")
    data: DatasetSpec = field(default_factory=DatasetSpec)
    transform: TransformConfig = field(default_factory=TransformConfig)
    palette: PaletteConfig = field(default_factory=PaletteConfig)
    n_colors: int = _help("palette size; 2..65535", default=512)
    limits: IngestLimits = field(default_factory=IngestLimits)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def run(cfg: FitPaletteJobConfig) -> dict:
    plan = sources.check(cfg.data)  # a bad path or format fails here, before any work
    out = Loc(cfg.storage_path) / cfg.name  # a local folder, or s3://… / gs://…
    init_ray()
    t0 = time.perf_counter()
    # the record seed is the palette's (--palette.seed): it draws each image's pixel sample, as it does the k-means
    tspec = replace(ingest.TransformSpec.of(cfg.transform, cfg.transform.ir, cfg.limits.max_pixels, train=False,
                                            epoch=0), seed=cfg.palette.seed)
    n_records = plan.count if plan.count is not None else None
    if cfg.data.max_images:
        n_records = min(n_records or cfg.data.max_images, cfg.data.max_images)
    # enough pixels per image to reach the target; 64 per image when the record count is unknown up front
    per_image = max(1, -(-cfg.palette.sample_pixels // n_records)) if n_records else 64
    per_image = min(per_image, cfg.transform.ir**2)
    log = ingest.error_log()
    with JobRun.open(cfg.tracking, cfg.storage_path, cfg.name, "fit_palette", cli.to_dict(cfg)) as job:
        ds = ingest.sample_pixels(sources.read(cfg.data, plan), per_image, tspec, log)
        chunks = []
        with ingest.error_report(log, out / "errors.tsv", cfg.limits, job) as guard:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                chunks.append(batch["rgb"].combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, 3))
                guard.check()
        read, skipped = guard.read, guard.skipped
        px = np.concatenate(chunks) if chunks else np.zeros((0, 3), np.uint8)
        if len(px) > cfg.palette.sample_pixels:
            px = px[np.random.default_rng(cfg.palette.seed).choice(len(px), cfg.palette.sample_pixels, replace=False)]
        read_s = time.perf_counter() - t0
        t = time.perf_counter()
        palette = Palette.fit(px, n_colors=cfg.n_colors, seed=cfg.palette.seed, max_iter=cfg.palette.max_iter)
        fit_s = time.perf_counter() - t
        staging = Path(tempfile.mkdtemp(prefix="igpt-palette-"))  # written here, then put whole into `out`
        palette.save(staging / "palette.npy")
        ingest.swatch(palette.centres).save(staging / "swatch.png")
        path = str(out / "palette.npy")
        summary = {"images_read": read, "images_sampled": read - skipped, "skipped": skipped,
                   "pixels": int(len(px)), "pixels_per_image": per_image, "read_seconds": round(read_s, 2),
                   "fit_seconds": round(fit_s, 2), "lut_seconds": round(palette.lut_seconds or 0.0, 2),
                   "images_per_s": round(read / read_s, 1) if read_s else 0.0, "palette": str(path),
                   "run_id": job.run_id, "tracking_uri": job.uri}
        (staging / "summary.json").write_text(json.dumps(summary, indent=2))
        job.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        for f in ("palette.npy", "swatch.png", "summary.json"):
            job.log_artifact(staging / f)
        out.put_files(staging)  # the palette, its lookup table, the swatch, the summary
        shutil.rmtree(staging)
    print(f"read {read:,} images, skipped {skipped:,}, sampled {len(px):,} pixels in {read_s:.1f} s; "
          f"k-means {fit_s:.1f} s; lookup table {palette.lut_seconds or 0:.1f} s")
    print(f"palette: {path}  (MLflow run {summary['run_id']} at {job.uri})")
    return summary
