"""Does a shortened trial rank learning rates as the full run would? The premise of ``pipelines.sweep_lr``'s
``--trial_fraction``, measured once at CPU scale.

    python benchmarks/sweep_premise.py                       # debug model, 16x16, real CIFAR-10 from ../shared
    python benchmarks/sweep_premise.py --rates 0.01,0.003,0.001,0.0003 --steps 600 --fraction 0.1

For one size and each rate: the sweep's trial (``sweep_lr.pretrain_config``: part=rest of the training images,
validated on the held-out share, the schedule scaled by ``--fraction`` so it still warms up and decays to 0) and
the same run at fraction 1, through the real pretraining job (Ray Train + DeepSpeed on the CPU). Prints the final
validation losses side by side, both rankings, Kendall's tau and whether the best rate agrees; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "cifar10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/sweep-premise")
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--size", default="debug")
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--rates", default="0.01,0.003,0.001")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--train_images", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from igpt import cli
    from igpt.train import sweep_lr_job as sweep_lr
    from igpt.train.pretrain_job import PretrainJobConfig
    from igpt.train.sweep_lr_job import SweepLRJobConfig

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    t0 = time.time()
    palette = out / "palette" / "palette.npy"
    if not palette.exists():
        subprocess.run([sys.executable, "-m", "pipelines.fit_palette", "--name", "palette", "--storage_path", str(out),
                        "--data.path", args.data, "--data.split", "train", "--data.max_images", "5000",
                        "--transform.resolution", str(args.resolution), "--palette.sample_pixels", "100000",
                        "--palette.max_iter", "10"], cwd=ROOT, env=env, check=True, capture_output=True)
    rates = [float(r) for r in args.rates.split(",")]
    base = PretrainJobConfig()
    pre = cli.from_dict(PretrainJobConfig, {
        **cli.to_dict(base), "palette_path": str(palette), "steps": args.steps, "val_images": 0, "completions": 0,
        "train": {**cli.to_dict(base.train), "path": args.data, "split": "train", "key_prefix": "train/",
                  "max_images": args.train_images},
        "model": {**cli.to_dict(base.model), "size": args.size, "resolution": args.resolution},
        "deepspeed": {**cli.to_dict(base.deepspeed), "preset": "cpu", "precision": "fp32", "zero_stage": 2,
                      "micro_batch": args.batch // 2},
        "optim": {**cli.to_dict(base.optim), "global_batch": args.batch},
        "checkpoint": {**cli.to_dict(base.checkpoint), "every_steps": args.steps},
        "scaling": {**cli.to_dict(base.scaling), "workers": 2},
        "tracking": {**cli.to_dict(base.tracking), "log_model": False}})
    losses: dict[float, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for label, fraction in (("short", args.fraction), ("full", 1.0)):
        cfg = SweepLRJobConfig(name=f"premise-{label}", storage_path=str(out / "runs"), trial_fraction=fraction,
                               holdout=0.1, pretrain=pre)
        t = time.time()
        for lr in rates:
            pcfg = sweep_lr.pretrain_config(cfg, lr, None)
            argv = [sys.executable, "-c", "import sys, json; from igpt import cli; "
                    "from igpt.train import sweep_lr_job as sweep_lr; "
                    "from igpt.train.pretrain_job import PretrainJobConfig; "
                    "print('RESULT', json.dumps(sweep_lr.pretrain_once(cli.from_dict(PretrainJobConfig, "
                    "json.loads(sys.argv[1])), diverged_ok=True)))", json.dumps(cli.to_dict(pcfg))]
            for attempt in range(3):  # a local Ray runtime can time out starting on a loaded box: try again
                done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)  # (a finished run
                if not done.returncode:  # is read back from its summary.json, not run again)
                    break
                print(f"{label} lr={lr:g}: attempt {attempt + 1} failed: {done.stderr.strip().splitlines()[-1]}",
                      flush=True)
            else:
                raise SystemExit(f"{label} lr={lr:g} failed:\n{done.stderr[-3000:]}")
            res = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])
            losses.setdefault(lr, {})[label] = res["val_loss"]
            print(f"{label} (fraction {fraction:g}) lr={lr:g}: val loss {res['val_loss']:.4f}", flush=True)
        seconds[label] = time.time() - t
    from scipy.stats import kendalltau

    short = [losses[r]["short"] for r in rates]
    full = [losses[r]["full"] for r in rates]
    rank = lambda xs: [rates[i] for i in sorted(range(len(xs)), key=lambda i: xs[i])]  # noqa: E731
    tau = kendalltau(short, full).statistic
    print(f"\n{args.size} at {args.resolution}x{args.resolution}, {args.steps} steps x {args.batch} (full), trials "
          f"at fraction {args.fraction:g} ({max(1, math.floor(args.steps * args.fraction))} steps); "
          f"{args.train_images} training images less a 10% held-out share; {time.time() - t0:.0f} s in all\n")
    print("| lr | trial val loss (nats/token) | full-run val loss |\n|---:|---:|---:|")
    for r in rates:
        print(f"| {r:g} | {losses[r]['short']:.4f} | {losses[r]['full']:.4f} |")
    print(f"\nranking by trial: {', '.join(f'{r:g}' for r in rank(short))}; by full run: "
          f"{', '.join(f'{r:g}' for r in rank(full))}; Kendall tau {tau:+.2f}; best rate "
          f"{'agrees' if rank(short)[0] == rank(full)[0] else 'differs'} ({rank(short)[0]:g} vs {rank(full)[0]:g}); "
          f"trials {seconds['short']:.0f} s, full runs {seconds['full']:.0f} s")


if __name__ == "__main__":
    main()
