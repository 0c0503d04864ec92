"""The README's main job: on the embedded CIFAR-10 sample, fit a palette, tokenize, train a debug iGPT for a few
steps on the CPU, and record it all in MLflow.

    python -m pipelines.main                       # defaults: debug model, 20 steps, ./runs/quickstart
    python -m pipelines.main --help                # every flag, generated from igpt.config.MainJobConfig
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from igpt import cli
from igpt.config import MainJobConfig
from igpt.images import BadImage, decode_rgb, to_resolution
from igpt.model import IGPT
from igpt.optim import lr_factor
from igpt.palette import Palette
from igpt.tracking import start_run


def load_images(cfg: MainJobConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[tuple[str, str]]]:
    """Images by split ('train'/'test' from the key prefix) as uint8 (N, IR, IR, 3), labels, and skipped records."""
    table = pq.read_table(cfg.data.path, columns=["key", "image", "label"])
    if cfg.data.max_images:
        table = table.slice(0, cfg.data.max_images)
    images: dict[str, list] = {"train": [], "test": []}
    labels: dict[str, list] = {"train": [], "test": []}
    skipped: list[tuple[str, str]] = []
    res = cfg.model.resolution
    for key, data, label in zip(*(table.column(c).to_pylist() for c in ("key", "image", "label"))):
        split = "test" if key.startswith("test/") else "train"
        try:
            images[split].append(to_resolution(decode_rgb(data), res))
        except BadImage as e:
            skipped.append((key, str(e)))
            continue
        labels[split].append(label)
    if not images["train"]:
        raise ValueError(f"no decodable training images in {cfg.data.path}")
    empty = np.zeros((0, res, res, 3), np.uint8)
    arrays = {s: np.stack(v) if v else empty for s, v in images.items()}
    return arrays, {s: np.asarray(v, np.int64) for s, v in labels.items()}, skipped


def sample_pixels(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    px = images.reshape(-1, 3)
    if len(px) <= n:
        return px
    return px[np.random.default_rng(seed).choice(len(px), size=n, replace=False)]


@torch.no_grad()
def eval_loss(model: IGPT, tokens: torch.Tensor, batch_size: int, seed: int) -> float:
    model.eval()
    g = torch.Generator().manual_seed(seed)  # fixed BERT masks, so evaluations are comparable
    total, n = 0.0, 0
    for s in range(0, len(tokens), batch_size):
        x = tokens[s : s + batch_size]
        mask = model.bert_mask(x, g) if model.cfg.objective == "bert" else None
        total += model.loss(x, mask=mask).item() * len(x)
        n += len(x)
    model.train()
    return total / max(n, 1)


def run(cfg: MainJobConfig) -> dict:
    import mlflow

    out = Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)

    t0 = time.perf_counter()
    images, labels, skipped = load_images(cfg)
    print(f"read {sum(len(v) for v in images.values())} images ({len(images['train'])} train, "
          f"{len(images['test'])} test), skipped {len(skipped)}")
    for key, why in skipped:
        print(f"  skipped {key}: {why}")

    if cfg.palette.path:
        palette = Palette.load(cfg.palette.path)
    else:
        t = time.perf_counter()
        palette = Palette.fit(sample_pixels(images["train"], cfg.palette.sample_pixels, cfg.palette.seed),
                              n_colors=cfg.model.n_colors, seed=cfg.palette.seed, max_iter=cfg.palette.max_iter)
        print(f"fitted {len(palette.centres)}-colour palette in {time.perf_counter() - t:.1f}s")
    if len(palette.centres) != cfg.model.n_colors:
        raise ValueError(f"palette has {len(palette.centres)} colours but model.n_colors={cfg.model.n_colors}")
    palette_path = palette.save(out / "palette.npy")
    print(f"built the 2^24 lookup table in {palette.lut_seconds or 0:.1f}s")

    tokens = {s: torch.from_numpy(palette.quantize(v).reshape(len(v), -1).astype(np.int64)) for s, v in images.items()}
    model = IGPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                            weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.train.warmup_steps, cfg.train.steps))
    g = torch.Generator().manual_seed(cfg.train.seed)
    train = tokens["train"]

    mrun, uri = start_run(cfg.tracking, cfg.output_dir, cfg.name, "main", cli.to_dict(cfg))
    with mrun:
        mlflow.log_params({"model.params": model.num_params(), "data.skipped": len(skipped)})
        mlflow.log_artifact(str(palette_path), "palette")
        if skipped:
            mlflow.log_text("\n".join(f"{k}\t{w}" for k, w in skipped), "errors.tsv")
        first = last = None
        for step in range(cfg.train.steps):
            ts = time.perf_counter()
            idx = torch.randint(len(train), (cfg.train.batch_size,), generator=g)
            loss = model.loss(train[idx])
            if not torch.isfinite(loss):
                mlflow.log_metric("nonfinite_loss", 1.0, step=step)
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            dt = time.perf_counter() - ts
            value = loss.item()
            first = value if first is None else first
            last = value
            mlflow.log_metrics({"train/loss": value, "train/bits_per_dim": value / math.log(2), "train/lr": lr,
                                "train/grad_norm": gnorm.item(),
                                "train/tokens_per_s": cfg.train.batch_size * cfg.model.n_ctx / dt}, step=step)
        val = eval_loss(model, tokens["test"], 64, cfg.train.seed) if len(tokens["test"]) else float("nan")
        mlflow.log_metrics({"val/loss": val, "val/bits_per_dim": val / math.log(2)}, step=cfg.train.steps)
        ckpt = out / "model.pt"
        torch.save({"config": cli.to_dict(cfg.model), "model": model.state_dict()}, ckpt)
        mlflow.log_artifact(str(ckpt), "checkpoint")
        run_id = mrun.info.run_id

    summary = {"run_id": run_id, "tracking_uri": uri, "experiment": cfg.tracking.experiment, "output": str(out),
               "first_loss": first, "last_loss": last, "val_loss": val, "skipped": len(skipped),
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"trained {cfg.train.steps} steps: loss {first:.3f} -> {last:.3f} nats/token; val {val:.3f}")
    print(f"MLflow run {run_id} in experiment '{cfg.tracking.experiment}' at {uri}")
    if uri.startswith("sqlite:"):
        print(f"look at it with:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return summary


def main(argv: list[str] | None = None) -> None:
    run(cli.parse(MainJobConfig, argv, prog="python -m pipelines.main"))


if __name__ == "__main__":
    main(sys.argv[1:])
