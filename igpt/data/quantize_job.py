"""Write token shards of one split: Parquet files of ``key, label, tokens`` (uint16, IR^2 per image).

    python -m pipelines.quantize --palette_path runs/palette/palette.npy \\
        --data.path ../shared/datasets/cifar10 --data.split test --name cifar10-32
    ray job submit --working-dir . -- python -m pipelines.quantize ...

For eval splits and for anyone who wants a fixed tokenized copy; training tokenizes on the fly with fresh
augmentations every epoch (``igpt.data.ingest.tokenize``). Records stream through Ray Data in their input order and
the shards are cut every ``rows_per_shard`` rows, so the same job with the same seed writes byte-identical files.
Outputs go through :mod:`igpt.storage` (a folder or ``s3://``/``gs://``). Shards are written whole into
``<split>.partial/`` and moved to ``<split>/`` when the split is done, then ``<split>.summary.json`` is written: a
split is complete only once its summary is there (removed first, written last), since a move on an object store is
a copy that a crash can cut. Every skipped record is listed with its reason in ``<split>.errors.tsv``.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field

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
from igpt.storage import Loc
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
    if not cfg.palette_path:
        raise UserError("palette_path is required (fit one with pipelines.fit_palette)")
    palette = Palette.load(cfg.palette_path)  # missing file: a clear error before any work
    plan = sources.check(cfg.data)
    out = Loc(cfg.storage_path) / cfg.name
    split = cfg.data.split
    final_dir, partial, done = out / split, out / f"{split}.partial", out / f"{split}.summary.json"
    done.unlink()  # the split is complete only once its summary is back
    partial.rmtree()
    partial.mkdir()
    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic row order -> byte-identical shards
    t0 = time.perf_counter()
    t = cfg.transform
    tspec = ingest.TransformSpec.of(t, t.ir, cfg.limits.max_pixels)
    log = ingest.error_log()
    lut_ref = ray.put(palette.lut)
    with JobRun.open(cfg.tracking, cfg.storage_path, cfg.name, "quantize", cli.to_dict(cfg)) as job:
        job.log_artifact(Palette.local_file(cfg.palette_path), "palette")
        ds = ingest.tokenize(sources.read(cfg.data, plan), lut_ref, tspec, log)
        schema = pa.schema([("key", pa.string()), ("label", pa.int64()),
                            ("tokens", pa.list_(pa.uint16(), t.ir**2))])

        def write(table: pa.Table, index: int) -> None:
            buf = io.BytesIO()
            pq.write_table(table.cast(schema), buf)
            (partial / f"tokens-{index:05d}.parquet").write_bytes(buf.getvalue())  # whole: locally or one PUT

        with ingest.error_report(log, out / f"{split}.errors.tsv", cfg.limits, job) as guard:
            written, shard = ingest.write_shards(ds.iter_batches(batch_format="pyarrow", batch_size=None),
                                                 cfg.rows_per_shard, write, guard)
        seconds = time.perf_counter() - t0
        final_dir.rmtree()
        partial.move_to(final_dir)
        counts = ingest.RunCounts(guard.read, written, guard.skipped, seconds, guard.errors)
        summary = {"split": split, "images_read": counts.read, "tokenized": counts.produced,
                   "skipped": counts.skipped, "seconds": round(seconds, 2),
                   "images_per_s": round(counts.images_per_s, 1), "shards": shard, "output": str(final_dir),
                   "run_id": job.run_id, "tracking_uri": job.uri}
        done.write_text(json.dumps(summary, indent=2))  # last: the split is complete
        job.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        job.log_dict(summary, done.name)
    print(counts.line())
    print(f"{shard} shard(s) in {final_dir}; skipped records listed in {out / f'{split}.errors.tsv'}")
    return summary
