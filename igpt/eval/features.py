"""Feature sets: every layer's pooled features of every image of a split, computed once, read by many probes.

Layout of a feature set (``igpt/eval/extract_job.py`` writes it)::

    <set>/manifest.json                 layers, width, masks per image, counts, the checkpoint, the model config
    <set>/<split>/shard-00000.npz       keys (N,), labels (N,), layer_00 .. layer_L (N, M, d) float32,
                                        pixels (N, 1, IR*IR*3) float32 when written

There are L + 1 layers for an L-block model (``IGPT.features``): layer l < L is the normalised input of block l
(layer 0: the embeddings), layer L the final norm's output after every block, which the fine-tuning head reads.

``M`` is 1 for AR models and 5 for BERT models (one feature vector per evaluation mask, igpt/eval/ensemble.py). A probe
trial reads one layer of each shard (``np.load`` of an ``.npz`` reads only the member asked for).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from igpt.errors import MissingInput
from igpt.storage import Loc

SPLITS = ("train", "val", "test")


def layer_key(layer: int | str) -> str:
    return "pixels" if layer == "pixels" else f"layer_{int(layer):02d}"


class FeatureActor:
    """A Ray Data actor: one model replica turning token batches into per-layer pooled features."""

    def __init__(self, checkpoint: str, random_init: bool, seed: int, batch_size: int, pixels: bool,
                 use_gpu: bool = False, losses: bool = False):
        from igpt.train import checkpoints

        self.model = checkpoints.load_model(checkpoint, random_init=random_init, seed=seed)
        self.device = torch.device("cuda") if use_gpu else torch.device("cpu")
        self.model.to(self.device)
        self.centres = (checkpoints.load_palette(checkpoint).centres.astype(np.float32) + 1) / 2  # [-1,1] -> [0,1]
        self.batch_size, self.pixels, self.losses = batch_size, pixels, losses

    def __call__(self, batch: pa.Table) -> pa.Table:
        from igpt.eval.ensemble import eval_masks

        cfg = self.model.cfg
        keys = batch["key"].to_pylist()
        tokens = np.asarray(batch["tokens"].combine_chunks().flatten(), np.int64).reshape(len(keys), cfg.n_ctx)
        layers, masks = range(cfg.n_layer + 1), cfg.objective == "bert"  # 0..L: the last is ln_f's output
        feats = {l: [] for l in layers}
        losses = []
        for i in range(0, len(keys), self.batch_size):
            x = torch.from_numpy(tokens[i:i + self.batch_size]).to(self.device)
            if self.losses:
                losses.append(image_losses(self.model, x, keys[i:i + self.batch_size]))
            if masks:  # the paper's BERT evaluation: 5 masks per image, each its own feature vector
                m = eval_masks(keys[i:i + self.batch_size], cfg.n_ctx, cfg.bert_mask_prob).to(self.device)
                per_mask = [self.model.features(x, mask=m[k]) for k in range(len(m))]
                for l in layers:
                    feats[l].append(torch.stack([f[l] for f in per_mask], 1).float().cpu().numpy())
            else:
                out = self.model.features(x)
                for l in layers:
                    feats[l].append(out[l].float().cpu().numpy()[:, None])
        cols = {"key": batch["key"], "label": batch["label"]}
        for l in layers:
            arr = np.concatenate(feats[l]) if feats[l] else np.zeros((0, 1, cfg.d_model), np.float32)
            cols[layer_key(l)] = _tensor_column(arr)
        if self.pixels:
            cols["pixels"] = _tensor_column(self.centres[tokens].reshape(len(keys), 1, -1))
        if self.losses:
            cols["loss"] = _tensor_column(np.concatenate(losses).reshape(-1, 1, 1) if losses else
                                          np.zeros((0, 1, 1), np.float32))
        return pa.table(cols)


@torch.no_grad()
def image_losses(model, tokens: torch.Tensor, keys: list[str]) -> np.ndarray:
    """Each image's validation loss (nats per predicted token), so that two models scored on the same images get a
    paired comparison: AR, the mean next-token loss over its positions; BERT, the mean over the masked positions
    of its evaluation masks (the same 5 per key as its features, igpt/eval/ensemble.py)."""
    import torch.nn.functional as F

    if model.cfg.objective == "ar":
        logits = model(model.ar_inputs(tokens), causal=True)
        ce = F.cross_entropy(logits.transpose(1, 2).float(), tokens.long(), reduction="none")
        return ce.mean(1).cpu().numpy().astype(np.float32)
    from igpt.eval.ensemble import eval_masks

    masks = eval_masks(keys, model.cfg.n_ctx, model.cfg.bert_mask_prob).to(tokens.device)  # (M, B, T)
    per = []
    for m in masks:
        logits = model(tokens, causal=False, content_mask=m)
        ce = F.cross_entropy(logits.transpose(1, 2).float(), tokens.long(), reduction="none")
        per.append((ce * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.stack(per, 1).mean(1).cpu().numpy().astype(np.float32)


def load_losses(feature_set: str | Path | Loc, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(per-image losses (N,), keys (N,)) of a split extracted with them (``manifest.json``'s ``losses``)."""
    ls, ks = [], []
    for s in _shards(feature_set, split):
        def read(z, s=s):
            if "loss" not in z.files:
                raise KeyError(f"{s} has no per-image losses (extracted before they were written)")
            return z["loss"].reshape(-1), z["keys"]
        loss, keys = _open(s, read)
        ls.append(loss)
        ks.append(keys)
    return np.concatenate(ls), np.concatenate(ks)


