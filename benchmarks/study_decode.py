"""Decode once per study: the same small study twice, its training split decoded by every run (``--pretokenize 0``)
and tokenized once into augmented passes that every rung's trials and refit read (``--pretokenize N``), in one run.

    python benchmarks/study_decode.py                 # 2 rungs, 2-rate sweeps: 6 pretraining runs a study

Printed per study: its pretraining runs; the records their streams read (``data/records_read``: training and
validation; on the image path each one decoded, augmented and quantized, on the token path the training records
are token rows and only the validation records are decoded); the images the quantize stage decoded (its images
read x passes; none without it); the stage timings the study itself records (``summary.json``); its wall time.
Both studies use the shipped CIFAR-10 sample (1,000 training, 200 test images) at 16x16, one worker per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "igpt" / "data" / "cifar10_sample.parquet"


def study(out: Path, name: str, passes: int, steps: int) -> dict:
    space = out / "lrs.json"
    space.write_text(json.dumps({"_comment": "bench", "job": "sweep_lr", "params": {"lr": {"ordered": [0.01, 0.003]}}}))
    argv = [sys.executable, "-m", "pipelines.study", "--name", name, "--storage_path", str(out), "--ladder",
            "1x32,2x48", "--resolution", "16", "--data.path", str(SAMPLE), "--steps", str(steps),
            "--optim.global_batch", "16", "--optim.warmup_steps", "5", "--lr_space", str(space),
            "--trial_fraction", "0.5", "--scaling.workers", "1", "--scaling.cpus_per_worker", "0.5",
            "--max_concurrent_rungs", "1", "--val_images", "100", "--no-pixels", "--n_boot", "200",
            "--palette.sample_pixels", "50000", "--palette.max_iter", "5", "--pretokenize", str(passes)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu")
    t0 = time.time()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    wall = time.time() - t0
    summary = json.loads((out / name / "summary.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name(summary["experiment"]).experiment_id
    runs = client.search_runs([exp], f"tags.`igpt.job` = 'pretrain' AND tags.`igpt.study` = '{name}'",
                              max_results=1000)
    read = sum(r.data.metrics.get("data/records_read", 0) for r in runs)
    tokens = [r for r in runs if r.data.params.get("train.format") == "tokens"]
    q = client.search_runs([exp], f"tags.`igpt.job` = 'quantize' AND tags.`igpt.study` = '{name}'")
    decoded_once = sum(r.data.metrics.get("images_read", 0) * r.data.metrics.get("passes", 1) for r in q)
    return {"runs": len(runs), "read": read, "quantized": decoded_once, "wall": wall,
            "timings": summary["timings"], "token_runs": len(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from igpt import hw

    print(hw.describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for label, passes in (("decode per run", 0), (f"--pretokenize {args.passes}", args.passes)):
            rows[label] = study(Path(tmp), "per-run" if not passes else "once", passes, args.steps)
            print(f"  {label}: {rows[label]}", flush=True)
    print("\n| study | pretraining runs (from tokens) | records through the runs' streams | decoded by quantize | "
          "tokenize stage (s) | pretraining stages (s) | wall (s) |\n|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        pre = sum(v for k, v in r["timings"].items() if k.startswith(("sweep/", "pretrain/")))
        print(f"| {label} | {r['runs']} ({r['token_runs']}) | {r['read']:,.0f} | {r['quantized']:,.0f} | "
              f"{r['timings'].get('tokens', 0):.0f} | {pre:.0f} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
