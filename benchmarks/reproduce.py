"""Reproduce the paper's linear-probe findings at CPU scale, on real CIFAR-10, through the real pipelines.

    .venv/bin/python benchmarks/reproduce.py                      # ~60 min on 2 CPU cores (--budget_minutes)
    .venv/bin/python benchmarks/reproduce.py --smoke              # the plumbing end to end, a few minutes
    .venv/bin/python benchmarks/reproduce.py --dry_run [--gpu]    # build every stage's config, print the plan
    .venv/bin/python benchmarks/reproduce.py --gpu                # iGPT-S-shaped, 32x32, bf16, one GPU (untested)

One command, one table. Stages, each the real job called through its ``run(cfg)`` with a config built by
``igpt.cli.parse`` (the plan prints the equivalent ``python -m pipelines.<job>`` command lines):

1. ``fit_palette``: the 512-colour k-means palette, fit on the N training images *resized to the study's input
   resolution* (default 16x16, ``--resolution``; ``--transform.resolution 16``), so the colours are those the
   models see.
2. ``pretrain`` x 3 (Ray Train, 2 workers, DeepSpeed ZeRO-2 fp32 on the CPU): two AR sizes from
   ``igpt.config.MODEL_SIZES`` -- ``debug`` (2 layers, d 64) and ``tiny`` (4 layers, d 128: enough layers for
   "relative depth" to mean something) -- and a BERT model of the larger size. All three get the same budget:
   the same steps x global batch (64), the same lr (2e-3, 5% linear warm-up then cosine to 0), the same data.
   The training images are the first N (default 50,000: all of CIFAR-10's training split) less a held-out share
   (20%, chosen by a hash of the key); the validation loss is measured on 500 held-out images, 4 times per run.
3. ``extract`` x 4: every layer's pooled features of the probe images (the first P of the N training images,
   default 5,000, split into probe-train / probe-val by the *same* held-out hash, so probe-val images were never
   pretrained on) and of T test images (default 5,000), for the three models and for a random-init twin of the
   larger AR model. The larger AR model's feature set also stores the (palette-quantized) pixels.
4. ``probe`` x 4: Ray Tune L-BFGS sweep over every layer x C in {0.01, 0.1, 1} on probe-train/probe-val, the
   best refit on train+val and scored once on test; the larger AR model's probe also runs the raw-pixel baseline
   (16x16x3 = 768 features, the same resolution as the models).
5. Report: ``reproduce.md`` in ``--output_dir`` (findings table, per-model details, timings, plots) and an MLflow
   parent run tagged ``igpt.job=reproduce`` holding it as artifacts (with ``plots/val_accuracy_by_depth.png`` and
   ``plots/val_loss.png``). Every stage's own MLflow run is tagged ``igpt.reproduce_run_id`` (not nested: nested
   runs are left out by ``pipelines.compare``, which this store also serves:
   ``python -m pipelines.compare --tag igpt.reproduce_run_id=<id> --tracking.tracking_uri sqlite:///<out>/mlflow.db``).

The findings table answers, each with this run's numbers and "agrees/disagrees with the paper":
pretrained vs random-init twin vs raw pixels; where the best probe layer lies relative to depth (and whether the
last layer is worse); whether the larger AR model reaches a lower validation loss and a better probe; whether AR
probes better than BERT (the paper: by more than a point on CIFAR-10). Accuracies come with a 95% interval
half-width (normal approximation, unpaired, so conservative for the same test images).

Budget (``--budget_minutes``, default 60; 9.5 with ``--gpu``). Steps are *sized from a measurement*: before
anything else the script times a few training steps (fwd + bwd + Adam, one micro-batch of random tokens) and a
forward pass of each model in this process, with the one torch thread each Ray worker gets (on the GPU: bf16
autocast / TF32 forward), and a fixed "load probe" step (4 layers, d 128, 16 images of 16x16: ~0.55 s on an idle
core of the CI box) whose slowdown scales the fixed allowances (machine load slows start-up as much as compute).
A cost model turns these into each stage's time -- fixed start-up allowances per job, the pipeline's overhead
over the bare step (x1.8 + 0.3 s per step on the CPU), evaluation, extraction (x5 forward passes for BERT's five
masks), probe trials -- keeps 10% of the budget spare, and gives the rest to pretraining: ``steps = floor(time
left / sum over the 3 models of one step's time)`` (at least 20). Where extraction and probes would take more
than 30% of the budget, P and T shrink (not below 2,000 each). Before extraction the plan is redone with the time
actually left, so an overrun of pretraining shrinks P and T. Each stage prints its planned and actual seconds;
the report lists them. ``--steps``, ``--probe_images`` and ``--test_images`` override the sizing. On an idle
2-core CI box the default plans ~420 steps x 64 = ~27,000 images per model (0.67 epoch) and
P = T = 5,000 in ~53 minutes (measured 2026-11-28: 51.3 minutes; BENCHMARKS.md). The measurement only sees
the load of its own minute: on a shared machine whose load rises later, the run takes longer than planned; at
the load seen while this was written (the load probe 3-4x slower than idle) 60 minutes do not fit even 20
steps -- the plan says so in a note and runs over.

``--gpu``: iGPT-S-shaped, as the paper's smallest: ``small`` (8 layers, d 256) and ``S`` (24 layers, d 512, 76M
parameters) AR, BERT ``S``, at 32x32 (the paper's resolution for CIFAR) in bf16 with ``--scaling.use_gpu``, one
worker (DeepSpeed preset ``S``: ZeRO-1, micro batch 64 x 2 accumulation = global batch 128), lr 1e-3, features
on the GPU (TF32 through ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE``), probes on the host's cores (16 trials at once),
C in {0.1, 1}. Sized to fit one 10-minute device call including start-up: a 9.5-minute budget, 5% kept spare.
Of it, by the cost model (GPU allowances are estimates, never measured here): ~1 min Ray start-up and DeepSpeed's
one-off FusedAdam build, ~30 s the palette (50,000 images at 32x32, 1M pixels), 30 s fixed per pretraining run,
and ~3.5 min extraction + probes -- mostly the 8 jobs' fixed start-up; with P = T = 1,000 images (shrunk from
1,500 to keep them under 40% of the budget; BERT-S: 5 masks x 2,000 images x ~0.2 TFLOP each). The remaining
~2.5 min give ~120 steps x 128 images to each model (S: ~600 MFLOP/token x 1,024 tokens x 128 images = 80
TFLOP a step, ~0.32 s at 25% of an H100's 989 TFLOP/s bf16; BERT-S the same; small ~0.04 s). At run time the
steps are re-sized from the GPU's own measured step time. That is a thin reproduction (~0.4 epoch of S); where
no 10-minute limit applies, ``--gpu --budget_minutes 30`` plans ~1,400 steps and P = T = 1,500. It needs a
machine with the project installed (``./setup.sh``: Ray, DeepSpeed, MLflow) and the CIFAR-10 shards (``--data``);
not run in this project yet: the lent device machines have torch but not Ray, DeepSpeed or MLflow, and the
shards do not travel there.

``--smoke``: 600 training images at 8x8, 10 steps x 16 images, 600 probe and 200 test images, C in {0.1, 1}:
every stage end to end (the numbers mean nothing): 20 minutes on this project's 2 shared cores under heavy load
(load average 30-50), less on idle ones. ``--dry_run``: measures (CPU
only), sizes, builds every stage's config (``cli.parse``), DeepSpeed config and model, checks the data, prints
the plan and the command lines, and runs nothing.

Outputs go to ``--output_dir`` (default /tmp/igpt-reproduce[-smoke|-gpu]): ``palette/``, ``train/<model>/``,
``features/<model>/``, ``probe/<model>/``, ``mlflow.db`` + ``mlartifacts/`` (the MLflow store, unless
``--tracking_uri``), ``plan.json``, ``results.json``, ``reproduce.md``, ``plots/``. A non-empty output folder is
refused unless ``--overwrite`` (which deletes it only if it holds an earlier ``plan.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("IGPT_CIFAR10") or ROOT.parent / "shared" / "datasets" / "cifar10")

# The paper's findings this script checks (Chen et al. 2020, "Generative Pretraining from Pixels").
PAPER = {
    "pretrain": "pretrained features far above a random-init model and raw pixels",
    "depth": "AR: probe accuracy rises then falls with depth; best layer in the middle, the last one worse",
    "scale": "larger model: lower validation loss and better probe accuracy",
    "bert": "AR probes better than BERT on CIFAR-10, by more than 1 point",
}

# Cost model: fixed allowances (s) and the pipeline's overhead over the bare, measured compute. The allowances
# are for an idle core of this project's 2-core CI box; on the CPU they are multiplied by the measured slowdown
# (LOAD_PROBE), the measured compute already carries it. CPU allowances: from a --smoke run here, divided by
# the slowdown measured in it.
COST = {
    "cpu": dict(ray_start=15, palette_fixed=40, palette_per_image=1 / 1500, pretrain_fixed=70, step_factor=1.8,
                step_extra=0.3, eval_factor=1.5, extract_fixed=45, extract_factor=1.3, fwd_parallel=2,
                probe_fixed=10, trial_s=6.0, parallel_trials=2, fit_s_per_elem=2e-6, report=15, once=0),
    "gpu": dict(ray_start=10, palette_fixed=25, palette_per_image=1 / 8000, pretrain_fixed=30, step_factor=1.2,
                step_extra=0.02, eval_factor=1.5, extract_fixed=20, extract_factor=1.5, fwd_parallel=1,
                probe_fixed=10, trial_s=3.0, parallel_trials=16, fit_s_per_elem=2e-6, report=10, once=45),
}
SCALED = {"ray_start", "palette_fixed", "palette_per_image", "pretrain_fixed", "step_extra", "extract_fixed",
          "probe_fixed", "trial_s", "fit_s_per_elem", "report", "once"}  # allowances that scale with the load
# The load probe: a 4-layer d-128 model, 16 images of 16x16, one fwd + bwd + Adam step on one thread. An idle
# core of the CI box does it in ~0.55 s (BENCHMARKS.md: 15,085 tokens/s on 2 threads at this shape).
LOAD_PROBE_IDLE_S = 0.55
# FLOP/s assumed where nothing is measured (--no_calibrate; a --gpu dry run without a GPU): train, forward
FALLBACK_RATE = {"cpu": (25e9, 25e9), "gpu": (250e12, 100e12)}
SPARE = {"cpu": 0.10, "gpu": 0.05}  # share of the budget kept spare
# extraction + probes may take at most this share of the budget when P and T are automatic
PROBE_SHARE = {"cpu": 0.30, "gpu": 0.40}
MIN_PROBE_IMAGES = {"cpu": 2000, "gpu": 1000}


@dataclass
class ModelSpec:
    key: str  # run / feature-set / probe name
    size: str
    objective: str
    role: str  # "smaller AR", "larger AR", "BERT", "random-init twin"
    n_layer: int = 0
    d_model: int = 0
    params: int = 0
    pretrained: bool = True  # False: the random-init twin (features only)
    twin_of: str = ""


@dataclass
class Plan:
    mode: str  # cpu | gpu
    smoke: bool
    budget_s: float
    data: str
    out: str
    tracking_uri: str
    experiment: str
    resolution: int
    train_images: int
    holdout: float
    pretrain_images: int = 0  # part=rest of the first train_images
    heldout_images: int = 0
    test_total: int = 0
    probe_images: int = 0
    test_images: int = 0
    probe_auto: bool = True
    steps: int = 0
    steps_auto: bool = True
    global_batch: int = 64
    micro_batch: int = 32
    workers: int = 2
    lr: float = 2e-3
    warmup_steps: int = 0
    epochs: int = 1
    steps_per_epoch: int = 0
    eval_every: int = 0
    val_images: int = 500
    completions: int = 4
    palette_pixels: int = 1_000_000
    palette_iters: int = 100
    c_grid: list = field(default_factory=lambda: [0.01, 0.1, 1.0])
    models: list = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    calibrated: str = ""
    slowdown: float = 1.0  # CPU: the load probe's time over an idle CI-box core's (>= 1)
    estimates: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    argv: list = field(default_factory=list)  # this script's command line

    @property
    def pretrained(self) -> list[ModelSpec]:
        return [m for m in self.models if m.pretrained]

    def model(self, role: str) -> ModelSpec:
        return next(m for m in self.models if m.role == role)


# ---------------------------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget_minutes", type=float, default=None, help="wall-clock budget (default 60; --gpu 9.5)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 Parquet folder (default ../shared/"
                    "datasets/cifar10 beside the repo, or $IGPT_CIFAR10)")
    ap.add_argument("--output_dir", default=None, help="default /tmp/igpt-reproduce[-smoke|-gpu]")
    ap.add_argument("--resolution", type=int, default=None, help="input resolution IR (default 16; --gpu 32; "
                    "--smoke 8): palette, models and pixel baseline all at IR x IR")
    ap.add_argument("--train_images", type=int, default=None, help="first N training images (default 50,000)")
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps per model (default: sized from "
                    "the budget)")
    ap.add_argument("--global_batch", type=int, default=None, help="images per step (default 64; --gpu 128)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3; --gpu 1e-3)")
    ap.add_argument("--probe_images", type=int, default=None, help="first P training images probed (train/val by "
                    "the held-out hash; default 5,000, --gpu 1,500, shrunk to fit the budget)")
    ap.add_argument("--test_images", type=int, default=None, help="first T test images (default = P)")
    ap.add_argument("--holdout", type=float, default=0.2, help="held-out share of the training images: "
                    "pretraining's validation loss and the probes' val split (default 0.2)")
    ap.add_argument("--small_size", default=None, help="smaller AR size (default debug; --gpu small)")
    ap.add_argument("--large_size", default=None, help="larger AR and BERT size (default tiny; --gpu S)")
    ap.add_argument("--gpu", action="store_true", help="one GPU, bf16, iGPT-S-shaped at 32x32 (see above)")
    ap.add_argument("--smoke", action="store_true", help="a tiny run of every stage, to check the plumbing")
    ap.add_argument("--dry_run", action="store_true", help="build every config, print the plan, run nothing")
    ap.add_argument("--no_calibrate", action="store_true", help="size from FLOP estimates instead of measuring")
    ap.add_argument("--tracking_uri", default=None, help="MLflow store (default sqlite:///<output_dir>/mlflow.db)")
    ap.add_argument("--experiment", default="igpt", help="MLflow experiment (default igpt)")
    ap.add_argument("--name", default=None, help="name of the MLflow parent run (default reproduce[-smoke|-gpu])")
    ap.add_argument("--overwrite", action="store_true", help="delete an earlier run of this script in output_dir")
    ap.add_argument("--report_only", action="store_true", help="rebuild the report of the run in --output_dir "
                    "from its files (no stage runs)")
    ap.add_argument("--verbose", action="store_true", help="Ray workers' logs and progress bars on the console")
    return ap.parse_args(argv)


def make_plan(a: argparse.Namespace) -> Plan:
    from igpt.config import MODEL_SIZES, ModelConfig

    mode = "gpu" if a.gpu else "cpu"
    suffix = "-smoke" if a.smoke else ("-gpu" if a.gpu else "")
    out = Path(a.output_dir or f"/tmp/igpt-reproduce{suffix}").resolve()
    budget = a.budget_minutes if a.budget_minutes is not None else (9.5 if a.gpu else 60.0)
    p = Plan(mode=mode, smoke=a.smoke, budget_s=budget * 60, data=str(Path(a.data).resolve()), out=str(out),
             tracking_uri=a.tracking_uri or f"sqlite:///{out / 'mlflow.db'}", experiment=a.experiment,
             resolution=a.resolution or (8 if a.smoke else 32 if a.gpu else 16),
             train_images=a.train_images or (600 if a.smoke else 50_000), holdout=a.holdout)
    if a.smoke:
        p.global_batch, p.micro_batch, p.val_images, p.completions = 16, 8, 64, 2
        p.palette_pixels, p.palette_iters, p.c_grid = p.train_images * p.resolution**2, 20, [0.1, 1.0]
        default_probe, default_steps = 600, 10
        p.workers = 1 if a.gpu else p.workers
    elif a.gpu:
        p.global_batch, p.micro_batch, p.workers, p.lr, p.c_grid = 128, 64, 1, 1e-3, [0.1, 1.0]
        default_probe, default_steps = 1500, None
    else:
        default_probe, default_steps = 5000, None
    p.global_batch = a.global_batch or p.global_batch
    p.micro_batch = min(p.micro_batch, p.global_batch // p.workers)
    p.lr = a.lr or p.lr
    p.steps = a.steps or default_steps or 0
    p.steps_auto = not p.steps
    p.probe_images = min(a.probe_images or default_probe, p.train_images)
    p.test_images = a.test_images or (200 if a.smoke else p.probe_images)
    p.probe_auto = a.probe_images is None and a.test_images is None and not a.smoke
    small = a.small_size or ("debug" if a.smoke or not a.gpu else "small")
    large = a.large_size or ("tiny" if a.smoke or not a.gpu else "S")
    for s in (small, large):
        if s not in MODEL_SIZES:
            raise SystemExit(f"unknown model size {s!r}; MODEL_SIZES has {', '.join(MODEL_SIZES)}")
    specs = [ModelSpec(f"ar-{small}", small, "ar", "smaller AR"), ModelSpec(f"ar-{large}", large, "ar", "larger AR"),
             ModelSpec(f"bert-{large}", large, "bert", "BERT"),
             ModelSpec(f"ar-{large}-random", large, "ar", "random-init twin", pretrained=False,
                       twin_of=f"ar-{large}")]
    if small == large:
        raise SystemExit("--small_size and --large_size must differ")
    for m in specs:
        cfg = ModelConfig(size=m.size, resolution=p.resolution, objective=m.objective)
        m.n_layer, m.d_model, m.params = cfg.n_layer, cfg.d_model, cfg.param_count()
    if specs[1].n_layer < 4:
        p.notes.append(f"the larger model has {specs[1].n_layer} layers (< 4): relative depth means little")
    if specs[1].params <= specs[0].params:
        raise SystemExit(f"--large_size {large} is not larger than --small_size {small}")
    p.models = specs
    return p


# ---------------------------------------------------------------------------------------------- calibration


def calibrate(plan: Plan, measure: bool) -> None:
    """Seconds per micro-batch training step and per image forward (features) of each pretrained model, measured
    here with the threads one Ray worker gets (1 on the CPU), or estimated from FLOPs when ``measure`` is off."""
    import torch

    from igpt.config import ModelConfig

    use_gpu = plan.mode == "gpu"
    if measure and use_gpu and not torch.cuda.is_available():
        plan.notes.append("no GPU here: step times estimated from FLOPs (250 TFLOP/s train, 100 forward)")
        measure = False
    plan.calibrated = "measured" if measure else "FLOP estimate"
    threads = torch.get_num_threads()
    if not use_gpu:
        torch.set_num_threads(1)
    device = torch.device("cuda" if use_gpu else "cpu")
    if use_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # as TORCH_ALLOW_TF32_CUBLAS_OVERRIDE gives the actors
    train_rate, fwd_rate = FALLBACK_RATE[plan.mode]
    try:
        if measure and not use_gpu:
            plan.slowdown = load_probe() / LOAD_PROBE_IDLE_S
            plan.slowdown = min(max(plan.slowdown, 1.0), 10.0)
        for m in plan.pretrained:
            cfg = ModelConfig(size=m.size, resolution=plan.resolution, objective=m.objective)
            if not measure:
                tr = plan.micro_batch * cfg.n_ctx * cfg.train_flops_per_token() / train_rate
                fw = cfg.n_ctx * cfg.train_flops_per_token() / 3 / fwd_rate
                plan.calibration[m.key] = {"train_s": tr, "fwd_s": fw}
                continue
            train_s, fwd_s = measure_model(cfg, plan.micro_batch, device)
            plan.calibration[m.key] = {"train_s": train_s, "fwd_s": fwd_s}
    finally:
        torch.set_num_threads(threads)
    # AR and BERT of one size do the same compute: a load spike during one measurement should not size the run,
    # so models of one size share the faster of their measurements
    for m in plan.pretrained:
        same = [plan.calibration[o.key] for o in plan.pretrained if o.size == m.size]
        plan.calibration[m.key] = {k: min(c[k] for c in same) for k in ("train_s", "fwd_s")}
    for m in plan.models:  # the twin computes exactly what its pretrained architecture does
        if not m.pretrained:
            plan.calibration[m.key] = plan.calibration[m.twin_of]


def measure_model(cfg, micro: int, device, forward: bool = True, budget_s: float = 4.0) -> tuple[float, float]:
    """(seconds of one training step on ``micro`` random images: fwd + bwd + Adam, bf16 autocast on a GPU;
    seconds per image of the features forward at batch 64, or 0 without ``forward``)."""
    import torch

    from igpt.model import IGPT

    use_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if use_gpu else (lambda: None)
    torch.manual_seed(0)
    model = IGPT(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.n_colors, (micro, cfg.n_ctx), device=device)

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=use_gpu):
            loss = model.loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_s = _median(_timed(step, sync, budget_s=budget_s, min_runs=3))
    fwd_s = 0.0
    if forward:
        xf = torch.randint(0, cfg.n_colors, (64, cfg.n_ctx), device=device)
        fwd_s = _median(_timed(lambda: model.features(xf), sync, budget_s=budget_s / 2)) / 64
    if use_gpu:
        del model, opt, x
        torch.cuda.empty_cache()
    return train_s, fwd_s


def load_probe() -> float:
    """Seconds of one training step of the load probe (see LOAD_PROBE_IDLE_S) on this process's thread(s)."""
    import torch

    from igpt.config import ModelConfig

    cfg = ModelConfig(size="tiny", n_layer=4, d_model=128, n_head=4, resolution=16)
    return measure_model(cfg, 16, torch.device("cpu"), forward=False, budget_s=3.0)[0]


