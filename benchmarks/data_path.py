"""Does the step wait for data? The same small runs from the live stream and from pre-tokenized shards, and 1,000
training steps of this tree beside a baseline commit's, in one run.

    python benchmarks/data_path.py                    # baseline 9ce7d64 (one shared Ray Data splitter)
    python benchmarks/data_path.py --baseline <commit> --long_steps 1000 --skip_baseline

Part 1, the data wait. Each row is a pretraining run of 2 workers on the shipped sample's 1,000 training images
(``python -m pipelines.pretrain``, fp32, ZeRO-2, global batch 16, micro batch 8): ``small`` at 32x32 (a step long
enough that the data should hide behind it) and ``debug`` at 16x16 (the main job's shape), each from the live
stream (read, decode, augment, quantize in Ray Data) and from the same images quantized first into augmented
passes (``pipelines.quantize --passes``, read as ``--train.format tokens``: nothing decoded). Printed: median
tokens/s over the logged steps after the first, and the run's ``summary/data_wait_share`` (the slowest rank's
share of step time blocked on its next micro-batch, the first logged window left out).

Part 2, the 1,000-step figure. ``debug`` at 16x16 trains ``--long_steps`` steps in this tree and in the baseline
(checked out into a temporary git worktree), as ``benchmarks/resume.py`` ran them: the seconds from step 1's
loss to the last step's (MLflow timestamps: start-up left out), one tree after the other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from resume import palette  # benchmarks/resume.py: the same random palette file, written by the tree's own code

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "igpt" / "data" / "cifar10_sample.parquet"
SHARED = ROOT.parent / "shared" / "datasets" / "cifar10"


def _env(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(tree))
    return env


def _job(tree: Path, module: str, argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=tree, env=_env(tree), capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: {module} {' '.join(argv)} failed:\n{done.stderr[-3000:]}")


def pretrain(tree: Path, store: Path, name: str, pal: Path, size: str, res: int, steps: int, train: list[str],
             val: list[str]) -> None:
    _job(tree, "pipelines.pretrain", [
        "--name", name, "--storage_path", str(store), "--palette_path", str(pal), *train, *val,
        "--val_images", "16", "--model.size", size, "--model.resolution", str(res), "--transform.resolution",
        str(res), "--deepspeed.preset", "cpu", "--deepspeed.precision", "fp32", "--deepspeed.micro_batch", "8",
        "--optim.global_batch", "16", "--optim.warmup_steps", "5", "--steps", str(steps),
        "--checkpoint.every_steps", "1000000", "--scaling.workers", "2", "--completions", "0", "--eval_every", "0"])


def metrics(store: Path, name: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run_id = (store / name / "mlflow_run_id").read_text().strip()
    loss = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    tok = sorted(client.get_metric_history(run_id, "train/tokens_per_s"), key=lambda m: m.step)
    run = client.get_run(run_id)
    return {"tokens_per_s": statistics.median(m.value for m in tok[1:]) if len(tok) > 1 else None,
            "wait": run.data.metrics.get("summary/data_wait_share"),
            "train_s": (loss[-1].timestamp - loss[0].timestamp) / 1000, "steps": loss[-1].step - loss[0].step}


def data_wait(out: Path, steps: dict[str, int], sizes: list[str]) -> list[tuple]:
    store, pal = out / "runs", palette(ROOT, out)
    live = ["--train.path", str(SAMPLE), "--train.key_prefix", "train/"]
    val = ["--val.path", str(SAMPLE), "--val.key_prefix", "test/"]
    rows = []
    for size, res in [(s, r) for s, r in (("small", 32), ("debug", 16)) if s in sizes]:
        t0 = time.time()
        _job(ROOT, "pipelines.quantize", [
            "--name", f"tok{res}", "--storage_path", str(out), "--palette_path", str(pal), "--data.path",
            str(SAMPLE), "--data.key_prefix", "train/", "--transform.resolution", str(res), "--transform.augment",
            "--passes", "2"])
        quantized = time.time() - t0
        for source, train in (("live stream", live),
                              ("pre-tokenized", ["--train.path", str(out / f"tok{res}"), "--train.format", "tokens"])):
            name = f"{size}-{res}-{'tok' if source != 'live stream' else 'live'}"
            pretrain(ROOT, store, name, pal, size, res, steps[size], train, val)
            m = metrics(store, name)
            rows.append((size, res, source, steps[size], m["tokens_per_s"], m["wait"], m["train_s"]))
            print(f"  {name}: {m['tokens_per_s']:,.0f} tokens/s, data wait {100 * (m['wait'] or 0):.1f}%", flush=True)
        print(f"  (quantizing {res}x{res}, 2 passes: {quantized:.0f} s)", flush=True)
    return rows


def long_run(tree: Path, out: Path, steps: int) -> dict:
    store, pal = out / "runs", palette(tree, out)
    train = ["--train.path", str(SAMPLE), "--train.key_prefix", "train/"]
    pretrain(tree, store, "long", pal, "debug", 16, steps, train, ["--val.path", str(SAMPLE), "--val.key_prefix",
                                                                   "test/"])
    return metrics(store, "long")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="9ce7d64")
    ap.add_argument("--long_steps", type=int, default=1000)
    ap.add_argument("--small_steps", type=int, default=60)
    ap.add_argument("--debug_steps", type=int, default=200)
    ap.add_argument("--skip_baseline", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=["small", "debug"], choices=["small", "debug"])
    ap.add_argument("--skip_long", action="store_true", help="part 1 only")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from igpt import hw

    print(hw.describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = data_wait(tmp / "wait", {"small": args.small_steps, "debug": args.debug_steps}, args.sizes)
        longs = {} if args.skip_long else {"this tree": long_run(ROOT, tmp / "t", args.long_steps)}
        if longs:
            print(f"  this tree: {args.long_steps} steps in {longs['this tree']['train_s']:.0f} s", flush=True)
        if not args.skip_baseline and not args.skip_long:
            base = tmp / f"baseline-{args.baseline}"
            subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=ROOT, check=True,
                           capture_output=True)
            try:
                longs[f"baseline {args.baseline}"] = long_run(base, tmp / "b", args.long_steps)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print("\n| size | IR | training data | steps | tokens/s (median) | data wait (share of step) | train s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for size, res, source, steps, tok, wait, secs in rows:
        print(f"| {size} | {res} | {source} | {steps} | {tok:,.0f} | "
              f"{'-' if wait is None else f'{100 * wait:.1f}%'} | {secs:.0f} |")
    print(f"\n| tree | {args.long_steps} steps: step 1 to the last (s) | s per step |\n|---|---:|---:|")
    for label, m in longs.items():
        print(f"| {label} | {m['train_s']:.1f} | {m['train_s'] / m['steps']:.3f} |")


if __name__ == "__main__":
    main()
