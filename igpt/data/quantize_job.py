"""Write token shards of one split: Parquet files of ``key, label, tokens`` (uint16, IR^2 per image).

    python -m pipelines.quantize --palette_path runs/palette/palette.npy \\
        --data.path ../shared/datasets/cifar10 --data.split test --name cifar10-32
    ray job submit --working-dir . -- python -m pipelines.quantize ...

Training reads the split as ``--train.format tokens --train.path <storage_path>/<name>``: nothing decoded, every
epoch's augmentation from its pass (``--passes``). Records stream through Ray Data in their input order and the
shards are cut every ``rows_per_shard`` rows, so the same job with the same seed writes byte-identical files.
Outputs go through :mod:`igpt.storage` (a folder or ``s3://``/``gs://``). Each pass's shards are written whole
into ``<split>.partial/pass-NNN/``, moved to ``<split>/`` when every pass is done, then ``<split>.summary.json`` is
written: a split is complete only once its summary is there (removed first, written last), since a move on an
object store is a copy that a crash can cut. Every skipped record is listed with its reason in
``<split>.errors.tsv``.
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
    """Write token shards (Parquet: key, label, tokens uint16[IR^2]) of one split, in one or more augmented passes."""

    name: str = _help("run name (also the output folder under storage_path)", default="tokens")
    storage_path: PathStr = _help("folder for outputs: <storage_path>/<name>/<split>/pass-NNN/tokens-NNNNN.parquet",
                                  default="runs")
    palette_path: PathStr = _help("palette .npy from fit_palette (required)", default="")
    data: DatasetSpec = field(default_factory=DatasetSpec)
    transform: TransformConfig = field(default_factory=TransformConfig)
    passes: int = _help("passes to write: pass p holds the augmentations of epoch --transform.epoch + p (seed "
                        "--transform.seed); a run training from the split reads pass e mod passes in its epoch e. "
                        "> 1 needs --transform.augment; each pass costs the split's size again", default=1)
    rows_per_shard: int = _help("rows per output Parquet file; >= 1", default=10_000)
    limits: IngestLimits = field(default_factory=IngestLimits)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")
        if self.passes < 1 or (self.passes > 1 and not self.transform.augment):
            raise ValueError(f"passes must be >= 1, and > 1 only with --transform.augment (got {self.passes}: "
                             "unaugmented passes would be identical copies)")


class _NoBudget:
    """Later passes hold pass 0's records (checked): their error budget was judged on pass 0."""

    def check(self) -> None:
        pass


def _write_pass(cfg: QuantizeJobConfig, plan, lut_ref, p: int, folder: Loc, log, guard) -> tuple[int, int]:
    """Pass ``p`` (epoch ``--transform.epoch + p``) tokenized into ``folder``: (rows, shards)."""
    t = cfg.transform
    tspec = ingest.TransformSpec.of(t, t.ir, cfg.limits.max_pixels, epoch=t.epoch + p)
    ds = ingest.tokenize(sources.read(cfg.data, plan), lut_ref, tspec, log)
    schema = pa.schema([("key", pa.string()), ("label", pa.int64()), ("tokens", pa.list_(pa.uint16(), t.ir**2))])

    def write(table: pa.Table, index: int) -> None:
        buf = io.BytesIO()
        pq.write_table(table.cast(schema), buf)
        (folder / f"tokens-{index:05d}.parquet").write_bytes(buf.getvalue())  # whole: locally or one PUT

    return ingest.write_shards(ds.iter_batches(batch_format="pyarrow", batch_size=None), cfg.rows_per_shard, write,
                               guard)


def run(cfg: QuantizeJobConfig) -> dict:
    if not cfg.palette_path:
        raise UserError("palette_path is required (fit one with pipelines.fit_palette)")
    palette = Palette.load(cfg.palette_path)  # missing file: a clear error before any work
    plan = sources.check(cfg.data)
    out = Loc(cfg.storage_path) / cfg.name
    split, t = cfg.data.split, cfg.transform
    final_dir, partial, done = out / split, out / f"{split}.partial", out / f"{split}.summary.json"
    done.unlink()  # the split is complete only once its summary is back
    partial.rmtree()
    init_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # byte-identical shards
    t0 = time.perf_counter()
    log, lut_ref = ingest.error_log(), ray.put(palette.lut)
    with JobRun.open(cfg.tracking, cfg.storage_path, cfg.name, "quantize", cli.to_dict(cfg)) as job:
        job.log_artifact(Palette.local_file(cfg.palette_path), "palette")
        with ingest.error_report(log, out / f"{split}.errors.tsv", cfg.limits, job) as guard:
            written, shard = _write_pass(cfg, plan, lut_ref, 0, partial / sources.TOKEN_PASS.format(0), log, guard)
        for p in range(1, cfg.passes):
            again = _write_pass(cfg, plan, lut_ref, p, partial / sources.TOKEN_PASS.format(p), ingest.error_log(),
                                _NoBudget())
            if again != (written, shard):  # the units of a token split are pass 0's: every pass must match it
                raise RuntimeError(f"pass {p} wrote {again[0]} rows in {again[1]} shards, pass 0 {written} in "
                                   f"{shard}: did the source change while it was read?")
        seconds = time.perf_counter() - t0
        final_dir.rmtree()
        partial.move_to(final_dir)
        counts = ingest.RunCounts(guard.read, written, guard.skipped, seconds, guard.errors)
        summary = {"split": split, "images_read": counts.read, "tokenized": counts.produced,
                   "skipped": counts.skipped, "seconds": round(seconds, 2), "passes": cfg.passes,
                   "images_per_s": round(counts.images_per_s * cfg.passes, 1), "shards": shard,
                   "output": str(final_dir), "run_id": job.run_id, "tracking_uri": job.uri,
                   # what a run training from the split must agree with (sources.check_token_split)
                   "palette_digest": palette.digest, "palette_path": cfg.palette_path, "resolution": t.ir,
                   "recipe": t.recipe, "augment": t.augment, "seed": t.seed,
                   "pass_epochs": [t.epoch + p for p in range(cfg.passes)], "source": cli.to_dict(cfg.data)}
        done.write_text(json.dumps(summary, indent=2))  # last: the split is complete
        job.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool)})
        job.log_dict(summary, done.name)
    print(counts.line())
    print(f"{cfg.passes} pass(es) of {shard} shard(s) in {final_dir}; skipped records listed in "
          f"{out / f'{split}.errors.tsv'}")
    return summary
