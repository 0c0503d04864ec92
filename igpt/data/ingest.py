"""Records -> augmented, tokenized rows, through Ray Data; every record that fails is counted and listed.

``tokenize(ds, ...)`` maps the reader's records (see ``igpt.data.sources``) to rows ``key, label, tokens`` (uint16,
IR^2 per image). A record's augmentation is drawn for its own epoch: ``TransformSpec.epoch`` plus the record's
``epoch`` column, so one dataset can hold many differently augmented passes. A record that cannot be decoded or
transformed is skipped *alone* (never its block or shard) and its key and reason go to an :class:`ErrorLog`
actor, which also counts every record seen, so the driver can report read/tokenized/skipped and stop a run whose
error rate passes a threshold.

The palette's 2^24 lookup table (32 MiB) travels once through Ray's object store; each worker process maps it
read-only and keeps it for all its batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from igpt.data import transforms
from igpt.data.images import BadImage
from igpt.data.palette import colour_keys
from igpt.storage import Loc


@ray.remote(num_cpus=0)
class ErrorLog:
    """Counts records seen and keeps (key, reason) of every skipped one. With ``limits`` (an ``IngestLimits``:
    jobs whose stream is consumed inside Ray Train workers, where no driver loop checks), the stream itself stops
    once the skipped share passes the budget: the batch that crosses it raises :class:`ErrorRateExceeded`."""

    def __init__(self, limits=None, report: str | None = None):
        self.read = 0
        self.errors: list[tuple[str, str]] = []
        self.limits, self.report = limits, report

    def add(self, n_read: int, errors: list[tuple[str, str]]) -> str | None:
        """Count a batch; the budget's verdict (a message when it is exceeded, else None)."""
        self.read += n_read
        self.errors.extend(errors)
        if self.limits is None:
            return None
        try:
            check_error_rate(self.read, len(self.errors), self.limits.max_error_rate, self.limits.min_records,
                             report=self.report)
        except ErrorRateExceeded as e:
            return str(e)
        return None

    def stats(self) -> tuple[int, int]:
        return self.read, len(self.errors)

    def all_errors(self) -> list[tuple[str, str]]:
        return sorted(self.errors)


_LUT_CACHE: dict[str, np.ndarray] = {}


