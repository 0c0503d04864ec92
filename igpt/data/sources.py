"""Dataset readers: every supported layout becomes one Ray Dataset of records, streamed, from any filesystem that
pyarrow and Ray support (local paths, ``s3://``, ``gs://``, ...).

Every reader yields rows with the same columns:

- ``key`` (str): unique, stable id of the record (relative path, ``<shard>/<member>``, ``<batch>/<index>``);
- ``label`` (int64): class index, -1 where the split has none (STL-10 unlabeled);
- ``image`` (binary): the encoded file's bytes, or raw RGB bytes (H x W x 3, row-major) when ``raw_size`` > 0;
- ``raw_size`` (int32): side of a raw square RGB image (CIFAR: 32, STL-10: 96), 0 for encoded files;
- ``error`` (str): "" for a good record; otherwise why the *reader* could not produce it (a tar member with no
  image, a shard cut short). Such rows carry no image and are counted and listed downstream, never dropped here;
- ``epoch`` (int32): which pass over the split the row belongs to (:func:`read` can stream several);
- ``slot`` (int64), ``index`` (int32): the read slot the row came from and its place in it: a stream position.

:func:`check` validates a spec (path exists, split files present, format known) before any work starts, cuts the
split into small read units (a Parquet row group, a chunk of image files, a tar shard, a CIFAR batch, a chunk of
STL-10 images) and counts exactly the records it yields.

One more format is no image layout: ``tokens``, the token shards ``pipelines.quantize`` writes (``key``, ``label``,
``tokens``: one augmented pass per folder ``pass-NNN``), read through the same plan, slots and positions; its rows
carry ``tokens`` instead of ``image`` and the tokenizer passes them through, so a run decodes nothing.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import posixpath
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from igpt.errors import UserError
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.storage import is_remote, local_path

Format = Literal["parquet", "imagefolder", "webdataset", "cifar10", "cifar100", "stl10", "tokens"]
FORMATS = ("parquet", "imagefolder", "webdataset", "cifar10", "cifar100", "stl10", "tokens")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
COLUMNS = ("key", "label", "image", "raw_size", "error", "epoch", "slot", "index")


@dataclass
class DatasetSpec:
    path: PathStr = _help("file, folder or URI of the dataset (local, s3://, gs://, ...)", default="")
    format: Format = _help(
        "parquet (key/image/label columns) | imagefolder (ImageNet: <split>/<class>/<file>, or a flat <split>/ "
        "with labels_file) | webdataset (*.tar with <key>.jpg|png + <key>.cls) | cifar10 | cifar100 (python "
        "pickles: extracted folder or the .tar.gz) | stl10 (stl10_binary folder) | tokens (pipelines.quantize's "
        "output folder <storage_path>/<name>: pre-tokenized, nothing decoded)",
        default="parquet",
    )
    split: str = _help("train | val | test (| unlabeled for stl10)", default="train")
    key_column: str = _help("parquet: key column", default="key")
    image_column: str = _help("parquet: encoded image bytes column", default="image")
    label_column: str = _help("parquet: label column", default="label")
    key_prefix: str = _help("parquet: keep only rows whose key starts with this (e.g. 'train/')", default="")
    labels_file: PathStr = _help("imagefolder: for a flat split folder, a file of '<file name> <class>' lines or "
                                 "ImageNet's LOC_val_solution.csv", default="")
    max_images: int = _help("read at most this many records (0: all), before any holdout split; for quick runs",
                            default=0)
    holdout: float = _help("share of records held out as a validation split, chosen by a hash of the key (the "
                           "same records on every run and machine); used with part", default=0.0)
    part: str = _help("all | rest (records not held out: train) | holdout (the held-out ones: val); 'all' "
                      "is train+val, for refitting on both", default="all")

    def __post_init__(self):
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.part not in ("all", "rest", "holdout"):
            raise ValueError(f"part must be all, rest or holdout, not {self.part!r}")
        if self.part != "all" and self.holdout == 0.0:
            raise ValueError(f"part={self.part!r} needs holdout > 0")

    def held_out_split(self, fraction: float) -> tuple[DatasetSpec, DatasetSpec, DatasetSpec]:
        """The one way a job splits a training set: (rest, holdout, all) at ``fraction`` held out by key hash
        (trials train on the rest and are scored on the holdout; a refit trains on all)."""
        return tuple(replace(self, holdout=fraction, part=p) for p in ("rest", "holdout", "all"))


def held_out(keys, fraction: float) -> np.ndarray:
    """Whether each key falls in the held-out share: a keyed hash, so stable across runs, readers and machines."""
    from hashlib import blake2b

    return np.array([int.from_bytes(blake2b(str(k).encode(), digest_size=8).digest(), "big") < fraction * 2**64
                     for k in keys], bool)


def in_part(keys, spec: DatasetSpec) -> np.ndarray:
    """Mask of the keys that belong to ``spec.part``."""
    if spec.part == "all":
        return np.ones(len(keys), bool)
    h = held_out(keys, spec.holdout)
    return h if spec.part == "holdout" else ~h


# ---------------------------------------------------------------------------------------------- filesystem
def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if not is_remote(path):
        return pafs.LocalFileSystem(), local_path(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise SpecError(f"cannot open {path}: {e}") from None


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def _ls(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    return sorted(fs.get_file_info(pafs.FileSelector(path, recursive=recursive)), key=lambda i: i.path)


class SpecError(UserError):
    """A dataset spec that cannot be read: wrong path, unknown format, missing split."""


# ------------------------------------------------------------------------------------------------ planning
FOLDER_CHUNK = 256  # image files per read unit: ~0.1 s of decoding for CIFAR-sized JPEGs, more for photographs
STL_SIDE = 96
STL_BYTES = 3 * STL_SIDE * STL_SIDE
STL_CHUNK = 1000  # STL-10 images per read unit


@dataclass(frozen=True)
class Unit:
    """One read task's share of a split, in file order.

    ``path`` is the file to open (empty for an image-folder chunk) and ``pos`` where the unit lies in it: the
    Parquet row group, the CIFAR batch's index in the split's batch names, the first STL-10 image, or the first
    file of an image-folder chunk (an index into ``Plan.files``); 0 for a WebDataset shard. ``take``: how many of
    its records (after ``key_prefix``, before the holdout split) the unit yields; fewer than it holds only where
    ``max_images`` ends."""

    path: str
    pos: int
    take: int


@dataclass
class Plan:
    """What :func:`check` found: the files, the read units, and ``count``: exactly how many records the split
    yields (after key_prefix, max_images and holdout/part) before decoding. Records the reader marks with an
    ``error`` count; images that fail to decode are only found later, by the tokenizer."""

    spec: DatasetSpec
    fs: pafs.FileSystem
    files: list[str]
    count: int = 0
    classes: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # imagefolder flat split: file name -> label
    units: list[Unit] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # tokens: the split's summary (palette, resolution, passes, seed)


Keys = Callable[[Unit], list]  # a unit's record keys, in file order: what the holdout split hashes


def check(spec: DatasetSpec) -> Plan:
    if spec.format not in FORMATS:
        raise SpecError(f"unknown dataset format {spec.format!r}; expected one of {', '.join(FORMATS)}")
    if not spec.path:
        raise SpecError("dataset path is empty")
    fs, root = _fs(spec.path)
    info = _info(fs, root)
    if info.type == pafs.FileType.NotFound:
        raise SpecError(f"dataset path not found: {spec.path}")
    plan, keys = {
        "parquet": _plan_parquet,
        "imagefolder": _plan_imagefolder,
        "webdataset": _plan_webdataset,
        "cifar10": _plan_cifar,
        "cifar100": _plan_cifar,
        "stl10": _plan_stl10,
        "tokens": _plan_tokens,
    }[spec.format](spec, fs, root, info)
    if not plan.files:
        raise SpecError(f"no {spec.format} files for split {spec.split!r} under {spec.path}")
    plan = _cut(plan, keys)
    if not plan.units:  # only zero-row files, or a key_prefix nothing starts with (a part may still be empty)
        why = f"{len(plan.files)} file(s), none with records" + (
            f" whose key starts with key_prefix {spec.key_prefix!r}" if spec.key_prefix else "")
        raise SpecError(f"split {spec.split!r} under {spec.path} yields no records ({why})")
    return plan


def _cut(plan: Plan, keys: Keys) -> Plan:
    """Cut ``max_images`` from the units in file order (before the holdout split, as its help says; exact in
    every epoch, as each unit carries its own take), drop empty units, and count the records of ``part`` by
    hashing their keys as the reader will."""
    spec, units = plan.spec, []
    left = spec.max_images if spec.max_images > 0 else float("inf")
    for u in plan.units:
        take = min(u.take, left)
        if take > 0:
            units.append(replace(u, take=take))
            left -= take
    plan.units = units
    if spec.part == "all":
        plan.count = sum(u.take for u in units)
    else:
        plan.count = sum(int(in_part(keys(u)[:u.take], spec).sum()) for u in units)
    return plan


def _split_files(fs, root, info, exts: tuple[str, ...], split: str) -> list[str]:
    """A single file as given; in a folder: <split>/ if present, else files named <split>-* / <split>_* / <split>.*"""
    if info.type == pafs.FileType.File:
        return [root]
    sub = posixpath.join(root, split)
    if _info(fs, sub).type == pafs.FileType.Directory:
        return [i.path for i in _ls(fs, sub, recursive=True) if i.path.lower().endswith(exts)]
    names = [i for i in _ls(fs, root) if i.type == pafs.FileType.File and i.path.lower().endswith(exts)]
    return [i.path for i in names if posixpath.basename(i.path).startswith((f"{split}-", f"{split}_", f"{split}."))]


PLAN_THREADS = 32
"""Parquet files whose footers (and with a key_prefix, key columns) are read at once when a split is planned: on
an object store each file is a round trip or more (benchmarks/plan_check.py: 1,000 files, one by one vs at once)"""


def _footer(f: str, fs, spec: DatasetSpec, schema_check) -> list[tuple[int, list | None]]:
    """One Parquet file's row groups as (records, keys or None), its schema checked; a clear error naming it."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f, filesystem=fs)
    except (OSError, pa.ArrowException) as e:
        raise SpecError(f"{f} is not a readable Parquet file ({type(e).__name__}: {e}); remove or replace "
                        "it") from None
    schema_check(f, pf.schema_arrow, spec)
    groups = []
    for g in range(pf.metadata.num_row_groups):
        if spec.key_prefix:  # a unit's records are its matching keys: reads the key column only
            try:
                keys = _parquet_keys(pf, g, spec)
            except (OSError, pa.ArrowException) as e:
                raise SpecError(f"{f}, row group {g}: its key column cannot be read ({type(e).__name__}: "
                                f"{e}); remove or replace the file") from None
            groups.append((len(keys), keys))
        else:  # every row is a record: the footer says how many
            groups.append((pf.metadata.row_group(g).num_rows, None))
    return groups


