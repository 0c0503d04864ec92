"""What a resume costs, after 10 and after 1,000 steps: this tree beside a baseline commit, in one run.

    python benchmarks/resume.py                       # baseline: 9ce7d64, the last commit that skipped batches
    python benchmarks/resume.py --baseline <commit> --steps 10 1000

For each tree (the baseline checked out into a temporary git worktree, and this one) and each step count N: a
small run (debug model, 16x16, 2 workers, global batch 16, real CIFAR-10 from ../shared or the shipped sample)
trains N steps, then the same run name is submitted again with ``--steps N+1``. The figure is the time from that
second submission's start to its first training step (the MLflow timestamp of step N+1's loss), and, where the
tree logs it, the worker's own ``train/seconds_to_first_step`` (engine, checkpoint, stream positioned, one step).
Before: each worker pulled its N x 8 consumed records through Ray Data again (read, decode, augment, tokenize);
after: it starts reading at its saved position. Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "cifar10"


def data_args() -> list[str]:
    if (SHARED / "train-00000-of-00005.parquet").exists():
        return ["--train.path", str(SHARED), "--val.path", str(SHARED)]
    sample = ROOT / "igpt" / "data" / "cifar10_sample.parquet"
    return ["--train.path", str(sample), "--train.key_prefix", "train/", "--val.path", str(sample),
            "--val.key_prefix", "test/"]


def palette(tree: Path, out: Path) -> Path:
    path = out / "palette.npy"
    if not path.exists():
        code = ("import numpy as np; from igpt.data.palette import Palette; "
                "Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))"
                f".save({str(path)!r})")
        subprocess.run([sys.executable, "-c", code], cwd=tree, check=True)
    return path


def submit(tree: Path, store: Path, name: str, steps: int, pal: Path) -> float:
    """One submission of the pretraining job from ``tree``; returns its start time (epoch seconds)."""
    argv = [sys.executable, "-m", "pipelines.pretrain", "--name", name, "--storage_path", str(store),
            "--palette_path", str(pal), *data_args(), "--val_images", "16", "--model.size", "debug",
            "--model.resolution", "16", "--deepspeed.preset", "cpu", "--deepspeed.precision", "fp32",
            "--deepspeed.micro_batch", "8", "--optim.global_batch", "16", "--optim.warmup_steps", "5",
            "--steps", str(steps), "--checkpoint.every_steps", "1000000", "--scaling.workers", "2",
            "--completions", "0", "--eval_every", "0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(tree))
    start = time.time()
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return start


def first_step(store: Path, name: str, step: int) -> tuple[float, float | None]:
    """(timestamp of ``step``'s train/loss, the worker's seconds_to_first_step at it if logged)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run_id = (store / name / "mlflow_run_id").read_text().strip()
    loss = [m for m in client.get_metric_history(run_id, "train/loss") if m.step == step]
    own = [m.value for m in client.get_metric_history(run_id, "train/seconds_to_first_step") if m.step == step]
    return loss[-1].timestamp / 1000, (own[-1] if own else None)


def measure(tree: Path, out: Path, steps: list[int]) -> dict[int, tuple[float, float, float | None]]:
    store, pal = out / "runs", palette(tree, out)
    rows = {}
    for n in steps:
        t0 = time.time()
        submit(tree, store, f"r{n}", n, pal)
        trained = time.time() - t0
        start = submit(tree, store, f"r{n}", n + 1, pal)
        stamp, own = first_step(store, f"r{n}", n + 1)
        rows[n] = (trained, stamp - start, own)
        print(f"  {tree.name}: {n} steps trained in {trained:.0f} s; resumed to step {n + 1} in "
              f"{stamp - start:.1f} s" + (f" (worker: {own:.1f} s)" if own is not None else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="9ce7d64")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 1000])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / f"baseline-{args.baseline}"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            results = {"baseline": measure(base, tmp / "b", args.steps),
                       "this tree": measure(ROOT, tmp / "t", args.steps)}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print(f"\n| tree | {' | '.join(f'resume after {n} steps: to first step (worker)' for n in args.steps)} | "
          f"after {args.steps[-1]} / after {args.steps[0]} |")
    print("|---" * (len(args.steps) + 2) + "|")
    for label, rows in results.items():
        cells = [f"{rows[n][1]:.1f} s" + (f" ({rows[n][2]:.1f} s)" if rows[n][2] is not None else "")
                 for n in args.steps]
        print(f"| {label} | {' | '.join(cells)} | {rows[args.steps[-1]][1] / rows[args.steps[0]][1]:.2f} |")


if __name__ == "__main__":
    main()