def _timed(fn, sync, budget_s: float, min_runs: int = 2, max_runs: int = 5) -> list[float]:
    fn()  # warm-up
    sync()
    times, t_start = [], time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - t_start < budget_s):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


# ---------------------------------------------------------------------------------------------- sizing


def cost(plan: Plan, key: str) -> float:
    v = COST[plan.mode][key]
    return v * plan.slowdown if key in SCALED else v


def n_evals(plan: Plan) -> int:
    spe, steps = max(plan.steps_per_epoch, 1), max(plan.steps, 1)
    ev = {s for s in range(plan.eval_every, steps + 1, plan.eval_every)} if plan.eval_every else set()
    ev |= {s for s in range(spe, steps + 1, spe)} | {steps}
    return len(ev)


def step_seconds(plan: Plan, m: ModelSpec) -> float:
    accum = plan.global_batch // (plan.micro_batch * plan.workers)
    return accum * plan.calibration[m.key]["train_s"] * cost(plan, "step_factor") + cost(plan, "step_extra")


def pretrain_seconds(plan: Plan, m: ModelSpec, steps: int) -> float:
    evals = 5 if not steps else n_evals(plan)
    return (cost(plan, "pretrain_fixed") + steps * step_seconds(plan, m)
            + evals * plan.val_images * plan.calibration[m.key]["fwd_s"] * cost(plan, "eval_factor"))