def _plan_parquet(spec, fs, root, info, schema_check=None) -> tuple[Plan, Keys]:
    import pyarrow.parquet as pq

    files = _split_files(fs, root, info, (".parquet",), spec.split)
    units, known = [], {}
    # every file's footer and schema before any work starts, PLAN_THREADS at once; in file order, so the first
    # bad file is the one named
    with ThreadPoolExecutor(max(1, min(PLAN_THREADS, len(files)))) as pool:
        footers = list(pool.map(lambda f: _footer(f, fs, spec, schema_check or _check_parquet_schema), files))
    for f, groups in zip(files, footers, strict=True):
        for g, (take, keys) in enumerate(groups):
            if keys is not None:
                known[(f, g)] = keys
            units.append(Unit(f, g, take))

    def keys(u: Unit) -> list:  # only the row groups a holdout count needs, key column only
        if (u.path, u.pos) not in known:
            known[(u.path, u.pos)] = _parquet_keys(pq.ParquetFile(u.path, filesystem=fs), u.pos, spec)
        return known[(u.path, u.pos)]

    return Plan(spec, fs, files, units=units), keys


TOKEN_PASS = "pass-{:03d}"  # <split>/pass-NNN/: one augmented pass of a token split


def _plan_tokens(spec, fs, root, info) -> tuple[Plan, Keys]:
    """quantize's output: ``<split>.summary.json`` (written last: the split is complete) and the shards of every
    pass in ``<split>/pass-NNN/``; the units are pass 0's row groups (every pass holds the same records in the same
    shards: quantize checks it), read in epoch e from pass e mod passes."""
    meta = _token_summary(spec, fs, root)
    split_dir = posixpath.join(root, spec.split)
    plan, keys = _plan_parquet(replace(spec, split=TOKEN_PASS.format(0)), fs, split_dir, _info(fs, split_dir),
                               _check_token_schema)
    plan.spec, plan.meta = spec, meta
    return plan, keys


