"""Checkpoint folders of a pretraining run, and the plain weights file every evaluation loads.

A run's folder (``<storage_path>/<name>/``) holds one folder per checkpoint, ``step_00000042/``: every rank's
DeepSpeed shard (for resuming training) and ``weights.pt``, the full fp32 parameters gathered from the shards
with the model config and the palette beside them (for everything else: extract, probe, finetune, sample).
Rank 0 writes the completion marker last, listing every file with its size (and a SHA-256 of ``weights.pt``
where that is cheap); a checkpoint is used only when it *verifies*: marker present, every listed file there with
its size. A folder that fails (torn mid-write, a shard lost or cut after the marker) is passed over with the
reason printed, and the newest one that verifies is used instead.

``weights.pt`` holds only tensors, numbers, strings and lists, so it loads with ``torch.load(weights_only=True)``:
a checkpoint from elsewhere cannot run code when opened (DeepSpeed's own shards are pickles and load unsafely).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import sys
from pathlib import Path

import numpy as np
import torch

from igpt.errors import MissingInput
from igpt.storage import Loc, local_copy

MARKER = "igpt_complete.json"
WEIGHTS = "weights.pt"
HASH_MAX_BYTES = 256 * 2**20  # weights.pt up to this size gets a checksum (S: 306 MB fp32 does not)


_RANK = re.compile(r"(?:^|_)pp_rank_(\d+)_")


def rank_file(name: str, rank: int) -> bool:
    """Whether rank ``rank`` needs file ``name`` of a checkpoint folder to resume: everything but other ranks'
    DeepSpeed ZeRO shards (``*zero_pp_rank_<r>_*``), so that a resume on object storage copies one rank's share."""
    m = _RANK.search(posixpath.basename(name))
    return m is None or int(m.group(1)) == rank


def checkpoint_dirs(run_dir: str | Path | Loc) -> list[Loc]:
    """A run's checkpoint folders, oldest first (``step_00000042``), local or on object storage."""
    return [p for p in Loc(run_dir).children(dirs=True) if p.name.startswith("step_")]


def _sha256(f: Loc) -> str:
    h = hashlib.sha256()
    if f.remote:
        h.update(f.read_bytes())  # only files up to HASH_MAX_BYTES are hashed
        return h.hexdigest()
    with open(f.local(), "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(folder: str | Path | Loc) -> dict:
    """What a marker records of a finished checkpoint folder: each file's size, and weights.pt's checksum when
    cheap."""
    folder = Loc(folder)
    files = {k: v for k, v in sorted(folder.files().items()) if k != MARKER and not k.endswith(".tmp")}
    out = {"files": files}
    if files.get(WEIGHTS, HASH_MAX_BYTES + 1) <= HASH_MAX_BYTES:
        out["weights_sha256"] = _sha256(folder / WEIGHTS)
    return out


def write_marker(folder: str | Path | Loc, state: dict) -> None:
    """The completion marker, written last and whole (igpt.storage), with the folder's file manifest."""
    folder = Loc(folder)
    (folder / MARKER).write_text(json.dumps({**state, **file_manifest(folder)}))


def read_marker(folder: str | Path | Loc) -> dict:
    return json.loads((Loc(folder) / MARKER).read_text())


def verify(folder: str | Path | Loc) -> str | None:
    """None when the checkpoint folder is whole; else why not."""
    folder = Loc(folder)
    try:
        state = read_marker(folder)
    except FileNotFoundError:
        return "no completion marker (torn mid-write)"
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        return f"unreadable completion marker: {e}"
    there = folder.files()  # one listing, also on object storage
    for name, size in state.get("files", {}).items():  # markers written before manifests list none
        if name not in there:
            return f"{name} is missing"
        if there[name] != size:
            return f"{name} has {there[name]} bytes, the marker recorded {size}"
    if "weights_sha256" in state and _sha256(folder / WEIGHTS) != state["weights_sha256"]:
        return f"{WEIGHTS} does not match its recorded checksum"
    return None


def newest_complete(run_dir: str | Path | Loc, report: bool = True) -> Loc | None:
    """The newest checkpoint folder that verifies; newer ones that do not are passed over, each with its reason
    on stderr."""
    for p in reversed(checkpoint_dirs(run_dir)):
        why = verify(p)
        if why is None:
            return p
        if report:
            print(f"checkpoint {p} skipped: {why}", file=sys.stderr)
    return None


def prune(run_dir: str | Path | Loc, keep: int) -> list[Loc]:
    """Delete checkpoint folders older than the ``keep`` newest that verify (whatever stopped earlier attempts
    before they could prune); returns what was deleted."""
    dirs = checkpoint_dirs(run_dir)
    whole = [p for p in dirs if verify(p) is None]
    if len(whole) <= keep:
        return []
    oldest_kept = whole[-keep]
    gone = [p for p in dirs if p.name < oldest_kept.name]
    for p in gone:
        p.rmtree()
    return gone


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter whole and in fp32, from a DeepSpeed engine of any ZeRO stage and precision.

    Collective: every rank must call it (ZeRO gathers the partitions); all ranks get the same dict."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # the optimizer's fp32 master copy, gathered; None without ZeRO/bf16
        out[name] = (p.detach() if full is None else full).float().cpu().clone()
    return out


def write_weights(folder: Path, state_dict: dict, model_cfg: dict, palette: np.ndarray, step: int) -> Path:
    path = Path(folder) / WEIGHTS
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": state_dict, "model": model_cfg, "palette": torch.as_tensor(palette, dtype=torch.float32),
                "step": step}, tmp)
    tmp.rename(path)
    return path