def masks(m: ModelSpec) -> int:
    return 5 if m.objective == "bert" else 1


def extract_seconds(plan: Plan, m: ModelSpec, probe_images: int, test_images: int) -> float:
    return cost(plan, "extract_fixed") + ((probe_images + test_images) * masks(m) * plan.calibration[m.key]["fwd_s"]
                                          * cost(plan, "extract_factor") / cost(plan, "fwd_parallel"))


def probe_seconds(plan: Plan, m: ModelSpec, probe_images: int, pixels: bool) -> float:
    rows = probe_images * (1 - plan.holdout)
    fit = rows * masks(m) * m.d_model * cost(plan, "fit_s_per_elem")
    trials = m.n_layer * len(plan.c_grid)
    rounds = math.ceil(trials / cost(plan, "parallel_trials"))
    t = cost(plan, "probe_fixed") + rounds * (cost(plan, "trial_s") + fit) + fit / (1 - plan.holdout)
    if pixels:
        pfit = rows * 3 * plan.resolution**2 * cost(plan, "fit_s_per_elem")
        rounds = math.ceil(len(plan.c_grid) / cost(plan, "parallel_trials"))
        t += rounds * (cost(plan, "trial_s") + pfit) + pfit / (1 - plan.holdout)
    return t


def features_seconds(plan: Plan, probe_images: int, test_images: int) -> float:
    large = plan.model("larger AR")
    return sum(extract_seconds(plan, m, probe_images, test_images)
               + probe_seconds(plan, m, probe_images, pixels=m is large) for m in plan.models)