def _token_summary(spec: DatasetSpec, fs, root: str) -> dict:
    """A token split's ``<split>.summary.json``, which quantize writes last; a clear error when it is missing."""
    done = posixpath.join(root, f"{spec.split}.summary.json")
    if _info(fs, done).type != pafs.FileType.File:
        raise SpecError(f"{spec.path} holds no complete token split {spec.split!r}: {spec.split}.summary.json is "
                        "missing (pipelines.quantize writes it last; run it again to finish the split)")
    with fs.open_input_stream(done) as fh:
        return json.loads(fh.read())


def image_source(spec: DatasetSpec) -> DatasetSpec:
    """The images a split was made from: itself, or for a token split the source quantize read (its summary says),
    with the same holdout and part: the same records, un-augmented (a validation split is never augmented)."""
    if spec.format != "tokens":
        return spec
    meta = _token_summary(spec, *_fs(spec.path))
    if "source" not in meta:
        raise SpecError(f"{spec.path}: token split {spec.split!r} does not name its source images (quantized "
                        "before quantize recorded it): quantize it again")
    return replace(DatasetSpec(**meta["source"]), holdout=spec.holdout, part=spec.part)


def _check_token_schema(path: str, schema: pa.Schema, spec: DatasetSpec) -> None:
    tokens = schema.field("tokens").type if "tokens" in schema.names else None
    if "key" not in schema.names or not (pa.types.is_fixed_size_list(tokens) and tokens.value_type == pa.uint16()):
        raise SpecError(f"{path} is no token shard (key, label, tokens: fixed_size_list<uint16>); has {schema}")


def check_token_split(plan: Plan, palette_digest: str, resolution: int, what: str) -> None:
    """A token split must be of the run's palette and resolution: tokens are palette indices at one size."""
    m = plan.meta
    if m.get("palette_digest") != palette_digest:
        raise UserError(f"{what} ({plan.spec.path}) was tokenized with another palette ({m.get('palette_path')}, "
                        f"digest {m.get('palette_digest')}) than the run's (digest {palette_digest}): quantize it "
                        "again with the run's --palette_path")
    if m.get("resolution") != resolution:
        raise UserError(f"{what} ({plan.spec.path}) holds {m.get('resolution')}x{m.get('resolution')} images; the "
                        f"model's resolution is {resolution}: quantize it again at --transform.resolution {resolution}")


def _check_parquet_schema(path: str, schema: pa.Schema, spec: DatasetSpec) -> None:
    """The three columns present with types the reader can use, in every file (a second file without ``image``
    would otherwise fail one read task mid-run with a raw Arrow error)."""
    want = {spec.key_column: ("a string or integer key", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
                              or pa.types.is_integer(t)),
            spec.image_column: ("binary (encoded image bytes)", lambda t: pa.types.is_binary(t)
                                or pa.types.is_large_binary(t)),
            spec.label_column: ("an integer class index", lambda t: pa.types.is_integer(t) or pa.types.is_null(t))}
    missing = [c for c in want if c not in schema.names]
    if missing:
        raise SpecError(f"{path} lacks column(s) {missing}; has {schema.names} (name them with "
                        f"key_column/image_column/label_column)")
    for col, (what, ok) in want.items():
        if not ok(schema.field(col).type):
            raise SpecError(f"{path}: column {col!r} is {schema.field(col).type}, expected {what}")