def error_log(limits=None, report=None):
    """A new :class:`ErrorLog`, on this (the driver's) node: on a cluster it must outlive any worker node, since
    every read task and training worker reports to it, and a lost node would take the counts and the budget
    with it. ``report``: where the job writes the error report, named in the budget's message."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ErrorLog.options(scheduling_strategy=here).remote(limits, None if report is None else str(report))


def _lut(ref_box: list) -> np.ndarray:
    ref = ref_box[0]
    key = ref.hex()
    if key not in _LUT_CACHE:
        _LUT_CACHE.clear()
        _LUT_CACHE[key] = ray.get(ref)
    return _LUT_CACHE[key]


@dataclass
class TransformSpec:
    recipe: transforms.Recipe
    resolution: int
    train: bool
    seed: int = 0
    epoch: int = 0
    draft: bool = True
    max_pixels: int = 0  # larger encoded images are skipped and listed (0: PIL's default); --limits.max_pixels

    @classmethod
    def of(cls, t, resolution: int, max_pixels: int, *, train: bool | None = None,
           epoch: int | None = None) -> TransformSpec:
        """The one way a job builds it: from its ``--transform.*`` (an ``igpt.config.TransformConfig``) at
        ``resolution``; ``train`` (default ``--transform.augment``) and ``epoch`` (default ``--transform.epoch``)
        where the job decides them (an eval split never augments)."""
        return cls(t.recipe, resolution, t.augment if train is None else train, t.seed,
                   t.epoch if epoch is None else epoch, t.draft, max_pixels)


def record_pixels(row_image: bytes, raw_size: int, key: str, t: TransformSpec,
                  epoch: int | None = None) -> np.ndarray:
    """One record -> uint8 (IR, IR, 3) under the transform, drawn for ``epoch`` (default ``t.epoch``); raises
    BadImage."""
    if raw_size:
        arr = np.frombuffer(row_image, np.uint8)
        if arr.size != raw_size * raw_size * 3:
            raise BadImage(f"raw record has {arr.size} bytes, expected {raw_size}x{raw_size}x3")
        image = arr.reshape(raw_size, raw_size, 3)
    else:
        image = row_image
    return transforms.apply(image, t.recipe, t.resolution, t.train, t.seed, t.epoch if epoch is None else epoch,
                            key, t.draft, t.max_pixels)


def _epochs(batch: pa.Table, t: TransformSpec) -> list[int]:
    """Each record's epoch: ``t.epoch`` offset by the record's pass (``sources.read(epochs=...)``), so a caller
    that builds one dataset per epoch with ``TransformSpec(epoch=e)`` gets what it always did."""
    if "epoch" not in batch.column_names:
        return [t.epoch] * batch.num_rows
    return [t.epoch + e for e in batch["epoch"].to_pylist()]


def _good_records(batch: pa.Table, t: TransformSpec, log):
    """(row, key, label, uint8 pixels, epoch) of every record of the batch that decodes and transforms; the others,
    with their reasons, and the count of records seen go to the error log once the batch is done."""
    errors = []
    cols = [batch[c].to_pylist() for c in ("key", "label", "image", "raw_size", "error")]
    for row, (key, label, image, raw_size, err, epoch) in enumerate(zip(*cols, _epochs(batch, t), strict=False)):
        if err:
            errors.append((key, err))
            continue
        try:
            px = record_pixels(image, raw_size, key, t, epoch)
        except BadImage as e:
            errors.append((key, str(e)))
            continue
        yield row, key, label, px, epoch
    over = ray.get(log.add.remote(batch.num_rows, errors))  # wait: counts are exact once a batch is out
    if over:
        raise ErrorRateExceeded(over)


class _Tokenize:
    def __init__(self, lut_box: list, t: TransformSpec, log, carry: tuple[str, ...]):
        self.lut_box, self.t, self.log, self.carry = lut_box, t, log, carry

    def __call__(self, batch: pa.Table) -> pa.Table:
        ir = self.t.resolution
        if "tokens" in batch.column_names:  # a token split (sources' format "tokens"): counted, nothing decoded
            return self._pretokenized(batch, ir)
        lut = _lut(self.lut_box)
        rows, keys, labels, toks = [], [], [], []
        for row, key, label, px, _ in _good_records(batch, self.t, self.log):
            rows.append(row)
            toks.append(px)
            keys.append(key)
            labels.append(label)
        # one vectorised lookup for the whole batch
        flat = lut[colour_keys(np.stack(toks))].reshape(-1) if toks else np.zeros(0, np.uint16)
        out = pa.table({
            "key": pa.array(keys, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint16()), ir * ir),
        })
        for c in self.carry:
            out = out.append_column(c, batch[c].take(pa.array(rows, pa.int64())))
        return out

    def _pretokenized(self, batch: pa.Table, ir: int) -> pa.Table:
        size = batch.schema.field("tokens").type.list_size
        if size != ir * ir:
            raise ValueError(f"the token split holds {size} tokens per image; this run's resolution {ir} needs "
                             f"{ir * ir}")
        ray.get(self.log.add.remote(batch.num_rows, []))
        return batch.select(["key", "label", "tokens", *self.carry])


def tokenize(ds, lut_ref, t: TransformSpec, log, batch_size: int | None = None, carry: tuple[str, ...] = ()):
    """The tokenized Ray Dataset (columns key, label, tokens: fixed_size_list<uint16>[IR^2], then the input's
    ``carry`` columns of each good record, e.g. ``("slot", "index")``, the stream position of
    ``sources.read``). None by default: the quantize job writes its rows under a fixed key/label/tokens schema.

    ``batch_size=None`` works block by block: a fixed batch size would make Ray bundle the reader's small
    work units (one Parquet row group each) into one task and serialise the whole read."""
    return ds.map_batches(_Tokenize([lut_ref], t, log, tuple(carry)), batch_format="pyarrow", batch_size=batch_size)


def materialize_eval(ds):
    """An evaluation split (validation, test) computed once, in a fixed order, and kept in the object store.

    Ray Train hands a split it does not shard to every worker whole, and each pass over a lazy dataset re-runs
    read -> decode -> tokenize: on 2 cores that cost 17-156 s per evaluation of 500 CIFAR-10 images while a
    training step took 0.36 s. Evaluation splits are small enough to hold (ImageNet's 50,000 validation images
    at 64x64 are 410 MB of uint16 tokens). Ordered, so the first images (the completion grid)
    are the same on every run."""
    ds.context.execution_options.preserve_order = True  # the dataset's own context, not the training split's
    return ds.materialize()


class _SamplePixels:
    def __init__(self, per_image: int, t: TransformSpec, log):
        self.per_image, self.t, self.log = per_image, t, log

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for _, key, _, px, epoch in _good_records(batch, self.t, self.log):
            px = px.reshape(-1, 3)
            rng = np.random.default_rng(np.frombuffer(  # own stream, independent of the crop draws
                transforms.record_rng(self.t.seed, epoch, key, stream=1)._u, np.uint64))
            k = min(self.per_image, len(px))
            out.append(px[rng.choice(len(px), size=k, replace=False)])
        flat = np.concatenate(out) if out else np.zeros((0, 3), np.uint8)
        return pa.table({"rgb": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.uint8()), 3)})


def sample_pixels(ds, per_image: int, t: TransformSpec, log, batch_size: int | None = None):
    """Dataset of sampled pixels (column rgb: fixed_size_list<uint8>[3]), ``per_image`` from each record."""
    return ds.map_batches(_SamplePixels(per_image, t, log), batch_format="pyarrow", batch_size=batch_size)


@dataclass
class RunCounts:
    """What a job reports at the end: images read, tokenized, skipped, time, rate; and the skipped records."""

    read: int = 0
    produced: int = 0
    skipped: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"read {self.read:,} | tokenized {self.produced:,} | skipped {self.skipped:,} | "
                f"{self.seconds:.1f} s | {self.images_per_s:,.0f} images/s")


class ErrorRateExceeded(RuntimeError):
    pass


def check_error_rate(read: int, skipped: int, max_rate: float, min_records: int, final: bool = False,
                     report: str | None = None) -> None:
    """Stop a run whose skipped fraction passes ``max_rate`` (judged once ``min_records`` are read, and at the end);
    the message names ``report``, the file listing the skipped keys and reasons."""
    if read and (final or read >= min_records) and skipped / read > max_rate:
        raise ErrorRateExceeded(
            f"{skipped} of {read} records ({100 * skipped / read:.2f}%) could not be read, over the limit of "
            f"{100 * max_rate:.2f}% (--limits.max_error_rate); keys and reasons: {report or 'the error report'}")


class error_report:
    """Context for a job's read loop: ``check()`` after each batch stops the run once the error rate passes the
    limit; on leaving (normally or not) the report of every skipped record is written to ``path`` and logged to
    the job's MLflow run (a :class:`~igpt.track.tracking.JobRun`), then the final rate is judged."""

    def __init__(self, log, path, limits, job=None):
        self.log, self.path, self.limits, self.job = log, path, limits, job
        self.read = self.skipped = 0

    def __enter__(self):
        return self

    def check(self, final: bool = False) -> None:
        self.read, self.skipped = ray.get(self.log.stats.remote())
        check_error_rate(self.read, self.skipped, self.limits.max_error_rate, self.limits.min_records, final,
                         report=str(self.path))

    def __exit__(self, exc_type, exc, tb):
        self.errors = ray.get(self.log.all_errors.remote())
        self.read, self.skipped = ray.get(self.log.stats.remote())
        text = write_error_report(self.path, self.errors)
        if self.job is not None:
            self.job.log_text(text, Loc(self.path).name)  # the report may live on object storage
        if exc_type is None:
            self.check(final=True)
        return False


