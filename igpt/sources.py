"""Dataset readers: every supported layout becomes one Ray Dataset of records, streamed, from any filesystem that
pyarrow and Ray support (local paths, ``s3://``, ``gs://``, ...).

Every reader yields rows with the same columns:

- ``key`` (str): unique, stable id of the record (relative path, ``<shard>/<member>``, ``<batch>/<index>``);
- ``label`` (int64): class index, -1 where the split has none (STL-10 unlabeled);
- ``image`` (binary): the encoded file's bytes, or raw RGB bytes (H x W x 3, row-major) when ``raw_size`` > 0;
- ``raw_size`` (int32): side of a raw square RGB image (CIFAR: 32, STL-10: 96), 0 for encoded files;
- ``error`` (str): "" for a good record; otherwise why the *reader* could not produce it (a tar member with no
  image, a shard cut short). Such rows carry no image and are counted and listed downstream, never dropped here.

:func:`check` validates a spec (path exists, split files present, format known) before any work starts.
"""

from __future__ import annotations

import io
import pickle
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

Format = Literal["parquet", "imagefolder", "webdataset", "cifar10", "cifar100", "stl10"]
FORMATS = ("parquet", "imagefolder", "webdataset", "cifar10", "cifar100", "stl10")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
COLUMNS = ("key", "label", "image", "raw_size", "error")


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class DatasetSpec:
    path: str = _help("file, folder or URI of the dataset (local, s3://, gs://, ...)", default="")
    format: Format = _help(
        "parquet (key/image/label columns) | imagefolder (ImageNet: <split>/<class>/<file>, or a flat <split>/ "
        "with labels_file) | webdataset (*.tar with <key>.jpg|png + <key>.cls) | cifar10 | cifar100 (python "
        "pickles: extracted folder or the .tar.gz) | stl10 (stl10_binary folder)",
        default="parquet",
    )
    split: str = _help("train | val | test (| unlabeled for stl10)", default="train")
    key_column: str = _help("parquet: key column", default="key")
    image_column: str = _help("parquet: encoded image bytes column", default="image")
    label_column: str = _help("parquet: label column", default="label")
    key_prefix: str = _help("parquet: keep only rows whose key starts with this (e.g. 'train/')", default="")
    labels_file: str = _help("imagefolder: for a flat split folder, a file of '<file name> <class>' lines or "
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
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), path


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def _ls(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    return sorted(fs.get_file_info(pafs.FileSelector(path, recursive=recursive)), key=lambda i: i.path)


def _uri(original: str, fs_path: str) -> str:
    """A path the readers can open again: keep the scheme of the original spec."""
    if "://" in original:
        scheme = original.split("://", 1)[0]
        return f"{scheme}://{fs_path}"
    return fs_path


class SpecError(ValueError):
    """A dataset spec that cannot be read: wrong path, unknown format, missing split."""


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class Plan:
    """What :func:`check` found: the files to read and, where it is known without reading, the record count."""

    spec: DatasetSpec
    fs: pafs.FileSystem
    files: list[str]
    count: int | None = None
    classes: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # imagefolder flat split: file name -> label


def check(spec: DatasetSpec) -> Plan:
    if spec.format not in FORMATS:
        raise SpecError(f"unknown dataset format {spec.format!r}; expected one of {', '.join(FORMATS)}")
    if not spec.path:
        raise SpecError("dataset path is empty")
    fs, root = _fs(spec.path)
    info = _info(fs, root)
    if info.type == pafs.FileType.NotFound:
        raise SpecError(f"dataset path not found: {spec.path}")
    plan = {
        "parquet": _plan_parquet,
        "imagefolder": _plan_imagefolder,
        "webdataset": _plan_webdataset,
        "cifar10": _plan_cifar,
        "cifar100": _plan_cifar,
        "stl10": _plan_stl10,
    }[spec.format](spec, fs, root, info)
    if not plan.files:
        raise SpecError(f"no {spec.format} files for split {spec.split!r} under {spec.path}")
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


def _plan_parquet(spec, fs, root, info) -> Plan:
    import pyarrow.parquet as pq

    files = _split_files(fs, root, info, (".parquet",), spec.split)
    if files:
        schema = pq.read_schema(files[0], filesystem=fs)
        missing = {spec.key_column, spec.image_column, spec.label_column} - set(schema.names)
        if missing:
            raise SpecError(f"{files[0]} lacks column(s) {sorted(missing)}; has {schema.names}")
    if spec.key_prefix or spec.part != "all":  # count the matching keys: reads the key column only
        keys = []
        for f in files:
            col = pq.read_table(f, columns=[spec.key_column], filesystem=fs)[spec.key_column].to_pylist()
            keys += [k for k in col if str(k).startswith(spec.key_prefix)] if spec.key_prefix else col
        keys = keys[:spec.max_images] if spec.max_images else keys  # max_images applies before the holdout
        count = int(in_part(keys, spec).sum())
    else:
        count = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
    return Plan(spec, fs, files, count)


def _plan_imagefolder(spec, fs, root, info) -> Plan:
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
    return Plan(spec, fs, files, len(files), classes, labels)


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


def _plan_webdataset(spec, fs, root, info) -> Plan:
    files = _split_files(fs, root, info, (".tar",), spec.split)
    return Plan(spec, fs, files, None)


_CIFAR_FILES = {
    ("cifar10", "train"): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", "test"): ["test_batch"],
    ("cifar100", "train"): ["train"],
    ("cifar100", "test"): ["test"],
}


def _plan_cifar(spec, fs, root, info) -> Plan:
    names = _CIFAR_FILES.get((spec.format, spec.split))
    if names is None:
        raise SpecError(f"{spec.format} has splits train and test, not {spec.split!r}")
    if info.type == pafs.FileType.File:  # the official .tar.gz
        if not root.endswith((".tar.gz", ".tgz", ".tar")):
            raise SpecError(f"{spec.path}: expected the official archive (.tar.gz) or its extracted folder")
        return Plan(spec, fs, [root], 10000 * len(names))
    files = [posixpath.join(root, n) for n in names]
    missing = [f for f in files if _info(fs, f).type != pafs.FileType.File]
    if missing:
        raise SpecError(f"{spec.format} batch files missing under {spec.path}: {missing}")
    return Plan(spec, fs, files, None)


def _plan_stl10(spec, fs, root, info) -> Plan:
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
    return Plan(spec, fs, files, xi.size // STL_BYTES)


# ------------------------------------------------------------------------------------------------- reading
def read(spec: DatasetSpec, plan: Plan | None = None):
    """The Ray Dataset of records (see the module docstring) for ``spec``; streams, nothing read yet."""
    import ray.data

    plan = plan or check(spec)
    fmt = spec.format
    if fmt == "parquet":
        # One read task per row group, so records stream and every CPU decodes (Ray 2.60's read_parquet made a
        # single task and block of a 50k-row CIFAR-10 split, leaving the other cores idle).
        import pyarrow.parquet as pq

        units, left = [], spec.max_images or float("inf")
        for f in plan.files:
            meta = pq.ParquetFile(f, filesystem=plan.fs).metadata
            for g in range(meta.num_row_groups):
                # max_images is cut here, exactly, when rows map 1:1 to records (no key_prefix): a Limit
                # operator after the read would split the fused read+tokenize stage (measured 30% slower)
                exact = not spec.key_prefix  # max_images cut exactly here, before any holdout filtering
                take = min(meta.row_group(g).num_rows, left) if exact else meta.row_group(g).num_rows
                if take > 0:
                    units.append({"file": f, "row_group": g, "rows": int(take)})
                    left -= take if exact else 0
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(_ParquetRows(spec, plan.fs), batch_size=1, batch_format="pyarrow")
        if not spec.key_prefix and spec.part != "all":  # max_images is already exact: filter in the reader
            ds = ds.map_batches(_PartFilter(spec), batch_format="pyarrow", batch_size=None)
    elif fmt == "imagefolder":
        ds = ray.data.read_binary_files(plan.files, filesystem=plan.fs, include_paths=True)
        ds = ds.map_batches(_FolderRows(spec.split, plan.classes, plan.labels), batch_format="pyarrow")
    elif fmt == "webdataset":
        ds = ray.data.read_binary_files(plan.files, filesystem=plan.fs, include_paths=True)
        ds = ds.flat_map(_tar_rows)
    elif fmt in ("cifar10", "cifar100"):
        ds = ray.data.read_binary_files(plan.files, filesystem=plan.fs, include_paths=True)
        ds = ds.flat_map(_CifarRows(fmt, spec.split))
    else:
        chunks = [{"path": plan.files[0], "labels": plan.files[1] if len(plan.files) > 1 else "",
                   "start": s, "count": min(STL_CHUNK, plan.count - s)} for s in range(0, plan.count, STL_CHUNK)]
        ds = ray.data.from_items(chunks).flat_map(_Stl10Rows(spec.path))
    if spec.max_images and not (fmt == "parquet" and not spec.key_prefix):
        ds = ds.limit(spec.max_images)
    if spec.part != "all" and not (fmt == "parquet" and not spec.key_prefix):
        ds = ds.map_batches(_PartFilter(spec), batch_format="pyarrow", batch_size=None)  # after max_images
    return ds


def _rows_table(keys, labels, images, raw_size, errors) -> pa.Table:
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "image": pa.array(images, pa.binary()),
        "raw_size": pa.array(raw_size, pa.int32()),
        "error": pa.array(errors, pa.string()),
    })