def _parquet_keys(pf, group: int, spec: DatasetSpec) -> list:
    import pyarrow.compute as pc

    col = pf.read_row_group(group, columns=[spec.key_column])[spec.key_column].cast(pa.string())
    return (col.filter(pc.starts_with(col, spec.key_prefix)) if spec.key_prefix else col).to_pylist()


def _plan_imagefolder(spec, fs, root, info) -> tuple[Plan, Keys]:
    if info.type != pafs.FileType.Directory:
        raise SpecError(f"imagefolder needs a folder, got a file: {spec.path}")
    split_dir = posixpath.join(root, spec.split)
    if _info(fs, split_dir).type != pafs.FileType.Directory:
        raise SpecError(f"no split folder {spec.split!r} under {spec.path}")
    train_dir = posixpath.join(root, "train")
    class_root = train_dir if _info(fs, train_dir).type == pafs.FileType.Directory else split_dir
    classes = [posixpath.basename(i.path) for i in _ls(fs, class_root) if i.type == pafs.FileType.Directory]
    entries = _ls(fs, split_dir, recursive=True)
    files = [i.path for i in entries if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_EXTS)]
    labels: dict[str, int] = {}
    flat = all(posixpath.dirname(f) == split_dir for f in files)
    if flat and files:
        if not spec.labels_file:
            raise SpecError(f"{split_dir} holds images directly; give labels_file (file name -> class)")
        labels = _read_labels_file(spec.labels_file, classes)
    # chunks of files in a keyed-hash order, not the sorted one: a sorted chunk is 256 files of one class, and a
    # micro-batch drawn from it would be one class (max_images, too, takes a spread of classes, not the first)
    files.sort(key=lambda f: _hash_order(f[len(split_dir):]))  # relative: the same order wherever it lives
    plan = Plan(spec, fs, files, classes=classes, labels=labels,
                units=[Unit("", s, min(FOLDER_CHUNK, len(files) - s)) for s in range(0, len(files), FOLDER_CHUNK)])
    index = {c: i for i, c in enumerate(classes)}
    return plan, lambda u: [_folder_record(p, spec.split, index, labels)[0] for p in files[u.pos:u.pos + u.take]]


def _hash_order(path: str) -> bytes:
    from hashlib import blake2b

    return blake2b(path.encode(), digest_size=8).digest()


def _read_labels_file(path: str, classes: list[str]) -> dict[str, int]:
    fs, p = _fs(path)
    if _info(fs, p).type != pafs.FileType.File:
        raise SpecError(f"labels_file not found: {path}")
    with fs.open_input_stream(p) as fh:
        text = fh.read().decode()
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, int] = {}
    for n, line in enumerate(text.splitlines()):
        parts = line.replace(",", " ").split()
        if len(parts) < 2 or (n == 0 and parts[0].lower() in ("imageid", "file", "filename")):
            continue
        name, cls = parts[0], parts[1]
        if cls in index:
            label = index[cls]
        elif cls.lstrip("-").isdigit():
            label = int(cls)
        else:
            raise SpecError(f"{path}:{n + 1}: unknown class {cls!r}")
        out[posixpath.splitext(posixpath.basename(name))[0]] = label
    return out


def _plan_webdataset(spec, fs, root, info) -> tuple[Plan, Keys]:
    files = _split_files(fs, root, info, (".tar",), spec.split)
    known = {}
    for f in files:  # tar headers only: tarfile seeks over the members' data in a seekable file
        with fs.open_input_file(f) as fh:
            known[f] = [r["key"] for r in _tar_records(f, fh, read=False)]
    return Plan(spec, fs, files, units=[Unit(f, 0, len(known[f])) for f in files]), lambda u: known[u.path]


_CIFAR_FILES = {
    ("cifar10", "train"): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", "test"): ["test_batch"],
    ("cifar100", "train"): ["train"],
    ("cifar100", "test"): ["test"],
}


def _plan_cifar(spec, fs, root, info) -> tuple[Plan, Keys]:
    """Unpickles every batch to count its records (the official batches hold 10,000, cifar-100's train 50,000,
    but nothing else says so): ~180 MB read once for CIFAR-10."""
    names = _CIFAR_FILES.get((spec.format, spec.split))
    if names is None:
        raise SpecError(f"{spec.format} has splits train and test, not {spec.split!r}")
    if info.type == pafs.FileType.File:  # the official .tar.gz: one unit per batch, in the archive's order
        if not _is_archive(root):
            raise SpecError(f"{spec.path}: expected the official archive (.tar.gz) or its extracted folder")
        files = [root]
        sizes = {n: len(_cifar_batch(spec.format, data)[1]) for n, data in _cifar_members(fs, root, names)}
        units = [Unit(root, names.index(n), size) for n, size in sizes.items()]
        missing = [n for n in names if n not in sizes]
    else:
        files = [posixpath.join(root, n) for n in names]
        missing = [f for f in files if _info(fs, f).type != pafs.FileType.File]
        units = [] if missing else [Unit(f, i, len(_cifar_batch(spec.format, _read_all(fs, f))[1]))
                                    for i, f in enumerate(files)]
    if missing:
        raise SpecError(f"{spec.format} batch files missing under {spec.path}: {missing}")
    return Plan(spec, fs, files, units=units), lambda u: [_cifar_key(names[u.pos], i) for i in range(u.take)]


