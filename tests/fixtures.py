"""Small datasets in every supported layout, written by the tests themselves."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rand_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def imagefolder(root: Path) -> dict:
    """train/<wnid>/*.JPEG|png, val/ flat with LOC_val_solution.csv; returns {key: (pixels, label)} for PNGs."""
    imgs = rand_images(5, 40)
    truth = {}
    for i, (wnid, name) in enumerate([("n01", "a.png"), ("n01", "b.png"), ("n02", "c.png")]):
        d = root / "train" / wnid
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(encode(imgs[i]))
        truth[f"train/{wnid}/{name}"] = (imgs[i], 0 if wnid == "n01" else 1)
    (root / "val").mkdir()
    (root / "val" / "v1.png").write_bytes(encode(imgs[3]))
    (root / "val" / "v2.png").write_bytes(encode(imgs[4]))
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nv1,n02 1 2 3 4\nv2,n01 5 6 7 8\n")
    truth["val/v1.png"] = (imgs[3], 1)
    truth["val/v2.png"] = (imgs[4], 0)
    return truth


def webdataset(root: Path) -> dict:
    imgs = rand_images(4, 24, seed=1)
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    members = {
        "train-000.tar": [("s/k1", "png", 0, 3), ("s/k2", "png", 1, 7)],
        "train-001.tar": [("s/k3", "png", 2, 5), ("s/k4", None, None, 2)],  # k4 has a label but no image
    }
    for shard, items in members.items():
        with tarfile.open(root / shard, "w") as tf:
            for key, ext, idx, label in items:
                files = {"cls": str(label).encode()}
                if ext:
                    files[ext] = encode(imgs[idx])
                    truth[f"{shard[:-4]}/{key}"] = (imgs[idx], label)
                for e, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{e}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return truth


def cifar(root: Path, fmt: str = "cifar10", per_batch: int = 3) -> dict:
    """The official python-pickle layout (extracted folder); truth keyed as the reader keys records."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if fmt == "cifar10" else ["train", "test"]
    label_key = b"labels" if fmt == "cifar10" else b"fine_labels"
    truth = {}
    for j, name in enumerate(names):
        imgs = rand_images(per_batch, 32, seed=10 + j)
        labels = [(j * per_batch + i) % (10 if fmt == "cifar10" else 100) for i in range(per_batch)]
        d = {b"data": imgs.transpose(0, 3, 1, 2).reshape(per_batch, -1), label_key: labels,
             b"filenames": [f"f{i}.png".encode() for i in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(d))
        for i in range(per_batch):
            truth[f"{name}/{i:05d}"] = (imgs[i], labels[i])
    return truth


def targz(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return out


def stl10(root: Path, n: int = 5) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, labelled in (("train", True), ("unlabeled", False)):
        imgs = rand_images(n, 96, seed=20 if labelled else 21)
        # STL-10 stores each image as 3 planes, each column-major: (N, 3, W, H)
        (root / f"{split}_X.bin").write_bytes(imgs.transpose(0, 3, 2, 1).tobytes())
        if labelled:
            (root / f"{split}_y.bin").write_bytes(bytes([1 + i % 10 for i in range(n)]))
        for i in range(n):
            truth[f"{split}/{i:06d}"] = (imgs[i], (i % 10) if labelled else -1)
    return truth