class _ParquetRows:
    def __init__(self, spec: DatasetSpec, fs: pafs.FileSystem):
        self.k, self.i, self.l, self.prefix = spec.key_column, spec.image_column, spec.label_column, spec.key_prefix
        self.fs, self.spec = fs, spec

    def __call__(self, unit: pa.Table) -> pa.Table:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        f, g, rows = (unit[c][0].as_py() for c in ("file", "row_group", "rows"))
        t = pq.ParquetFile(f, filesystem=self.fs).read_row_group(g, columns=[self.k, self.i, self.l]).slice(0, rows)

        if self.prefix:
            t = t.filter(pc.starts_with(t[self.k], self.prefix))
        n = t.num_rows
        image = t[self.i].cast(pa.binary())
        errors = pc.if_else(pc.is_null(image), "no image bytes (null)", "")
        label = pc.fill_null(t[self.l].cast(pa.int64()), -1)
        return pa.table({"key": t[self.k].cast(pa.string()), "label": label, "image": image,
                         "raw_size": pa.array(np.zeros(n, np.int32)), "error": errors})


class _PartFilter:
    def __init__(self, spec: DatasetSpec):
        self.spec = spec

    def __call__(self, t: pa.Table) -> pa.Table:
        return t.filter(pa.array(in_part(t["key"].to_pylist(), self.spec)))