def _plan_stl10(spec, fs, root, info) -> tuple[Plan, Keys]:
    if spec.split not in ("train", "test", "unlabeled"):
        raise SpecError(f"stl10 has splits train, test and unlabeled, not {spec.split!r}")
    if info.type != pafs.FileType.Directory:
        raise SpecError(f"stl10 needs the extracted stl10_binary folder (the .tar.gz cannot be streamed): {spec.path}")
    x = posixpath.join(root, f"{spec.split}_X.bin")
    xi = _info(fs, x)
    if xi.type != pafs.FileType.File:
        raise SpecError(f"missing {x}")
    if xi.size % STL_BYTES:
        raise SpecError(f"{x} has {xi.size} bytes, not a multiple of one 96x96x3 image ({STL_BYTES})")
    files = [x]
    if spec.split != "unlabeled":
        y = posixpath.join(root, f"{spec.split}_y.bin")
        if _info(fs, y).type != pafs.FileType.File:
            raise SpecError(f"missing {y}")
        files.append(y)
    n = xi.size // STL_BYTES
    units = [Unit(x, s, min(STL_CHUNK, n - s)) for s in range(0, n, STL_CHUNK)]
    return Plan(spec, fs, files, units=units), lambda u: [_stl_key(spec.split, i) for i in range(u.pos, u.pos + u.take)]


# ------------------------------------------------------------------------------------------------- picking
def pick(spec: DatasetSpec, n: int) -> pa.Table:
    """Up to ``n`` records spread evenly through a split of any format, read here without Ray (a few images to
    look at: ``igpt sample --images``), with the columns of :func:`_rows_table`.

    The picks are evenly spaced over the records the read units hold in file order (after key_prefix and
    max_images). With a holdout ``part``, a pick outside the part moves to the next record of its unit inside it,
    or is dropped. Only the units picked from are read; of an image folder, only the files picked."""
    plan = check(spec)
    starts = np.cumsum([0] + [u.take for u in plan.units])
    want = np.unique(np.linspace(0, starts[-1] - 1, max(0, min(n, int(starts[-1])))).round().astype(np.int64))
    tables, index = [], {c: i for i, c in enumerate(plan.classes)}  # (imagefolder: class -> label)
    for ui in np.unique(np.searchsorted(starts, want, side="right") - 1):
        u, offsets = plan.units[ui], want[(want >= starts[ui]) & (want < starts[ui + 1])] - starts[ui]
        if spec.format == "imagefolder":  # keys without reading: read only the files picked
            keys = [_folder_record(p, spec.split, index, plan.labels)[0] for p in plan.files[u.pos:u.pos + u.take]]
        else:
            table = _READERS[spec.format](plan, u)
            keys = table["key"].to_pylist()
        inside, chosen = in_part(keys, spec), []
        for o in offsets:
            j = next((j for j in range(int(o), len(keys)) if inside[j] and j not in chosen), None)
            if j is not None:
                chosen.append(j)
        if spec.format == "imagefolder":
            tables += [_read_imagefolder(plan, Unit("", u.pos + j, 1)) for j in chosen]
        elif chosen:
            tables.append(table.take(pa.array(chosen, pa.int64())))
    return pa.concat_tables(tables) if tables else _rows_table([], [], [], [], [])


# ------------------------------------------------------------------------------------------------- reading
# Up to this many read units (all epochs together), each gets a root block of its own: one ray.put each when
# execution starts (~2 ms on 2 cores). Beyond, a single root block is split as the reads go (_one_row_blocks), so
# the time to the first row does not grow with the epochs (measured: benchmarks/epochs_setup.py).
ROOT_BLOCKS_MAX = 256


def read(spec: DatasetSpec, plan=None, epochs: int = 1, shuffle_seed: int | None = None,
         parts: int = 1, slots=None, after: tuple[int, int] | None = None):
    """The Ray Dataset of ``epochs`` passes over the split, one after another; streams, nothing read yet.

    A pass reads ``len(plan.units) * parts`` *pieces* (a unit, or with ``parts`` > 1 one of its ``parts`` equal
    slices, for splits with too few units to deal to every worker), each one task so every CPU decodes. Slot ``s``
    of the whole stream is piece ``s % pieces`` of epoch ``s // pieces`` (see :func:`piece_of`). Without a seed
    the pieces come in file order and records in file order; with ``shuffle_seed`` each epoch reads its pieces in
    the order :func:`unit_order` gives and each piece's records in an order drawn from (seed, epoch, key).

    ``plan``: the split's :class:`Plan` (default: :func:`check`'s), or a reference to one in the object store.
    ``slots``: read only these slots, in this order (a worker's share, ``igpt.data.stream``); default: all.
    ``after``: (slot, index): skip the records of that slot up to and including that index (a resumed position).

    Rows: the module docstring's columns plus ``epoch`` (int32, the pass: 0 .. epochs-1), ``slot`` (int64) and
    ``index`` (int32, the record's place in its piece's order, before the holdout filter): with them a consumer
    knows exactly where it is. key_prefix, max_images and holdout/part apply to every pass alike, so each pass
    yields ``plan.count`` records."""
    import ray
    import ray.data

    if epochs < 1 or parts < 1:
        raise ValueError(f"epochs and parts must be >= 1, got {epochs}, {parts}")
    if plan is None:
        plan = check(spec)
    if slots is None:  # every slot: needs the plan itself, not a reference
        slots = np.arange(len(plan.units) * parts * epochs, dtype=np.int64)
    slots = np.asarray(slots, np.int64)
    if not len(slots):
        return ray.data.from_arrow(_empty_read())
    if len(slots) <= ROOT_BLOCKS_MAX:
        ids = ray.data.range(len(slots), override_num_blocks=len(slots))
    else:
        ids = _one_row_blocks(ray.data.range(len(slots), override_num_blocks=1))
    plan_ref = ray.put(plan) if isinstance(plan, Plan) else plan  # or already in the object store
    reader = _ReadUnits([plan_ref], [ray.put(slots)], parts, shuffle_seed, after)
    return ids.map_batches(reader, batch_format="pyarrow", batch_size=None)


