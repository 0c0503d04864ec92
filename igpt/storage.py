"""Where runs keep their state: a local folder or object storage (``s3://``, ``gs://``, ...), through pyarrow's
file systems, the layer Ray Train itself writes checkpoints with for the same ``--storage_path``.

A :class:`Loc` is one file or folder in either. It offers the few operations run state needs (read, write whole
files, list, size, delete, copy a folder to or from the local disk) and nothing that object stores lack:

- a file is written whole: locally to a temporary name then renamed over the target, on an object store as one
  PUT, which the store makes visible all at once; a reader never sees half a file either way;
- a "folder" on an object store is a key prefix: it exists while something lies under it;
- there is no atomic create-if-absent through pyarrow; :mod:`igpt.train.lease` says how it copes.

Credentials and endpoints come from the environment as pyarrow reads them (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), on the driver and on every worker alike.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from igpt.errors import UserError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_remote(path: str | Path | Loc) -> bool:
    """The one test of remoteness: a URI (``s3://``, ``gs://``, ``hdfs://``, ...) that pyarrow's file systems open,
    not a local path (``file://`` URIs are local paths)."""
    m = _SCHEME.match(str(path))
    return m is not None and m.group(1).lower() != "file"


def local_path(path: str | Path) -> str:
    """A local path as a plain absolute path (a ``file://`` URI's path)."""
    return str(Path(str(path).removeprefix("file://")).resolve())


_COPIES: dict[str, Path] = {}


def local_copy(f: Loc, beside: Path | None = None) -> Path:
    """A file as a local path: itself when local; on object storage copied down once per process, into a new
    temporary folder or beside the local file ``beside`` (torch.load, np.load and mmap need a file)."""
    if not f.remote:
        return f.local()
    if f.uri not in _COPIES:
        out = (beside.parent if beside is not None else Path(tempfile.mkdtemp(prefix="igpt-"))) / f.name
        out.write_bytes(f.read_bytes())
        _COPIES[f.uri] = out
    return _COPIES[f.uri]


class Loc:
    """A file or folder, local or on an object store: ``Loc("s3://bucket/runs") / "s-cifar" / "step_00000004"``."""

    def __init__(self, where: str | Path | Loc):
        if isinstance(where, Loc):
            self.uri, self.fs, self.path = where.uri, where.fs, where.path
            return
        where = str(where)
        if is_remote(where):
            try:
                self.fs, self.path = pafs.FileSystem.from_uri(where)
            except (pa.ArrowInvalid, ValueError, OSError) as e:
                raise UserError(f"cannot open {where}: {e}") from None
            self.uri = where.rstrip("/")
        else:
            self.fs, self.path = pafs.LocalFileSystem(), local_path(where)
            self.uri = self.path

    # ---- naming --------------------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem)

    def __truediv__(self, name: str) -> Loc:
        out = object.__new__(Loc)
        out.fs, out.path = self.fs, posixpath.join(self.path, name)
        out.uri = f"{self.uri}/{name}"
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Loc:
        out = object.__new__(Loc)
        out.fs, out.path = self.fs, posixpath.dirname(self.path)
        out.uri = self.uri.rsplit("/", 1)[0]
        return out

    def local(self) -> Path:
        """This place as a local path; an error for object storage (callers that need a file copy it down)."""
        if self.remote:
            raise ValueError(f"{self.uri} is not on a local file system")
        return Path(self.path)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Loc({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Loc) and other.uri == self.uri

    def __lt__(self, other: Loc) -> bool:
        return self.uri < other.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    # ---- what is there -------------------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.uri)
        return info.size

    def children(self, dirs: bool = False) -> list[Loc]:
        """What lies directly in this folder (``dirs``: its folders only), sorted by name; nothing when it does
        not exist."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (NotADirectoryError, FileNotFoundError):
            return []
        return sorted(self / posixpath.basename(i.path) for i in infos
                      if not dirs or i.type == pafs.FileType.Directory)

    def files(self) -> dict[str, int]:
        """Every file under this folder, by its path relative to it, with its size."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return {posixpath.relpath(i.path, self.path): i.size for i in infos if i.type == pafs.FileType.File}

    # ---- whole files ---------------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as fh:
                return fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {self.uri}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """The whole file at once (see the module docstring); parent folders are made."""
        if not self.remote:
            p = Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(p)
            return
        with self.fs.open_output_stream(self.path) as fh:
            fh.write(data)

    def put_files(self, src: str | Path) -> None:
        """Each file of the local folder ``src`` into this folder, each written whole (:meth:`write_bytes`): a job
        stages its outputs locally, then puts them where its ``--storage_path`` says."""
        for f in sorted(Path(src).iterdir()):
            if f.is_file():
                (self / f.name).write_bytes(f.read_bytes())

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        if not self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self.path)

    def move_to(self, dest: Loc) -> None:
        """This folder to ``dest`` (same file system): a rename locally; on object storage, which has no
        folders to rename, a copy then a delete."""
        if not self.remote:
            Path(self.path).rename(dest.local())
            return
        pafs.copy_files(self.path, dest.path, source_filesystem=self.fs, destination_filesystem=dest.fs)
        self.rmtree()

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def unwritable(self) -> str | None:
        """Why a file cannot be written in this folder now (a probe file written whole and removed), or None."""
        probe = self / ".igpt_write_probe"
        try:
            probe.write_text("probe")
            probe.unlink()
        except OSError as e:
            return f"cannot write {probe}: {type(e).__name__}: {e}"
        return None

    # ---- folders to and from the local disk ----------------------------------------------------------------
    def download(self, dest: str | Path, keep=None) -> Path:
        """This folder's files (those whose relative path ``keep`` accepts, default all) into the local folder
        ``dest`` (made); returns ``dest``."""
        dest = Path(dest)
        for rel in self.files():
            if keep is None or keep(rel):
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(posixpath.join(self.path, rel)) as src, open(out, "wb") as fh:
                    while chunk := src.read(64 * 2**20):
                        fh.write(chunk)
        return dest

    def upload(self, src: str | Path) -> None:
        """The local folder ``src``'s files into this folder."""
        pafs.copy_files(str(src), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