def fit_probe_images(plan: Plan, seconds: float) -> None:
    """Shrink P and T (automatic ones only, never below MIN_PROBE_IMAGES) until extraction + probes fit."""
    if not plan.probe_auto:
        return
    for _ in range(20):
        est = features_seconds(plan, plan.probe_images, plan.test_images)
        floor = MIN_PROBE_IMAGES[plan.mode]
        if est <= seconds or plan.probe_images <= floor:
            break
        fixed = features_seconds(plan, 0, 0) - 4 * cost(plan, "extract_fixed")  # roughly: probes' fixed part
        scale = max(0.5, min(0.95, (seconds - fixed) / max(est - fixed, 1)))
        plan.probe_images = max(floor, int(plan.probe_images * scale) // 100 * 100)
        plan.test_images = max(floor, int(plan.test_images * scale) // 100 * 100)


def size(plan: Plan, elapsed: float) -> None:
    """Counts of the data, then P/T and the steps from the budget (see the docstring)."""
    from igpt import sources

    rest = sources.check(sources.DatasetSpec(path=plan.data, split="train", max_images=plan.train_images,
                                             holdout=plan.holdout, part="rest"))
    plan.pretrain_images = rest.count
    plan.heldout_images = plan.train_images - rest.count
    plan.test_total = sources.check(sources.DatasetSpec(path=plan.data, split="test")).count
    plan.test_images = min(plan.test_images, plan.test_total)
    plan.steps_per_epoch = plan.pretrain_images // plan.global_batch
    if plan.steps_per_epoch < 1:
        raise SystemExit(f"{plan.pretrain_images} pretraining images make no global batch of {plan.global_batch}")
    budget = plan.budget_s * (1 - SPARE[plan.mode]) - elapsed
    fit_probe_images(plan, PROBE_SHARE[plan.mode] * plan.budget_s)
    fixed = (cost(plan, "ray_start") + cost(plan, "palette_fixed") + plan.train_images * cost(plan, "palette_per_image")
             + cost(plan, "report") + cost(plan, "once") + features_seconds(plan, plan.probe_images, plan.test_images)
             + sum(pretrain_seconds(plan, m, 0) for m in plan.pretrained))
    per_step = sum(step_seconds(plan, m) for m in plan.pretrained)
    if plan.steps_auto:
        plan.steps = int((budget - fixed) // per_step)
        floor = 20
        if plan.steps < floor:
            plan.notes.append(f"the budget leaves {max(plan.steps, 0)} steps; running {floor} (over budget)")
            plan.steps = floor
    plan.epochs = math.ceil(plan.steps / plan.steps_per_epoch)
    plan.warmup_steps = max(1, round(0.05 * plan.steps))
    plan.eval_every = max(1, plan.steps // 4)
    plan.estimates = {"ray_start": cost(plan, "ray_start") + cost(plan, "once"),
                      "palette": cost(plan, "palette_fixed") + plan.train_images * cost(plan, "palette_per_image")}
    for m in plan.pretrained:
        plan.estimates[f"pretrain {m.key}"] = pretrain_seconds(plan, m, plan.steps)
    for m in plan.models:
        plan.estimates[f"extract {m.key}"] = extract_seconds(plan, m, plan.probe_images, plan.test_images)
    for m in plan.models:
        plan.estimates[f"probe {m.key}"] = probe_seconds(plan, m, plan.probe_images, m.role == "larger AR")
    plan.estimates["report"] = cost(plan, "report")
    total = sum(plan.estimates.values()) + elapsed
    if total > plan.budget_s:
        plan.notes.append(f"estimated {total / 60:.1f} min, over the {plan.budget_s / 60:g}-minute budget")


# ---------------------------------------------------------------------------------------------- stage configs


def _tracking(plan: Plan) -> list[str]:
    return ["--tracking.tracking_uri", plan.tracking_uri, "--tracking.experiment", plan.experiment]


def palette_argv(plan: Plan) -> list[str]:
    return ["--name", "palette", "--output_dir", plan.out, "--data.path", plan.data, "--data.split", "train",
            "--data.max_images", str(plan.train_images), "--transform.resolution", str(plan.resolution),
            "--palette.sample_pixels", str(plan.palette_pixels), "--palette.max_iter", str(plan.palette_iters),
            *_tracking(plan)]


def palette_path(plan: Plan) -> str:
    return str(Path(plan.out) / "palette" / "palette.npy")


def pretrain_argv(plan: Plan, m: ModelSpec) -> list[str]:
    spe = plan.steps_per_epoch
    argv = ["--name", m.key, "--storage_path", str(Path(plan.out) / "train"), "--palette_path", palette_path(plan)]
    for s, part in (("train", "rest"), ("val", "holdout")):
        argv += [f"--{s}.path", plan.data, f"--{s}.split", "train", f"--{s}.max_images", str(plan.train_images),
                 f"--{s}.holdout", str(plan.holdout), f"--{s}.part", part]
    argv += ["--val_images", str(plan.val_images), "--transform.resolution", str(plan.resolution),
             "--model.size", m.size, "--model.resolution", str(plan.resolution), "--model.objective", m.objective,
             "--optim.global_batch", str(plan.global_batch), "--optim.lr", str(plan.lr),
             "--optim.warmup_epochs", repr(plan.warmup_steps / spe), "--max_steps", str(plan.steps),
             "--epochs", str(plan.epochs), "--eval_every", str(plan.eval_every),
             "--checkpoint.every_steps", str(plan.steps), "--completions", str(plan.completions),
             "--scaling.workers", str(plan.workers), "--deepspeed.micro_batch", str(plan.micro_batch)]
    if plan.mode == "gpu":
        argv += ["--deepspeed.preset", "S", "--deepspeed.precision", "bf16", "--scaling.use_gpu",
                 "--scaling.cpus_per_worker", "4"]
    else:
        argv += ["--deepspeed.preset", "cpu", "--deepspeed.zero_stage", "2", "--deepspeed.precision", "fp32"]
    return argv + _tracking(plan)


def run_dir(plan: Plan, key: str) -> str:
    return str(Path(plan.out) / "train" / key)


def extract_argv(plan: Plan, m: ModelSpec) -> list[str]:
    argv = ["--name", m.key, "--output_dir", str(Path(plan.out) / "features"),
            "--checkpoint", run_dir(plan, m.twin_of or m.key),
            "--train.path", plan.data, "--train.split", "train", "--train.max_images", str(plan.probe_images),
            "--holdout", str(plan.holdout), "--test.path", plan.data, "--test.split", "test",
            "--test.max_images", str(plan.test_images), "--transform.resolution", str(plan.resolution),
            "--pixels" if m.role == "larger AR" else "--no-pixels", "--log_features_max_mb", "0"]
    if not m.pretrained:
        argv += ["--random_init", "--seed", "0"]
    if plan.mode == "gpu":
        argv += ["--use_gpu", "--batch_size", "256", "--concurrency", "1", "--cpus_per_actor", "2"]
    else:  # two 1-thread replicas on the two cores; the rest of a CPU stays free for Ray Data's tokenizing
        argv += ["--batch_size", "64", "--concurrency", "2", "--cpus_per_actor", "0.5"]
    return argv + _tracking(plan)


def space_path(plan: Plan) -> Path:
    return Path(plan.out) / "probe_space.json"


def space(plan: Plan) -> dict:
    return {"_comment": "written by benchmarks/reproduce.py", "job": "probe_lbfgs",
            "params": {"layer": {"grid_search": "all"}, "C": {"grid_search": plan.c_grid}}}


def probe_argv(plan: Plan, m: ModelSpec) -> list[str]:
    return ["--name", m.key, "--output_dir", str(Path(plan.out) / "probe"),
            "--features", str(Path(plan.out) / "features" / m.key), "--protocol", "lbfgs",
            "--space", str(space_path(plan)), "--pixels" if m.role == "larger AR" else "--no-pixels",
            "--cpus_per_trial", "1", *_tracking(plan)]


def stage_configs(plan: Plan) -> list[tuple[str, str, list[str], object]]:
    """Every stage: (stage name, pipeline module, argv, parsed config)."""
    from igpt import cli
    from igpt.config import ExtractJobConfig, FitPaletteJobConfig, PretrainJobConfig, ProbeJobConfig

    stages = [("palette", "fit_palette", palette_argv(plan), FitPaletteJobConfig)]
    stages += [(f"pretrain {m.key}", "pretrain", pretrain_argv(plan, m), PretrainJobConfig) for m in plan.pretrained]
    stages += [(f"extract {m.key}", "extract", extract_argv(plan, m), ExtractJobConfig) for m in plan.models]
    stages += [(f"probe {m.key}", "probe", probe_argv(plan, m), ProbeJobConfig) for m in plan.models]
    return [(name, mod, argv, cli.parse(cls, argv, prog=f"python -m pipelines.{mod}"))
            for name, mod, argv, cls in stages]


def check_builds(plan: Plan, stages) -> list[str]:
    """What a dry run can build without running: DeepSpeed configs, models, data plans, the probe space."""
    import torch

    from igpt import deepspeed_config, sources, tune_space
    from igpt.config import PretrainJobConfig
    from igpt.model import IGPT

    lines = []
    for name, _, _, cfg in stages:
        if isinstance(cfg, PretrainJobConfig):
            ds, _ = deepspeed_config.build(cfg.deepspeed, cfg.optim, cfg.scaling.workers, cfg.scaling.use_gpu)
            with torch.device("meta"):
                n = IGPT(cfg.model).num_params()
            assert n == cfg.model.param_count()
            for spec in (cfg.train, cfg.val):
                sources.check(spec)
            lines.append(f"{name}: DeepSpeed ZeRO-{ds['zero_optimization']['stage']}, "
                         f"{'bf16' if ds.get('bf16', {}).get('enabled') else 'fp32'}, micro "
                         f"{ds['train_micro_batch_size_per_gpu']} x accum {ds['gradient_accumulation_steps']} x "
                         f"{cfg.scaling.workers} worker(s) = {ds['train_batch_size']}; model {n / 1e6:.2f}M params")
    tune_space.validate(space(plan), "probe space")
    return lines


# ---------------------------------------------------------------------------------------------- running


class Clock:
    def __init__(self, plan: Plan):
        self.t0 = time.perf_counter()
        self.plan = plan
        self.rows: list[tuple[str, float, float]] = []  # stage, planned, actual

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn):
        planned = self.plan.estimates.get(name, 0.0)
        print(f"\n=== {name} (planned {planned:.0f} s; {self.elapsed() / 60:.1f} of "
              f"{self.plan.budget_s / 60:g} min elapsed) ===", flush=True)
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        self.add(name, planned, dt)
        print(f"=== {name}: {dt:.0f} s (planned {planned:.0f} s); total {self.elapsed() / 60:.1f} min ===",
              flush=True)
        return out

    def add(self, name: str, planned: float, actual: float) -> None:
        self.rows.append((name, planned, actual))
        out = Path(self.plan.out)
        if out.exists():  # kept on disk, for --report_only after a failure
            (out / "timings.json").write_text(json.dumps(self.rows))


def init_ray(plan: Plan, verbose: bool) -> None:
    import ray

    from igpt.raysetup import configure_data

    env = {"DS_ACCELERATOR": "cpu"} if plan.mode == "cpu" else {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}
    os.environ.update(env)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env={"env_vars": env}, log_to_driver=verbose)
        else:
            ray.init(include_dashboard=False, log_to_driver=verbose, runtime_env={"env_vars": env})
    configure_data()
    ray.data.DataContext.get_current().enable_progress_bars = verbose


def execute(plan: Plan, clock: Clock, parent_id: str, args) -> dict:
    from mlflow.tracking import MlflowClient

    from igpt import cli
    from igpt.config import ExtractJobConfig, ProbeJobConfig
    from pipelines import extract, fit_palette, pretrain, probe

    client = MlflowClient(plan.tracking_uri)

    def tag(run_id: str | None) -> None:
        if run_id:
            client.set_tag(run_id, "igpt.reproduce_run_id", parent_id)

    stages = {name: cfg for name, _, _, cfg in stage_configs(plan)}
    clock.run("ray_start", lambda: init_ray(plan, args.verbose))
    res = {"palette": clock.run("palette", lambda: fit_palette.run(stages["palette"]))}
    tag(res["palette"]["run_id"])
    for m in plan.pretrained:
        s = clock.run(f"pretrain {m.key}", lambda m=m: pretrain.run(stages[f"pretrain {m.key}"]))
        tag(s["run_id"])
        res[f"pretrain {m.key}"] = s
    # re-plan extraction with the time actually left, so an overrun shrinks P and T rather than blowing the budget
    left = plan.budget_s * (1 - SPARE[plan.mode]) - clock.elapsed() - cost(plan, "report")
    before = (plan.probe_images, plan.test_images)
    fit_probe_images(plan, left)
    if (plan.probe_images, plan.test_images) != before:
        msg = (f"pretraining left {left / 60:.1f} min: probe images {before[0]:,} -> {plan.probe_images:,}, "
               f"test images {before[1]:,} -> {plan.test_images:,}")
        print(msg)
        plan.notes.append(msg)
        for m in plan.models:
            plan.estimates[f"extract {m.key}"] = extract_seconds(plan, m, plan.probe_images, plan.test_images)
            plan.estimates[f"probe {m.key}"] = probe_seconds(plan, m, plan.probe_images, m.role == "larger AR")
    for m in plan.models:
        cfg = cli.parse(ExtractJobConfig, extract_argv(plan, m))
        man = clock.run(f"extract {m.key}", lambda cfg=cfg: extract.run(cfg))
        tag(man["run_id"])
        res[f"extract {m.key}"] = man
    space_path(plan).write_text(json.dumps(space(plan), indent=2))
    for m in plan.models:
        cfg = cli.parse(ProbeJobConfig, probe_argv(plan, m))
        r = clock.run(f"probe {m.key}", lambda cfg=cfg: probe.run(cfg))
        tag(r["run_id"])
        res[f"probe {m.key}"] = r
    return res


# ---------------------------------------------------------------------------------------------- report


def ci95(p: float, n: int) -> float:
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def ci95_diff(p1: float, p2: float, n: int) -> float:
    return 1.96 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / max(n, 1))


def noise(d: float, ci: float, what: str = "") -> str:
    return f" ({what + ' ' if what else ''}within the 95% interval: noise at this size)" if abs(d) < ci else ""


def diff_text(p1: float, p2: float, n: int) -> str:
    return f"{pts(p1 - p2)} ± {100 * ci95_diff(p1, p2, n):.1f} pts"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def collect(plan: Plan, res: dict) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.tracking_uri)
    models = {}
    for m in plan.models:
        pr = res[f"probe {m.key}"]
        man = res[f"extract {m.key}"]
        row = {**asdict(m), "test_accuracy": pr["test_accuracy"], "test_images": pr["test_images"],
               "best_layer": int(pr["best"]["layer"]), "best_C": pr["best"]["C"],
               "val_accuracy_by_layer": {int(k): v for k, v in pr["val_accuracy_by_layer"].items()},
               "val_images": man["splits"]["val"]["images"], "train_images": man["splits"]["train"]["images"],
               "probe_run_id": pr.get("run_id")}
        row["best_val_accuracy"] = row["val_accuracy_by_layer"][row["best_layer"]]
        row["last_val_accuracy"] = row["val_accuracy_by_layer"][m.n_layer - 1]
        if m.pretrained:
            s = res[f"pretrain {m.key}"]
            hist = sorted((h.step, h.value) for h in client.get_metric_history(s["run_id"], "val/loss"))
            row.update(pretrain_run_id=s["run_id"], steps=s["total_steps"], val_loss_history=hist,
                       val_loss=hist[-1][1] if hist else float("nan"))
        models[m.key] = row
    px = res[f"probe {plan.model('larger AR').key}"]["pixels"]
    return {"models": models, "pixels": {"test_accuracy": px["test_accuracy"], "val_accuracy": px["val_accuracy"],
                                         "test_images": px["test_images"], "best_C": px["best"]["C"]}}