def piece_of(slot: int, n_units: int, parts: int, shuffle_seed: int | None) -> tuple[int, int, int]:
    """Slot -> (epoch, unit, part): which piece of which unit a slot of :func:`read` reads."""
    epoch, pos = divmod(slot, n_units * parts)
    unit, part = divmod(unit_order(n_units * parts, epoch, shuffle_seed)[pos], parts)
    return epoch, unit, part


@functools.lru_cache(maxsize=8)
def unit_order(n: int, epoch: int, shuffle_seed: int | None) -> tuple[int, ...]:
    """The order of a split's ``n`` read units (or pieces) in ``epoch``: file order without a seed; with one, a
    permutation that depends on (shuffle_seed, epoch) alone: the units sorted by a keyed hash, the same on every
    machine and library version (numpy promises no stable streams)."""
    if shuffle_seed is None:
        return tuple(range(n))
    from hashlib import blake2b

    salt = f"{shuffle_seed}:{epoch}:".encode()
    return tuple(sorted(range(n), key=lambda u: blake2b(salt + str(u).encode(), digest_size=8).digest()))


def record_order(keys: list[str], epoch: int, shuffle_seed: int) -> list[int]:
    """A piece's records in the order drawn for (seed, epoch): sorted by a keyed hash of each key."""
    from hashlib import blake2b

    salt = f"{shuffle_seed}:{epoch}:r:".encode()
    return sorted(range(len(keys)), key=lambda i: blake2b(salt + keys[i].encode(), digest_size=8).digest())


def _one_row_blocks(ds):
    """``ds`` (one block of slot ids) as one-row blocks, made as the reads take them, so each unit is a task.

    Ray's streaming repartition does this, but it asks for a CPU and holds it for the whole stream while
    backpressure pauses it: half the reading on 2 CPUs (measured 6.3 vs 12.5 units/s). Its public call takes no
    resources, so the operator is built here with num_cpus=0 (Ray 2.60 internals; the public call if they move)."""
    import ray.data

    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.map_operator import StreamingRepartition

        op = StreamingRepartition(target_num_rows_per_block=1, input_dependencies=[ds._logical_plan.dag],
                                  ray_remote_args={"num_cpus": 0})
        return ray.data.Dataset._from_parent(ds, LogicalPlan(op, ds.context))
    except (ImportError, AttributeError, TypeError):
        return ds.repartition(target_num_rows_per_block=1)


_BOXED: dict[str, object] = {}


def _fetch(box: list):
    """The object a read task needs (a plan: an ImageNet plan lists 1.28M files; a worker's slots), fetched once
    per worker process."""
    import ray

    key = box[0].hex()
    if key not in _BOXED:
        if len(_BOXED) >= 8:  # a worker may serve a few datasets in turn (train, val)
            _BOXED.pop(next(iter(_BOXED)))
        _BOXED[key] = ray.get(box[0])
    return _BOXED[key]


class _ReadUnits:
    """Slot ids -> the records of their pieces, each with its epoch, slot and index, filtered to ``part`` (after
    the take, i.e. after max_images)."""

    def __init__(self, plan_box: list, slots_box: list, parts: int, shuffle_seed: int | None,
                 after: tuple[int, int] | None):
        self.plan_box, self.slots_box, self.parts, self.seed = plan_box, slots_box, parts, shuffle_seed
        self.after = after

    def __call__(self, ids: pa.Table) -> pa.Table:
        plan, slots = _fetch(self.plan_box), _fetch(self.slots_box)
        tables = [self._slot(plan, int(slots[i])) for i in ids["id"].to_pylist()]
        return pa.concat_tables(tables) if tables else _empty_read()

    def _slot(self, plan: Plan, slot: int) -> pa.Table:
        epoch, unit, part = piece_of(slot, len(plan.units), self.parts, self.seed)
        t = _read_tokens(plan, plan.units[unit], epoch) if plan.spec.format == "tokens" else \
            _READERS[plan.spec.format](plan, plan.units[unit])
        if self.parts > 1:
            lo, hi = t.num_rows * part // self.parts, t.num_rows * (part + 1) // self.parts
            t = t.slice(lo, hi - lo)
        if self.seed is not None:
            t = t.take(pa.array(record_order(t["key"].to_pylist(), epoch, self.seed), pa.int64()))
        index = np.arange(t.num_rows, dtype=np.int32)
        keep = np.ones(t.num_rows, bool)
        if self.after is not None and slot == self.after[0]:
            keep &= index > self.after[1]  # a resumed position: these were trained on
        if plan.spec.part != "all":
            keep &= in_part(t["key"].to_pylist(), plan.spec)
        if not keep.all():
            t, index = t.filter(pa.array(keep)), index[keep]
        return t.append_column("epoch", pa.array(np.full(t.num_rows, epoch, np.int32))) \
            .append_column("slot", pa.array(np.full(t.num_rows, slot, np.int64))) \
            .append_column("index", pa.array(index))


