"""The reproduction's scaling question as a study: a CPU ladder of AR models on real CIFAR-10, each with its own
learning-rate sweep and refit, features and probes, through ``pipelines.study`` (one orchestrator).

    python benchmarks/scaling_study.py                    # ~50 min on 2 cores; real CIFAR-10 from ../shared
    python benchmarks/scaling_study.py --dry_run          # the study's command, nothing run

It prints the study's report (the rungs' table, L(N) and L(C) with 95% bootstrap intervals, the forecast of the
largest rung from the others, each rung against the next on the same test images: the paired loss difference and
McNemar's test of the probes) and the wall time; BENCHMARKS.md's section is written from that output.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("IGPT_CIFAR10") or ROOT.parent / "shared" / "datasets" / "cifar10")

# the ladder: N (non-embedding) from 12K to 0.6M, x ~50; IR 16 (256 tokens) keeps every rung on the CPU
LADDER = "1x32,2x48,3x64,4x96"


def study_argv(args) -> list[str]:
    return ["--name", args.name, "--storage_path", args.storage_path, "--ladder", args.ladder, "--resolution", "16",
            "--data.path", str(args.data), "--data.max_images", str(args.train_images),
            "--data.test_max_images", str(args.test_images), "--steps", str(args.steps),
            "--optim.global_batch", "32", "--optim.warmup_steps", str(args.steps // 10),
            "--lr_space", "sweep_lr", "--trial_fraction", str(args.trial_fraction),
            "--scaling.workers", "1", "--scaling.cpus_per_worker", "1", "--max_concurrent_rungs", "2",
            "--val_images", "500", "--holdout", "0.2", "--palette.sample_pixels", "200000",
            "--palette.max_iter", "20"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="cifar-ladder")
    ap.add_argument("--storage_path", default="/tmp/scaling-study")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--ladder", default=LADDER)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--trial_fraction", type=float, default=0.2)
    ap.add_argument("--train_images", type=int, default=6000)
    ap.add_argument("--test_images", type=int, default=2000)
    ap.add_argument("--dry_run", action="store_true")
    args = ap.parse_args()
    argv = [sys.executable, "-m", "pipelines.study", *study_argv(args)]
    print(shlex.join(argv), flush=True)
    if args.dry_run:
        return
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu")
    t0 = time.time()
    done = subprocess.run(argv, cwd=ROOT, env=env)
    print(f"\nwall time {time.time() - t0:.0f} s ({(time.time() - t0) / 60:.1f} min); exit {done.returncode}")
    raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