def findings(plan: Plan, r: dict) -> list[tuple[str, str, str, str]]:
    ms = r["models"]
    small, large = ms[plan.model("smaller AR").key], ms[plan.model("larger AR").key]
    bert, twin = ms[plan.model("BERT").key], ms[plan.model("random-init twin").key]
    px = r["pixels"]
    n = large["test_images"]
    rows = []

    # 1. pretrained vs random init and raw pixels
    parts, ok = [], True
    for what, other in (("the random-init twin", twin), ("raw pixels", px)):
        d = large["test_accuracy"] - other["test_accuracy"]
        ok &= d > 0
        parts.append(("above " if d > 0 else "not above ") + what
                     + noise(d, ci95_diff(large["test_accuracy"], other["test_accuracy"], n)))
    rows.append((
        "Does generative pretraining beat the random-init twin and raw pixels?",
        f"{large['key']} test {pct(large['test_accuracy'])} vs random-init twin {pct(twin['test_accuracy'])} "
        f"({diff_text(large['test_accuracy'], twin['test_accuracy'], n)}) vs raw pixels "
        f"{plan.resolution}x{plan.resolution} {pct(px['test_accuracy'])} "
        f"({diff_text(large['test_accuracy'], px['test_accuracy'], n)}); {n:,} test images",
        PAPER["pretrain"], f"{'agrees' if ok else 'disagrees'}: {'; '.join(parts)}"))

    # 2. best layer relative to depth: the paper's AR curve rises then falls, so the best layer is an interior
    # one (neither layer 0, the embeddings, nor the last) and the last layer is worse than it
    L = large["n_layer"]
    best, rel = large["best_layer"], (large["best_layer"] + 1) / L
    gap = large["best_val_accuracy"] - large["last_val_accuracy"]
    nv = large["val_images"]
    gap_noise = noise(gap, ci95_diff(large["best_val_accuracy"], large["last_val_accuracy"], nv))
    if best == L - 1:
        verdict = "disagrees: the best layer is the last one"
    elif best == 0:
        verdict = (f"partly: the last layer is worse by {100 * gap:.1f} pts{gap_noise}, but the best is layer 0 "
                   "(the embeddings): no rise with depth")
    else:
        verdict = f"agrees: best at an interior layer, the last layer worse by {100 * gap:.1f} pts{gap_noise}"
    others = "; ".join(f"{x['key']}: best {x['best_layer']} of {x['n_layer']} (depth "
                       f"{(x['best_layer'] + 1) / x['n_layer']:.2f}), last layer "
                       f"{pts(x['last_val_accuracy'] - x['best_val_accuracy'])} pts" for x in (small, bert))
    rows.append((
        "Where is the best probe layer relative to depth; is the last layer worse than the best?",
        f"{large['key']}: best layer {best} of {L} (relative depth {rel:.2f}), val {pct(large['best_val_accuracy'])}"
        f"; last layer ({L - 1}) val {pct(large['last_val_accuracy'])} ({pts(-gap)} pts; {nv:,} val images). "
        f"{others}", PAPER["depth"], verdict))

    # 3. scale
    dl = large["val_loss"] - small["val_loss"]
    da = large["test_accuracy"] - small["test_accuracy"]
    verdict = {(True, True): "agrees", (True, False): "partly: lower loss, but no better probe",
               (False, True): "partly: better probe, but no lower loss", (False, False): "disagrees"}[(dl < 0, da > 0)]
    verdict += noise(da, ci95_diff(large["test_accuracy"], small["test_accuracy"], n), "probe difference")
    rows.append((
        "Does the larger model reach lower validation loss and a better probe?",
        f"val loss {large['key']} ({large['params'] / 1e6:.2f}M) {large['val_loss']:.3f} vs {small['key']} "
        f"({small['params'] / 1e6:.2f}M) {small['val_loss']:.3f} nats/token ({dl / math.log(2):+.3f} bits/dim); "
        f"probe test {pct(large['test_accuracy'])} vs {pct(small['test_accuracy'])} "
        f"({diff_text(large['test_accuracy'], small['test_accuracy'], n)})",
        PAPER["scale"], verdict))

    # 4. AR vs BERT
    db = large["test_accuracy"] - bert["test_accuracy"]
    verdict = "agrees" if db > 0.01 else ("partly: AR ahead, by <= 1 pt" if db > 0 else "disagrees: BERT not behind")
    verdict += noise(db, ci95_diff(large["test_accuracy"], bert["test_accuracy"], n))
    rows.append((
        "Does AR probe better than BERT (paper: by >1 point on CIFAR-10)?",
        f"{large['key']} test {pct(large['test_accuracy'])} vs {bert['key']} {pct(bert['test_accuracy'])} "
        f"(5-mask modal vote): {diff_text(large['test_accuracy'], bert['test_accuracy'], n)}",
        PAPER["bert"], verdict))
    return rows