def _empty_read() -> pa.Table:
    """No rows, with every column :func:`read` yields."""
    return _rows_table([], [], [], [], []).append_column("epoch", pa.array([], pa.int32())) \
        .append_column("slot", pa.array([], pa.int64())).append_column("index", pa.array([], pa.int32()))


def _rows_table(keys, labels, images, raw_size, errors) -> pa.Table:
    cols = {
        "key": pa.array(keys, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "image": pa.array(images, pa.binary()),
        "raw_size": pa.array(raw_size, pa.int32()),
        "error": pa.array(errors, pa.string()),
    }
    return pa.table(cols)


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_file(path) as fh:
        return fh.read()


def _read_parquet(plan: Plan, u: Unit) -> pa.Table:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    s = plan.spec
    try:
        t = pq.ParquetFile(u.path, filesystem=plan.fs).read_row_group(
            u.pos, columns=[s.key_column, s.image_column, s.label_column])
    except (OSError, pa.ArrowException) as e:  # corrupt pages: the row group's records are listed, not lost
        return _unreadable_row_group(plan, u, f"{u.path}, row group {u.pos} cannot be read: {type(e).__name__}: {e}")
    if s.key_prefix:
        t = t.filter(pc.starts_with(t[s.key_column].cast(pa.string()), s.key_prefix))
    t = t.slice(0, u.take)
    image = t[s.image_column].cast(pa.binary())
    errors = pc.if_else(pc.is_null(image), "no image bytes (null)", "")
    label = pc.fill_null(t[s.label_column].cast(pa.int64()), -1)
    return pa.table({"key": t[s.key_column].cast(pa.string()), "label": label, "image": image,
                     "raw_size": pa.array(np.zeros(t.num_rows, np.int32)), "error": errors})


def _read_tokens(plan: Plan, u: Unit, epoch: int) -> pa.Table:
    """A token split's row group in ``epoch``'s pass (pass ``epoch mod passes``): key, label, tokens."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    passes = int(plan.meta.get("passes", 1))
    path = posixpath.join(posixpath.dirname(posixpath.dirname(u.path)), TOKEN_PASS.format(epoch % passes),
                          posixpath.basename(u.path))
    t = pq.ParquetFile(path, filesystem=plan.fs).read_row_group(u.pos, columns=["key", "label", "tokens"])
    if plan.spec.key_prefix:
        t = t.filter(pc.starts_with(t["key"], plan.spec.key_prefix))
    return t.slice(0, u.take)


def _unreadable_row_group(plan: Plan, u: Unit, why: str) -> pa.Table:
    """A row group that cannot be decoded: one error row per record it should yield, with its key where the key
    column still reads (the plan read it for a key_prefix or holdout), else ``<file>#<group>/<row>``."""
    import pyarrow.parquet as pq

    try:
        keys = _parquet_keys(pq.ParquetFile(u.path, filesystem=plan.fs), u.pos, plan.spec)[:u.take]
    except (OSError, pa.ArrowException):
        keys = [f"{u.path}#{u.pos}/{i}" for i in range(u.take)]
    n = len(keys)
    return _rows_table(keys, [-1] * n, [None] * n, np.zeros(n, np.int32), [why] * n)


class _ParquetRows:
    """The Parquet reader over a one-row (file, row_group, rows) table, without Ray: benchmarks/ingest.py times it."""

    def __init__(self, spec: DatasetSpec, fs: pafs.FileSystem):
        self.plan = Plan(spec, fs, [])

    def __call__(self, unit: pa.Table) -> pa.Table:
        return _read_parquet(self.plan, Unit(*(unit[c][0].as_py() for c in ("file", "row_group", "rows"))))


def _folder_record(path: str, split: str, index: dict[str, int], labels: dict[str, int]) -> tuple[str, int, str]:
    """(key, label, error) of an image file; the planner's keys come from here too, so its count is exact."""
    parent, name = posixpath.basename(posixpath.dirname(path)), posixpath.basename(path)
    if labels or parent == split:
        label = labels.get(posixpath.splitext(name)[0], -1)
        return f"{split}/{name}", label, "" if label >= 0 else "no label for this file in labels_file"
    label = index.get(parent, -1)
    return (f"{split}/{parent}/{name}", label,
            "" if label >= 0 else f"class folder {parent!r} is not a training class")


def _read_imagefolder(plan: Plan, u: Unit) -> pa.Table:
    index = {c: i for i, c in enumerate(plan.classes)}
    paths = plan.files[u.pos:u.pos + u.take]
    keys, labels, errors = zip(*(_folder_record(p, plan.spec.split, index, plan.labels) for p in paths), strict=False)
    return _rows_table(keys, labels, [_read_all(plan.fs, p) for p in paths], np.zeros(len(paths), np.int32), errors)


def _tar_groups(fileobj, read: bool) -> tuple[dict[str, dict[str, bytes]], str]:
    """A shard's members grouped by key (the name up to the first dot), in file order, with their bytes when
    ``read`` (else b"": the planner lists headers only, and groups them here too, so its count is the reader's).
    The second value says why the shard ended early ("" when it did not)."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = posixpath.basename(m.name)
                group = groups.setdefault(posixpath.join(posixpath.dirname(m.name), base.split(".", 1)[0]), {})
                group[base.split(".", 1)[1].lower() if "." in base else ""] = tf.extractfile(m).read() if read else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        return groups, f"shard unreadable after {len(groups)} records: {type(e).__name__}: {e}"
    return groups, ""


def _tar_records(path: str, fileobj, read: bool = True) -> list[dict]:
    """One WebDataset shard's records; a shard cut short ends with one error record for the rest."""
    shard = posixpath.splitext(posixpath.basename(path))[0]
    groups, tail_error = _tar_groups(fileobj, read)
    out = []
    for key, g in groups.items():
        img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
        label, err = -1, ""
        if "cls" in g and read:
            try:
                label = int(g["cls"].decode().strip())
            except ValueError:
                err = f"bad .cls content {g['cls'][:20]!r}"
        if img_ext is None:
            err = err or f"no image member (has: {', '.join(sorted(g)) or 'nothing'})"
        out.append({"key": f"{shard}/{key}", "label": label, "image": g.get(img_ext, b"") if img_ext else b"",
                    "raw_size": 0, "error": err})
    if tail_error:
        out.append({"key": f"{shard}/<rest of shard>", "label": -1, "image": b"", "raw_size": 0, "error": tail_error})
    return out


def _read_webdataset(plan: Plan, u: Unit) -> pa.Table:
    data = _read_all(plan.fs, u.path)  # one request; member by member would be one request each on S3
    rows = _tar_records(u.path, io.BytesIO(data))[:u.take]
    return _rows_table(*([r[c] for r in rows] for c in ("key", "label", "image", "raw_size", "error")))


def _is_archive(path: str) -> bool:
    return path.endswith((".tar.gz", ".tgz", ".tar"))


def _cifar_key(batch: str, i: int) -> str:
    return f"{batch}/{i:05d}"


def _cifar_members(fs: pafs.FileSystem, path: str, names: list[str], only: str = ""):
    """(name, bytes) of the archive's batch files named in ``names`` (or just ``only``), in archive order."""
    with fs.open_input_file(path) as fh, tarfile.open(fileobj=fh, mode="r:*") as tf:
        for m in tf:
            name = posixpath.basename(m.name)
            if m.isfile() and name in names and only in ("", name):
                yield name, tf.extractfile(m).read()
                if only:
                    return


def _cifar_batch(fmt: str, data: bytes) -> tuple[np.ndarray, list[int]]:
    """A pickled batch -> (uint8 (N, 32, 32, 3) images, labels)."""
    d = pickle.loads(data, encoding="bytes")
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
    return x, d[b"labels" if fmt == "cifar10" else b"fine_labels"]


def _read_cifar(plan: Plan, u: Unit) -> pa.Table:
    fmt = plan.spec.format
    names = _CIFAR_FILES[(fmt, plan.spec.split)]
    name = names[u.pos]
    data = next(_cifar_members(plan.fs, u.path, names, name))[1] if _is_archive(u.path) else _read_all(plan.fs, u.path)
    x, labels = _cifar_batch(fmt, data)
    n = u.take
    return _rows_table([_cifar_key(name, i) for i in range(n)], labels[:n], [x[i].tobytes() for i in range(n)],
                       np.full(n, 32, np.int32), [""] * n)


def _stl_key(split: str, i: int) -> str:
    return f"{split}/{i:06d}"


def _read_stl10(plan: Plan, u: Unit) -> pa.Table:
    with plan.fs.open_input_file(u.path) as fh:
        fh.seek(u.pos * STL_BYTES)
        raw = fh.read(u.take * STL_BYTES)
    # STL-10 stores each image as 3 planes in column-major order: (3, W, H) -> (H, W, 3)
    x = np.frombuffer(raw, np.uint8).reshape(-1, 3, STL_SIDE, STL_SIDE).transpose(0, 3, 2, 1)
    if len(plan.files) > 1:
        with plan.fs.open_input_file(plan.files[1]) as fh:
            fh.seek(u.pos)
            y = np.frombuffer(fh.read(u.take), np.uint8).astype(np.int64) - 1  # 1..10 -> 0..9
    else:
        y = np.full(len(x), -1, np.int64)
    return _rows_table([_stl_key(plan.spec.split, u.pos + i) for i in range(len(x))], y,
                       [np.ascontiguousarray(img).tobytes() for img in x], np.full(len(x), STL_SIDE, np.int32),
                       [""] * len(x))


_READERS = {
    "parquet": _read_parquet,
    "imagefolder": _read_imagefolder,
    "webdataset": _read_webdataset,
    "cifar10": _read_cifar,
    "cifar100": _read_cifar,
    "stl10": _read_stl10,
}