def write_error_report(path, errors: list[tuple[str, str]]) -> str:
    """Tab-separated ``key<TAB>reason`` lines, one per skipped record, with a header, to ``path`` (local or on
    object storage); returns the text."""
    lines = ["key\treason"] + [f"{k}\t{r.replace(chr(9), ' ').replace(chr(10), ' ')}" for k, r in errors]
    text = "\n".join(lines) + "\n"
    Loc(path).write_text(text)
    return text


def swatch(centres: np.ndarray, cell: int = 16):
    """A picture of the palette: the colours as a 16-wide grid of squares, ordered by luminance."""
    from PIL import Image

    rgb = np.rint(127.5 * (np.asarray(centres, np.float64) + 1)).clip(0, 255).astype(np.uint8)
    order = np.argsort(rgb @ np.array([0.299, 0.587, 0.114]))
    cols = 16
    rows = -(-len(rgb) // cols)
    grid = np.full((rows * cols, 3), 255, np.uint8)
    grid[: len(rgb)] = rgb[order]
    img = grid.reshape(rows, cols, 3).repeat(cell, 0).repeat(cell, 1)
    return Image.fromarray(img)


def write_shards(batches, rows_per_shard: int, write, guard) -> tuple[int, int]:
    """The one shard writer (quantize's token shards, extract's feature shards): a stream of Arrow batches cut
    into shards of exactly ``rows_per_shard`` rows in stream order (the last one shorter), each handed to
    ``write(table, index)``; ``guard.check()`` after every batch enforces the error budget. The same stream cuts
    the same shards, so a repeated job writes identical files. Returns (rows written, shards written)."""
    pending, buffered, rows, shards = [], 0, 0, 0
    for batch in batches:
        if batch.num_rows:
            pending.append(batch)
            buffered += batch.num_rows
        while buffered >= rows_per_shard:
            table = pa.concat_tables(pending)
            write(table.slice(0, rows_per_shard), shards)
            rest = table.slice(rows_per_shard)
            pending, buffered = ([rest] if rest.num_rows else []), rest.num_rows
            rows, shards = rows + rows_per_shard, shards + 1
        guard.check()
    if buffered:
        write(pa.concat_tables(pending), shards)
        rows, shards = rows + buffered, shards + 1
    return rows, shards