def _tensor_column(arr: np.ndarray) -> pa.Array:
    """(N, M, d) float32 -> a fixed-size-list column of M*d (Arrow has no ndarray column of its own)."""
    flat = np.ascontiguousarray(arr, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat[0].size if len(flat) else 1)


def table_to_arrays(t: pa.Table, shape: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """A feature table -> the arrays of one shard (``shape``: column -> (M, d))."""
    out = {"keys": np.asarray(t["key"].to_pylist(), dtype=object).astype(str),
           "labels": np.asarray(t["label"].to_pylist(), np.int64)}
    for col, (m, d) in shape.items():
        out[col] = np.asarray(t[col].combine_chunks().flatten(), np.float32).reshape(t.num_rows, m, d)
    return out


def _shards(feature_set: str | Path | Loc, split: str) -> list[Loc]:
    root = Loc(feature_set) / split
    shards = [c for c in root.children() if c.name.startswith("shard-") and c.name.endswith(".npz")]
    if not shards:
        raise MissingInput(f"no feature shards in {root} (run pipelines.extract first)")
    return shards


def _open(shard: Loc, read):
    """``read(z)`` of one shard's np.load, the file opened where it lies: a seekable pyarrow file on object
    storage, so only the members asked for are fetched."""
    with shard.fs.open_input_file(shard.path) as fh, np.load(fh) as z:
        return read(z)


def load(feature_set: str | Path | Loc, split: str, layer: int | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, M, d), labels (N,), keys (N,)) of one layer (or ``"pixels"``) of one split; the feature set
    local or on object storage."""
    xs, ys, ks = [], [], []
    key = layer_key(layer)

    def read(z, s):
        if key not in z.files:
            raise KeyError(f"{s} has no {key} (has {', '.join(f for f in z.files if f not in ('keys', 'labels'))})")
        return z[key], z["labels"], z["keys"]

    for s in _shards(feature_set, split):
        x, y, k = _open(s, lambda z, s=s: read(z, s))
        xs.append(x)
        ys.append(y)
        ks.append(k)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ks)


def labels_and_keys(feature_set: str | Path | Loc, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), keys (N,)) of one split, without reading any features (for checks on the splits)."""
    ys, ks = zip(*(_open(s, lambda z: (z["labels"], z["keys"])) for s in _shards(feature_set, split)), strict=True)
    return np.concatenate(ys), np.concatenate(ks)


def manifest(feature_set: str | Path | Loc) -> dict:
    p = Loc(feature_set) / "manifest.json"
    if not p.exists():
        raise MissingInput(f"{feature_set} is not a feature set (no manifest.json); run pipelines.extract")
    return json.loads(p.read_text())
