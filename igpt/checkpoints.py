"""Checkpoint folders of a pretraining run, and the plain weights file every evaluation loads.

A run's folder (``<storage_path>/<name>/``) holds one folder per checkpoint, ``step_00000042/``: every rank's
DeepSpeed shard (for resuming training) and ``weights.pt``, the full fp32 parameters gathered from the shards
with the model config and the palette beside them (for everything else: extract, probe, finetune, sample).
Rank 0 writes the completion marker last; a folder without it was torn mid-write and is never loaded.

``weights.pt`` holds only tensors, numbers, strings and lists, so it loads with ``torch.load(weights_only=True)``:
a checkpoint from elsewhere cannot run code when opened (DeepSpeed's own shards are pickles and load unsafely).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

MARKER = "igpt_complete.json"
WEIGHTS = "weights.pt"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, oldest first (``step_00000042``)."""
    return sorted(p for p in Path(run_dir).glob("step_*") if p.is_dir())


def newest_complete(run_dir: Path) -> Path | None:
    """The newest checkpoint folder with its completion marker; torn ones (no marker) are passed over."""
    for p in reversed(checkpoint_dirs(run_dir)):
        if (p / MARKER).exists():
            return p
    return None


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


def resolve(path: str | Path) -> Path:
    """A weights file, a checkpoint folder or a run folder (its newest complete checkpoint) -> ``weights.pt``."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    if (p / WEIGHTS).exists():
        if not (p / MARKER).exists() and p.name.startswith("step_"):
            raise RuntimeError(f"{p} has no completion marker: it was torn mid-write; use an earlier checkpoint")
        return p / WEIGHTS
    ckpt = newest_complete(p)
    if ckpt is None:
        raise FileNotFoundError(f"{p} holds no complete checkpoint (step_*/ with {MARKER})")
    if not (ckpt / WEIGHTS).exists():
        raise FileNotFoundError(f"{ckpt} has no {WEIGHTS}")
    return ckpt / WEIGHTS


def pretrain_run_id(path: str | Path) -> str | None:
    """The MLflow run of the pretraining run a checkpoint belongs to (``<run dir>/mlflow_run_id``), if known."""
    f = resolve(path).parent.parent / "mlflow_run_id"
    return f.read_text().strip() if f.exists() else None


def load(path: str | Path) -> dict:
    return torch.load(resolve(path), map_location="cpu", weights_only=True)


def load_model(path: str | Path, random_init: bool = False, seed: int = 0):
    """The model of a checkpoint, in eval mode on the CPU. ``random_init``: its architecture with fresh
    release initialisers instead (the random-init twin a probe is compared with)."""
    from igpt import cli
    from igpt.config import ModelConfig
    from igpt.model import IGPT

    data = load(path)
    cfg = cli.from_dict(ModelConfig, data["model"])
    torch.manual_seed(seed)
    model = IGPT(cfg)
    if not random_init:
        model.load_state_dict(data["state_dict"])
    return model.eval()


def load_palette(path: str | Path):
    from igpt.palette import Palette

    return Palette(load(path)["palette"].numpy())