def plots(plan: Plan, r: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, m in r["models"].items():
        by = m["val_accuracy_by_layer"]
        xs = [(l + 1) / m["n_layer"] for l in sorted(by)]
        ax.plot(xs, [by[l] for l in sorted(by)], "o-" if m["pretrained"] else "o:",
                label=f"{key} ({m['n_layer']} layers)")
    ax.axhline(r["pixels"]["val_accuracy"], color="grey", ls="--",
               label=f"raw pixels {plan.resolution}x{plan.resolution}")
    ax.set_xlabel("relative depth (layer + 1) / layers")
    ax.set_ylabel("linear probe validation accuracy")
    ax.set_title("Probe accuracy by depth (best C per layer)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    a = folder / "val_accuracy_by_depth.png"
    fig.savefig(a, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, m in r["models"].items():
        if not m["pretrained"] or not m["val_loss_history"]:
            continue
        steps, vals = zip(*m["val_loss_history"])
        label = f"{key}" + (" (loss on masked positions)" if m["objective"] == "bert" else "")
        ax.plot([s * plan.global_batch for s in steps], [v / math.log(2) for v in vals],
                "s--" if m["objective"] == "bert" else "o-", label=label)
    ax.set_xlabel("training images seen (steps x global batch)")
    ax.set_ylabel("validation loss (bits/dim)")
    ax.set_title(f"Validation loss, {plan.heldout_images:,} held-out images ({plan.val_images} evaluated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    b = folder / "val_loss.png"
    fig.savefig(b, dpi=120)
    plt.close(fig)
    return [a, b]


def md_table(header: list[str], rows: list) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in esc])


def design_lines(plan: Plan) -> list[str]:
    dev = ("1 GPU, bf16, DeepSpeed preset S" if plan.mode == "gpu"
           else f"{plan.workers} Ray Train workers, DeepSpeed ZeRO-2 fp32 on the CPU")
    accum = plan.global_batch // (plan.micro_batch * plan.workers)
    lines = [
        f"- data: `{plan.data}`: the first {plan.train_images:,} CIFAR-10 training images; {plan.pretrain_images:,} "
        f"pretrained on, {plan.heldout_images:,} held out ({plan.holdout:.0%}, keyed hash); test split "
        f"{plan.test_total:,}",
        f"- resolution {plan.resolution}x{plan.resolution} ({plan.resolution**2} tokens): the 512-colour palette is "
        f"fit on the {plan.resolution}x{plan.resolution}-resized pixels ({plan.palette_pixels:,} sampled), the "
        f"models and the raw-pixel baseline use the same",
        "- models: " + "; ".join(f"{m.key} ({m.size}: {m.n_layer} layers, d {m.d_model}, {m.params / 1e6:.2f}M "
                                 f"params{', random init' if not m.pretrained else ''})" for m in plan.models),
        f"- pretraining, each model: {plan.steps} steps x {plan.global_batch} images = "
        f"{plan.steps * plan.global_batch:,} images ({plan.steps * plan.global_batch / plan.pretrain_images:.2f} "
        f"epochs), lr {plan.lr:g}, {plan.warmup_steps} warm-up steps then cosine to 0, Adam (0.9, 0.95); {dev}, "
        f"micro batch {plan.micro_batch} x accumulation {accum}; validation loss on {plan.val_images} held-out "
        f"images every {plan.eval_every} steps",
        f"- probes: features of the first {plan.probe_images:,} training images (train / val by the same hash) "
        f"and the first {plan.test_images:,} test images; L-BFGS logistic regression, every layer x C in "
        f"{plan.c_grid}, best (val) refit on train+val, scored once on test; BERT: 5 masks per image, modal vote",
        f"- budget {plan.budget_s / 60:g} min; steps sized from a {plan.calibrated} step time"
        + ("" if plan.steps_auto else " (overridden: --steps)"),
    ]
    return lines


def report(plan: Plan, r: dict, clock: Clock, parent_id: str) -> str:
    import torch

    rows = findings(plan, r)
    detail = []
    for key, m in r["models"].items():
        detail.append([key, m["role"], f"{m['n_layer']} / {m['d_model']}", f"{m['params'] / 1e6:.2f}M",
                       f"{m['steps']} x {plan.global_batch}" if m["pretrained"] else "–",
                       f"{m['val_loss']:.3f}" if m["pretrained"] else "–",
                       f"{m['best_layer']} ({(m['best_layer'] + 1) / m['n_layer']:.2f})",
                       pct(m["best_val_accuracy"]), pct(m["last_val_accuracy"]),
                       f"{pct(m['test_accuracy'])} ± {100 * ci95(m['test_accuracy'], m['test_images']):.1f}"])
    px = r["pixels"]
    detail.append([f"raw pixels {plan.resolution}x{plan.resolution}", "baseline", "–", "–", "–", "–", "–",
                   pct(px["val_accuracy"]), "–", f"{pct(px['test_accuracy'])} ± "
                   f"{100 * ci95(px['test_accuracy'], px['test_images']):.1f}"])
    timing = [[name, f"{planned:.0f}", f"{actual:.0f}"] for name, planned, actual in clock.rows]
    timing.append(["**total**", f"{sum(p for _, p, _ in clock.rows):.0f}", f"**{clock.elapsed():.0f}** "
                   f"({clock.elapsed() / 60:.1f} min of {plan.budget_s / 60:g})"])
    cal = "; ".join(f"{k}: {v['train_s'] * 1000:.0f} ms per micro-batch step, {v['fwd_s'] * 1000:.2f} ms per "
                    f"image forward" for k, v in plan.calibration.items() if not k.endswith("-random"))
    if plan.mode == "cpu":
        cal += f"; load probe {plan.slowdown:.1f}x an idle CI-box core (fixed allowances scaled by it)"
    md = [
        f"# iGPT findings at {'smoke-test' if plan.smoke else 'CPU' if plan.mode == 'cpu' else 'GPU'} scale",
        "",
        f"`{' '.join(['python benchmarks/reproduce.py', *plan.argv])}` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC, {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, MLflow parent run "
        f"`{parent_id}` (tag igpt.job=reproduce) in `{plan.tracking_uri}`",
        "",
        md_table(["Question", "This run", "Paper", "Verdict"], rows),
        "",
        "## Design",
        "",
        *design_lines(plan),
        "",
        "## Per model",
        "",
        md_table(["model", "role", "layers / d", "params", "steps x batch", "val loss (nats/token)",
                  "best layer (rel. depth)", "best val acc", "last-layer val acc", "test acc (95%)"], detail),
        "",
        "Layer l's features are the sequence-mean of block l's input after its first norm (layer 0: the "
        "embeddings); relative depth = (l + 1) / layers. BERT's validation loss is on masked positions only "
        "and is not comparable with the AR losses. Intervals: normal approximation, unpaired (conservative).",
        "",
        "![probe accuracy by depth](plots/val_accuracy_by_depth.png) ![validation loss](plots/val_loss.png)",
        "",
        "## Time per stage (seconds)",
        "",
        md_table(["stage", "planned", "actual"], timing),
        "",
        f"Calibration ({plan.calibrated}): {cal}.",
    ]
    if plan.notes:
        md += ["", "Notes:", *[f"- {n}" for n in plan.notes]]
    return "\n".join(md) + "\n"


def print_findings(plan: Plan, r: dict) -> None:
    rows = findings(plan, r)
    print("\n" + "=" * 100)
    for q, numbers, paper, verdict in rows:
        print(f"{q}\n    this run: {numbers}\n    paper:    {paper}\n    verdict:  {verdict}\n")


# ---------------------------------------------------------------------------------------------- main


def print_plan(plan: Plan, stages, builds: list[str]) -> None:
    print(f"iGPT reproduction plan ({'smoke, ' if plan.smoke else ''}{plan.mode}, budget "
          f"{plan.budget_s / 60:g} min) -> {plan.out}")
    for line in design_lines(plan):
        print(line)
    cal = ", ".join(f"{k} {v['train_s'] * 1000:.0f} ms/step {v['fwd_s'] * 1000:.2f} ms/image"
                    for k, v in plan.calibration.items() if not k.endswith("-random"))
    print(f"- calibration ({plan.calibrated}; one micro-batch of {plan.micro_batch}): {cal}")
    if plan.mode == "cpu":
        print(f"- load: the load probe ran {plan.slowdown:.1f}x slower than on an idle CI-box core; fixed "
              f"allowances are scaled by that")
    total = sum(plan.estimates.values())
    print(f"- estimated seconds per stage (total {total:.0f} s = {total / 60:.1f} min):")
    for k, v in plan.estimates.items():
        print(f"    {k:<28}{v:8.0f}")
    for n in plan.notes:
        print(f"- note: {n}")
    print("- builds:")
    for line in builds:
        print(f"    {line}")
    print("- the stages as commands:")
    for _, mod, argv, _ in stages:
        print(f"    python -m pipelines.{mod} {' '.join(argv)}")


def plan_from_json(path: Path) -> Plan:
    data = json.loads(path.read_text())
    data["models"] = [ModelSpec(**m) for m in data["models"]]
    return Plan(**data)


def results_from_disk(plan: Plan) -> dict:
    """What execute() returns, read back from the output folder (every job writes its summary there)."""
    out, res = Path(plan.out), {}
    for m in plan.pretrained:
        res[f"pretrain {m.key}"] = json.loads((out / "train" / m.key / "summary.json").read_text())
    for m in plan.models:
        res[f"extract {m.key}"] = json.loads((out / "features" / m.key / "manifest.json").read_text())
        res[f"probe {m.key}"] = json.loads((out / "probe" / m.key / "result.json").read_text())
    return res


def finish(plan: Plan, res: dict, clock: Clock, parent: str) -> tuple[dict, str]:
    """Results, plots, reproduce.md and results.json; all of it onto the MLflow parent run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    out = Path(plan.out)
    client = MlflowClient(plan.tracking_uri)
    t = time.perf_counter()
    r = collect(plan, res)
    figs = plots(plan, r, out / "plots")
    clock.add("report", plan.estimates.get("report", 0.0), time.perf_counter() - t)
    r["timings"] = {name: {"planned": p, "actual": a} for name, p, a in clock.rows}
    r["findings"] = [dict(zip(("question", "numbers", "paper", "verdict"), row)) for row in findings(plan, r)]
    md = report(plan, r, clock, parent)
    (out / "reproduce.md").write_text(md)
    (out / "results.json").write_text(json.dumps(r, indent=2, default=str))
    for f in ("reproduce.md", "results.json", "plan.json"):
        client.log_artifact(parent, str(out / f))
    for f in figs:
        client.log_artifact(parent, str(f), "plots")
    ms, now = [], int(time.time() * 1000)
    for key, m in r["models"].items():
        ms.append(Metric(f"test_accuracy/{key}", m["test_accuracy"], now, 0))
        ms.append(Metric(f"best_layer_relative/{key}", (m["best_layer"] + 1) / m["n_layer"], now, 0))
        if m["pretrained"]:
            ms.append(Metric(f"val_loss/{key}", m["val_loss"], now, 0))
    ms.append(Metric("test_accuracy/pixels", r["pixels"]["test_accuracy"], now, 0))
    ms.append(Metric("seconds/total", clock.elapsed(), now, 0))
    ms += [Metric("seconds/" + re.sub(r"[^A-Za-z0-9_.-]+", "_", n), a, now, 0) for n, _, a in clock.rows]
    client.log_batch(parent, metrics=ms)
    return r, md


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.report_only:
        return report_only(args)
    plan = make_plan(args)
    plan.argv = list(argv)
    out = Path(plan.out)
    if not Path(plan.data).exists():
        raise SystemExit(f"no data at {plan.data} (--data or $IGPT_CIFAR10)")
    if not args.dry_run and out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{out} is not empty; pass --overwrite or another --output_dir")
        if not (out / "plan.json").exists():
            raise SystemExit(f"{out} holds no plan.json of an earlier run: not deleting it; choose another folder")
        shutil.rmtree(out)
    print(f"calibrating ({'FLOP estimate' if args.no_calibrate else 'measuring a few steps of each model'}) ...",
          flush=True)
    calibrate(plan, measure=not args.no_calibrate)
    size(plan, elapsed=time.perf_counter() - t_start)
    stages = stage_configs(plan)
    builds = check_builds(plan, stages)
    print_plan(plan, stages, builds)
    if args.dry_run:
        print("\ndry run: every config parsed and built; nothing run")
        return

    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from igpt.tracking import end_status, ensure_experiment, stop_on_sigterm

    stop_on_sigterm()
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(asdict(plan), indent=2, default=str))
    exp_id = ensure_experiment(plan.tracking_uri, plan.experiment, out / "mlartifacts")
    client = MlflowClient(plan.tracking_uri)
    name = args.name or "reproduce" + ("-smoke" if plan.smoke else "-gpu" if plan.mode == "gpu" else "")
    parent = client.create_run(exp_id, run_name=name, tags={"igpt.job": "reproduce", "igpt.mode": plan.mode,
                                                            "igpt.smoke": str(plan.smoke)}).info.run_id
    (out / "parent_run_id").write_text(parent)
    params = {"mode": plan.mode, "smoke": plan.smoke, "budget_minutes": plan.budget_s / 60, "data": plan.data,
              "resolution": plan.resolution, "train_images": plan.train_images, "holdout": plan.holdout,
              "probe_images": plan.probe_images, "test_images": plan.test_images, "steps": plan.steps,
              "global_batch": plan.global_batch, "lr": plan.lr, "models": ",".join(m.key for m in plan.models),
              "calibrated": plan.calibrated, "slowdown": round(plan.slowdown, 2), "argv": " ".join(argv)[:500]}
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifact(parent, str(out / "plan.json"))
    clock = Clock(plan)
    clock.t0 = t_start
    clock.add("calibrate + plan", 0.0, time.perf_counter() - t_start)
    try:
        res = execute(plan, clock, parent, args)
        (out / "plan.json").write_text(json.dumps(asdict(plan), indent=2, default=str))  # P, T as run
        r, md = finish(plan, res, clock, parent)
    except BaseException as e:
        client.set_terminated(parent, end_status(e))
        print(f"\nfailed after {clock.elapsed() / 60:.1f} min; MLflow parent run {parent} ends {end_status(e)}")
        raise
    client.set_terminated(parent, "FINISHED")
    done(plan, r, md, parent, clock)


def done(plan: Plan, r: dict, md: str, parent: str, clock: Clock) -> None:
    print_findings(plan, r)
    print(md)
    out = Path(plan.out)
    print(f"written: {out / 'reproduce.md'} (and plots/, results.json); MLflow parent run {parent} "
          f"(igpt.job=reproduce) in {plan.tracking_uri}")
    print(f"total {clock.elapsed() / 60:.1f} min of a {plan.budget_s / 60:g}-minute budget")


def report_only(args) -> None:
    """Rebuild the report of a run in --output_dir from its files (after a failure in the last step, say)."""
    from mlflow.tracking import MlflowClient

    if not args.output_dir:
        raise SystemExit("--report_only needs --output_dir")
    out = Path(args.output_dir).resolve()
    plan = plan_from_json(out / "plan.json")
    parent = (out / "parent_run_id").read_text().strip()
    clock = Clock(plan)
    timings = out / "timings.json"
    rows = [tuple(x) for x in json.loads(timings.read_text())] if timings.exists() else []
    clock.rows = [x for x in rows if x[0] != "report"]
    clock.t0 = time.perf_counter() - sum(a for _, _, a in clock.rows)
    r, md = finish(plan, results_from_disk(plan), clock, parent)
    MlflowClient(plan.tracking_uri).set_terminated(parent, "FINISHED")
    done(plan, r, md, parent, clock)


if __name__ == "__main__":
    main()