def resolve(path: str | Path | Loc) -> Loc:
    """A weights file, a checkpoint folder or a run folder (its newest complete checkpoint) -> ``weights.pt``;
    local or on object storage."""
    p = Loc(path)
    if p.is_file():
        return p
    if not p.exists():
        raise MissingInput(f"no checkpoint at {p}")
    if (p / WEIGHTS).exists() or p.name.startswith("step_"):
        why = verify(p) if p.name.startswith("step_") else None
        if why is not None:
            raise RuntimeError(f"checkpoint {p} does not verify: {why}; use an earlier checkpoint")
        return p / WEIGHTS
    ckpt = newest_complete(p)
    if ckpt is None:
        raise MissingInput(f"{p} holds no complete checkpoint (step_*/ with {MARKER}) that verifies")
    if not (ckpt / WEIGHTS).exists():
        raise MissingInput(f"{ckpt} has no {WEIGHTS}")
    return ckpt / WEIGHTS


def pretrain_run_id(path: str | Path | Loc) -> str | None:
    """The MLflow run of the pretraining run a checkpoint belongs to (``<run dir>/mlflow_run_id``), if known."""
    f = resolve(path).parent.parent / "mlflow_run_id"
    return f.read_text().strip() if f.exists() else None


def local_weights(path: str | Path | Loc) -> Path:
    """``weights.pt`` of ``path`` (see :func:`resolve`) as a local file: on object storage, copied once per
    process into a temporary folder (torch.load and its mmap need a file)."""
    return local_copy(resolve(path))


def load(path: str | Path | Loc, mmap: bool = False) -> dict:
    """A checkpoint's ``weights.pt`` (see :func:`resolve`); ``mmap``: memory-mapped, its tensors read on use."""
    f = resolve(path)
    try:
        return torch.load(local_weights(f), map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError) as e:  # torch names no file: a truncated one says "failed finding..."
        raise RuntimeError(f"cannot read checkpoint weights {f}: {e} (truncated or corrupt?); use an earlier "
                           f"checkpoint") from None


def load_model(path: str | Path, random_init: bool = False, seed: int = 0):
    """The model of a checkpoint, in eval mode on the CPU. ``random_init``: its architecture with fresh
    release initialisers instead (the random-init twin a probe is compared with)."""
    return model_of(load(path), random_init, seed)


def header(path: str | Path | Loc) -> dict:
    """A checkpoint's model config, palette and step, its weights never read (memory-mapped): what a driver needs,
    the workers loading the weights themselves (XL's file is 27 GB)."""
    data = load(path, mmap=True)
    return {"model": dict(data["model"]), "palette": data["palette"].clone(), "step": data["step"]}


def model_of(data: dict, random_init: bool = False, seed: int = 0):
    """:func:`load_model` of what :func:`load` returned (a caller that also wants the palette or the step reads
    the file once: an XL ``weights.pt`` is 27 GB)."""
    from igpt import cli
    from igpt.model import IGPT
    from igpt.model.config import ModelConfig

    cfg = cli.from_dict(ModelConfig, data["model"])
    torch.manual_seed(seed)
    model = IGPT(cfg)
    if not random_init:
        model.load_state_dict(data["state_dict"])
    return model.eval()


def load_palette(path: str | Path):
    return palette_of(load(path))


def palette_of(data: dict):
    from igpt.data.palette import Palette

    return Palette(data["palette"].numpy())