class _FolderRows:
    def __init__(self, split: str, classes: list[str], labels: dict[str, int]):
        self.split, self.index, self.labels = split, {c: i for i, c in enumerate(classes)}, labels

    def __call__(self, t: pa.Table) -> pa.Table:
        keys, labels, errors = [], [], []
        for p in t["path"].to_pylist():
            parent, name = posixpath.basename(posixpath.dirname(p)), posixpath.basename(p)
            stem = posixpath.splitext(name)[0]
            if self.labels or parent == self.split:
                label = self.labels.get(stem, -1)
                keys.append(f"{self.split}/{name}")
                errors.append("" if label >= 0 else "no label for this file in labels_file")
            else:
                label = self.index.get(parent, -1)
                keys.append(f"{self.split}/{parent}/{name}")
                errors.append("" if label >= 0 else f"class folder {parent!r} is not a training class")
            labels.append(label)
        return _rows_table(keys, labels, t["bytes"], np.zeros(len(keys), np.int32), errors)


def _tar_rows(row: dict) -> list[dict]:
    """Expand one WebDataset shard into records: members grouped by key (name up to the first dot)."""
    shard = posixpath.splitext(posixpath.basename(row["path"]))[0]
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    tail_error = ""
    try:
        with tarfile.open(fileobj=io.BytesIO(row["bytes"]), mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = posixpath.basename(m.name)
                key = posixpath.join(posixpath.dirname(m.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        tail_error = f"shard unreadable after {len(order)} records: {type(e).__name__}: {e}"
    out = []
    for key in order:
        g = groups[key]
        img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
        label, err = -1, ""
        if "cls" in g:
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


class _CifarRows:
    def __init__(self, fmt: str, split: str):
        self.names = set(_CIFAR_FILES[(fmt, split)])
        self.label_key = b"labels" if fmt == "cifar10" else b"fine_labels"

    def _batch(self, name: str, data: bytes) -> list[dict]:
        d = pickle.loads(data, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
        labels = d[self.label_key]
        return [{"key": f"{name}/{i:05d}", "label": int(labels[i]), "image": x[i].tobytes(), "raw_size": 32,
                 "error": ""} for i in range(len(x))]

    def __call__(self, row: dict) -> list[dict]:
        path = row["path"]
        if path.endswith((".tar.gz", ".tgz", ".tar")):
            out = []
            with tarfile.open(fileobj=io.BytesIO(row["bytes"]), mode="r:*") as tf:
                for m in tf:
                    if m.isfile() and posixpath.basename(m.name) in self.names:
                        out.extend(self._batch(posixpath.basename(m.name), tf.extractfile(m).read()))
            return out
        return self._batch(posixpath.basename(path), row["bytes"])


STL_SIDE = 96
STL_BYTES = 3 * STL_SIDE * STL_SIDE
STL_CHUNK = 1000


class _Stl10Rows:
    def __init__(self, root: str):
        self.root = root

    def __call__(self, chunk: dict) -> list[dict]:
        fs, _ = _fs(self.root)
        start, count = chunk["start"], chunk["count"]
        with fs.open_input_file(chunk["path"]) as fh:
            fh.seek(start * STL_BYTES)
            raw = fh.read(count * STL_BYTES)
        # STL-10 stores each image as 3 planes in column-major order: (3, W, H) -> (H, W, 3)
        x = np.frombuffer(raw, np.uint8).reshape(-1, 3, STL_SIDE, STL_SIDE).transpose(0, 3, 2, 1)
        if chunk["labels"]:
            with fs.open_input_file(chunk["labels"]) as fh:
                fh.seek(start)
                y = np.frombuffer(fh.read(count), np.uint8).astype(np.int64) - 1  # 1..10 -> 0..9
        else:
            y = np.full(len(x), -1, np.int64)
        split = posixpath.basename(chunk["path"]).rsplit("_", 1)[0]
        return [{"key": f"{split}/{start + i:06d}", "label": int(y[i]), "image": np.ascontiguousarray(x[i]).tobytes(),
                 "raw_size": STL_SIDE, "error": ""} for i in range(len(x))]
