"""Write token shards of one split: Parquet files of ``key, label, tokens`` (uint16, IR^2 per image).

    python -m pipelines.quantize --palette_path runs/palette/palette.npy \\
        --data.path ../shared/datasets/cifar10 --data.split test --name cifar10-32
    ray job submit --working-dir . -- python -m pipelines.quantize ...

For eval splits and for anyone who wants a fixed tokenized copy; training tokenizes on the fly with fresh
augmentations every epoch (``igpt.data.ingest.tokenize``). Records stream through Ray Data in their input order and
the shards are cut every ``rows_per_shard`` rows, so the same job with the same seed writes byte-identical files.
Shards are written into ``<split>.partial/`` and moved to ``<split>/`` only when the split is complete.
Every skipped record is listed with its reason in ``<split>.errors.tsv`` (also an MLflow artifact).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from igpt import cli
from igpt.config import IngestLimits, TrackingConfig, TransformConfig
from igpt.data import ingest, sources
from igpt.data.palette import Palette
from igpt.data.sources import DatasetSpec
from igpt.errors import UserError
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.raysetup import init_ray
from igpt.track.tracking import JobRun


@dataclass
class QuantizeJobConfig:
    """Write token shards (Parquet: key, label, tokens uint16[IR^2]) of one split."""

    name: str = _help("run name (also the output folder under storage_path)", default="tokens")
    storage_path: PathStr = _help("folder for outputs: <storage_path>/<name>/<split>/tokens-NNNNN.parquet",
                                  default="runs")
    palette_path: PathStr = _help("palette .npy from fit_palette (required)", default="")
    data: DatasetSpec = field(default_factory=DatasetSpec)
    transform: TransformConfig = field(default_factory=TransformConfig)
    rows_per_shard: int = _help("rows per output Parquet file; >= 1", default=10_000)
    limits: IngestLimits = field(default_factory=IngestLimits)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")


def run(cfg: QuantizeJobConfig) -> dict:
    import mlflow

    if not cfg.palette_path:
        raise UserError("palette_path is required (fit one with pipelines.fit_palette)")
    palette = Palette.load(cfg.palette_path)  # missing file: a clear error before any work
    plan = sources.check(cfg.data)
    out = Path(cfg.storage_path) / cfg.name
    final_dir, partial = out / cfg.data.split, out / f"{cfg.data.split}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic row order -> byte-identical shards
    t0 = time.perf_counter()
    t = cfg.transform
    tspec = ingest.TransformSpec.of(t, t.ir, cfg.limits.max_pixels)
    log = ingest.error_log()
    lut_ref = ray.put(palette.lut)
    run_ = JobRun.open(cfg.tracking, cfg.storage_path, cfg.name, "quantize", cli.to_dict(cfg), fluent=True)
    uri = run_.uri
    with run_:
        mlflow.log_artifact(str(Palette.local_file(cfg.palette_path)), "palette")
        ds = ingest.tokenize(sources.read(cfg.data, plan), lut_ref, tspec, log)
        schema = pa.schema([("key", pa.string()), ("label", pa.int64()),
                            ("tokens", pa.list_(pa.uint16(), t.ir**2))])

        def write(table: pa.Table, index: int) -> None:
            pq.write_table(table.cast(schema), partial / f"tokens-{index:05d}.parquet")

        with ingest.error_report(log, out / f"{cfg.data.split}.errors.tsv", cfg.limits) as guard:
            written, shard = ingest.write_shards(ds.iter_batches(batch_format="pyarrow", batch_size=None),
                                                 cfg.rows_per_shard, write, guard)
        seconds = time.perf_counter() - t0
        shutil.rmtree(final_dir, ignore_errors=True)
        partial.rename(final_dir)  # the split appears complete or not at all
        counts = ingest.RunCounts(guard.read, written, guard.skipped, seconds, guard.errors)
        summary = {"split": cfg.data.split, "images_read": counts.read, "tokenized": counts.produced,
                   "skipped": counts.skipped, "seconds": round(seconds, 2),
                   "images_per_s": round(counts.images_per_s, 1), "shards": shard, "output": str(final_dir),
                   "run_id": run_.run_id, "tracking_uri": uri}
        (out / f"{cfg.data.split}.summary.json").write_text(json.dumps(summary, indent=2))
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out / f"{cfg.data.split}.summary.json"))
    print(counts.line())
    print(f"{shard} shard(s) in {final_dir}; skipped records listed in {out / f'{cfg.data.split}.errors.tsv'}")
    return summary
