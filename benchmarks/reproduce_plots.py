"""The plots of ``benchmarks/reproduce.py``'s report (matplotlib, Agg backend), from its collected results ``r``:
probe accuracy by relative depth, validation loss, each run's learning rate, and probe accuracy against
validation loss across the checkpoints of one run."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def by_depth(r: dict, resolution: int, path: Path) -> Path:
    """Validation accuracy (best C per layer) against relative depth l / L, layers 0..L."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for key, m in r["models"].items():
        by = {int(k): v for k, v in m["val_accuracy_by_layer"].items()}
        layers = sorted(by)
        ax.plot([l / m["n_layer"] for l in layers], [by[l] for l in layers], "o-" if m["pretrained"] else "o:",
                label=f"{key} ({m['n_layer']} blocks)")
    ax.axhline(r["pixels"]["val_accuracy"], color="grey", ls="--", label=f"raw pixels {resolution}x{resolution}")
    ax.set_xlabel("relative depth l / L (0: embeddings; 1: final norm's output)")
    ax.set_ylabel("linear probe validation accuracy")
    ax.set_title("Probe accuracy by depth (best C per layer)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def val_loss(r: dict, global_batch: int, title: str, path: Path) -> Path:
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for key, m in r["models"].items():
        if not m["pretrained"] or not m["val_loss_history"]:
            continue
        steps, vals = zip(*m["val_loss_history"], strict=False)
        bert = m["objective"] == "bert"
        ax.plot([s * global_batch for s in steps], [v / math.log(2) for v in vals], "s--" if bert else "o-",
                label=key + (" (loss on masked positions)" if bert else ""))
    ax.set_xlabel("training images seen (steps x global batch)")
    ax.set_ylabel("validation loss (bits per pixel token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def learning_rate(r: dict, path: Path) -> Path:
    """Each run's logged ``train/lr`` against the step: the recipe's one-epoch warm-up, then cosine to 0."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for key, m in r["models"].items():
        if m["pretrained"] and m.get("lr_history"):
            steps, vals = zip(*m["lr_history"], strict=False)
            ax.plot(steps, vals, "-", label=f"{key} (last {m['lr']['last']:.2g})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate (train/lr)")
    ax.set_title("Learning rate as logged by each pretraining run")
    ax.legend(fontsize=8)
    return _save(fig, path)


def probe_vs_loss(r: dict, path: Path) -> Path:
    """Best-layer probe test accuracy (95% interval) against validation loss, one point per checkpoint."""
    ck = r["checkpoints"]
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    xs = [c["val_loss"] / math.log(2) for c in ck["rows"]]
    ys = [100 * c["test_accuracy"] for c in ck["rows"]]
    err = [196 * math.sqrt(max(c["test_accuracy"] * (1 - c["test_accuracy"]), 1e-12) / c["test_images"])
           for c in ck["rows"]]
    ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3)
    for x, y, c in zip(xs, ys, ck["rows"], strict=False):
        ax.annotate(f"step {c['step']} (layer {c['best_layer']})", (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    st = ck["stats"]
    ax.set_xlabel("validation loss (bits per pixel token)")
    ax.set_ylabel("best-layer linear probe test accuracy (%)")
    ax.set_title(f"{ck['model']} across checkpoints: Pearson r {st['pearson']:+.2f}, "
                 f"Spearman {st['spearman']:+.2f}", fontsize=10)
    return _save(fig, path)
