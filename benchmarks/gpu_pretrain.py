"""GPU efficiency check for a lent device, in one process (world size 1), on random tokens; one call, < 10 minutes.

    python benchmarks/gpu_pretrain.py          # needs a CUDA GPU (H100/H200); prints every figure it measures
    python benchmarks/gpu_pretrain.py --dry    # no GPU needed: the runs it would make, their plans and time

What it prints, one line per run, in this order (a run whose estimated time would take the whole past
``--budget`` seconds is skipped, with a line saying so; the total elapsed time comes last):

1. iGPT-S, M and L at 32x32, bf16, ZeRO-2, the recipe's global batch of 128 images per optimizer step (one
   process: 128 / micro batch accumulation steps), at the micro batch ``igpt plan`` picks to fill the card
   (igpt.train.plan.best_micro_batch: 90% of its memory), halved until it runs if it runs out of memory:
   S eager, S compiled (torch.compile: igpt.train.compile), L, M. A run's
   label: size, resolution, ZeRO stage, micro batch, accumulation steps, eager or compiled. Its figures:
   tokens/s; MFU against the card's dense bf16 peak (989 TFLOP/s on H100/H200:
   igpt.hw.GPU_PEAK_BF16) from the model FLOPs of ModelConfig.train_flops_per_token (3x the
   forward, no recomputation counted), beside the goal (S >= 35%, L >= 45%); peak GPU memory while training,
   beside the plan's estimate; step time; seconds spent building the engine, warming up (compilation happens
   there) and in the timed window.
2. iGPT-XL (6.8B) at 64x64 with ZeRO-3, the optimizer offloaded to the host (DeepSpeed's CPU Adam) and
   activation checkpointing, micro batch 1, a few steps: step time and peak GPU memory, beside the plan.
   Parameters stay on the GPU: with parameter offload too, ZeRO-3 keeps ~18 bytes per parameter on the host
   (DeepSpeed's estimator: ~180 GB with its 1.5x buffer for 6.8B), more than the lent 128 GiB machine has; the
   optimizer states alone are 16 bytes per parameter (~109 GB), not pinned, so they fit.
3. If time remains: S, L and M eager at half the micro batch of step 1, to show whether filling the memory
   was the faster choice.

Each run: a fixed number of warm-up then timed optimizer steps (below, per size, sized to a few seconds at the
goal MFU), with the GPU synchronized only before and after the timed window: no per-step ``.item()``.
The model is in bf16 as DeepSpeed's bf16 config makes it (it casts the module; no autocast), and the step is
the training loop's: ``engine(**model.objective_inputs(x))``, ``engine.backward``, ``engine.step``.
Not run in CI.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time
from dataclasses import dataclass, field, replace

import torch

GiB = 2**30
GOAL_MFU = {"S": 0.35, "L": 0.45}
GLOBAL_BATCH = 128  # the S/M/L recipe's (cluster/recipes.json)
# timed optimizer steps of 128 images after the warm-up: a few seconds each at the goal MFU
STEPS = {"S": (3, 20), "M": (2, 8), "L": (2, 5)}  # size: (warm-up, timed)
ENGINE_S = {"S": 10, "M": 15, "L": 25, "XL": 160}  # seconds to build the engine, for the time budget
COMPILE_S = 90  # torch.compile of S's forward and backward, for the time budget


@dataclass
class Run:
    size: str
    micro: int
    global_batch: int
    ds: dict = field(default_factory=lambda: {"zero_stage": 2, "precision": "bf16"})  # DeepSpeedConfig fields
    ckpt: bool = False
    compiled: bool = False
    warmup: int = 2
    steps: int = 10
    on_gpu_init: bool = True  # build the model on the GPU (fast init); XL is built on the host, as before
    pin: bool = True
    half: bool = False  # at half the micro batch the size's eager run ran at
    note: str = ""

    @property
    def label(self) -> str:
        from igpt.model.config import ModelConfig

        res = ModelConfig.from_name(self.size).resolution
        return (f"{self.size:<2} {res}x{res} z{self.ds['zero_stage']} mb{self.micro:<3} "
                f"x{self.global_batch // self.micro:<3} {'compiled' if self.compiled else 'eager':<8}")


# ---- what to run --------------------------------------------------------------------------------------------
def plan_input(run: Run, gpu_mem_gib: float):
    from igpt.model.config import ModelConfig
    from igpt.train.plan import PlanInput

    cfg = ModelConfig.from_name(run.size, activation_checkpointing=run.ckpt)
    return PlanInput(cfg, gpus=1, gpu_mem_gib=gpu_mem_gib, zero_stage=run.ds["zero_stage"],
                     offload_optimizer=bool(run.ds.get("offload_optimizer")),
                     offload_params=bool(run.ds.get("offload_params")), micro_batch=run.micro,
                     activation_checkpointing=run.ckpt, global_batch=run.global_batch)


def planned_runs(gpu_mem_gib: float) -> tuple[list[Run], list[Run]]:
    """(runs in priority order, runs if time remains): S eager and compiled, L and M at the plan's best micro
    batch, then XL; then S, L and M at half that micro batch, which shows whether filling the memory pays."""
    from igpt.model.config import ModelConfig
    from igpt.train.plan import PlanInput, best_micro_batch

    def at_best(size: str, **kw) -> Run:
        p = PlanInput(ModelConfig.from_name(size), gpus=1, gpu_mem_gib=gpu_mem_gib, zero_stage=2,
                      global_batch=GLOBAL_BATCH)
        micro = best_micro_batch(p) or 1
        warmup, steps = STEPS[size]
        return Run(size, micro, GLOBAL_BATCH, warmup=warmup, steps=steps, note="plan's best", **kw)

    def half(r: Run) -> list[Run]:
        return [replace(r, micro=r.micro // 2, half=True, note="half the plan's")] if r.micro > 1 else []

    s, l, m = at_best("S"), at_best("L"), at_best("M")
    xl = Run("XL", 1, 1, ds={"zero_stage": 3, "precision": "bf16", "offload_optimizer": True,
                             "offload_params": False},
             ckpt=True, warmup=1, steps=3, on_gpu_init=False, pin=False, note="ZeRO-3 + optimizer offload")
    return [s, replace(s, compiled=True), l, m, xl], [*half(s), *half(l), *half(m)]


def estimate_s(run: Run, peak_flops: float, mfu: float = 0.25) -> float:
    """Seconds a run should take (engine, compilation, warm-up and timed steps at ``mfu``), for the budget."""
    from igpt.model.config import ModelConfig

    cfg = ModelConfig.from_name(run.size)
    step = run.global_batch * cfg.n_ctx * cfg.train_flops_per_token() / (peak_flops * mfu)
    if run.size == "XL":
        step = 15.0  # host-side Adam on 6.8B parameters dominates (13.5 s measured on an H100)
    return ENGINE_S[run.size] + (COMPILE_S if run.compiled else 0) + (run.warmup + run.steps) * step


# ---- measuring ----------------------------------------------------------------------------------------------
def init_single_process() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        # DeepSpeed's op builder cannot parse an image's "9.0a" architecture: name the card's own
        major, minor = torch.cuda.get_device_capability()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")


def optimizer_steps(engine, inputs: dict, micro_steps: int) -> torch.Tensor:
    """The training loop's step, ``micro_steps`` times; DeepSpeed steps the optimizer every accumulation
    boundary. Returns the last loss, still on the GPU: nothing here waits for the device."""
    loss = None
    for _ in range(micro_steps):
        loss = engine(**inputs)
        engine.backward(loss)
        engine.step()
    return loss


def measure(run: Run, gpu_mem_gib: float) -> dict:
    engine, model, init_s = build_engine(run)
    try:
        return time_steps(engine, model, run, gpu_mem_gib, init_s)
    finally:
        engine.destroy()  # its optimizer's buffers; the caller frees the rest once nothing refers to them


def build_engine(run: Run):
    import deepspeed

    from igpt.config import DeepSpeedConfig, OptimConfig
    from igpt.model import IGPT, ModelConfig
    from igpt.train import deepspeed_config
    from igpt.train.compile import compile_model

    cfg = ModelConfig.from_name(run.size, activation_checkpointing=run.ckpt)
    conf, _ = deepspeed_config.build(DeepSpeedConfig(micro_batch=run.micro, **run.ds),
                                     OptimConfig(lr=1e-4, global_batch=run.global_batch), world_size=1, on_gpu=True)
    if not run.pin and "offload_optimizer" in conf["zero_optimization"]:
        conf["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    t0 = time.perf_counter()
    with torch.device("cuda" if run.on_gpu_init else "cpu"):
        model = IGPT(cfg)
    if run.compiled:
        compile_model(model)  # before DeepSpeed wraps it, as the training loop does
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=conf)
    return engine, model, time.perf_counter() - t0


def time_steps(engine, model, run: Run, gpu_mem_gib: float, init_s: float) -> dict:
    from igpt.train.plan import plan
    from igpt.train.train_loop import device_peak_flops

    cfg = model.cfg
    torch.cuda.reset_peak_memory_stats()  # from here: the training peak (states + activations)
    x = torch.randint(0, cfg.n_colors, (run.micro, cfg.n_ctx), device=engine.device)
    inputs = model.objective_inputs(x)
    accum = run.global_batch // run.micro

    t1 = time.perf_counter()
    optimizer_steps(engine, inputs, run.warmup * accum)  # allocation, kernel choice, compilation
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    loss = optimizer_steps(engine, inputs, run.steps * accum)
    torch.cuda.synchronize()
    timed_s = time.perf_counter() - t2

    step_s = timed_s / run.steps
    tok_s = run.global_batch * cfg.n_ctx / step_s
    peak, _ = device_peak_flops(True)
    return {"step_s": step_s, "tokens_per_s": tok_s, "mfu": tok_s * cfg.train_flops_per_token() / peak,
            "peak_GiB": torch.cuda.max_memory_allocated() / GiB,
            "plan_GiB": plan(plan_input(run, gpu_mem_gib)).total / GiB, "loss": loss.item(),
            "init_s": init_s, "warmup_s": t2 - t1, "timed_s": timed_s}


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def measure_or_halve(run: Run, gpu_mem_gib: float) -> tuple[Run, dict | str]:
    """Measure ``run``; out of memory (the plan underestimated), halve its micro batch and retry."""
    while True:
        try:
            result = measure(run, gpu_mem_gib)
        except torch.cuda.OutOfMemoryError:
            result = None
        free_gpu()  # after the except block, whose traceback held the failed run's tensors
        if result is not None:
            return run, result
        if run.micro == 1:
            return run, "out of memory at micro batch 1"
        print(f"{run.label}: out of memory; halving the micro batch", flush=True)
        run = replace(run, micro=run.micro // 2, note=f"{run.note}; mb{run.micro} ran out of memory")


def report(run: Run, r: dict | str) -> str:
    if isinstance(r, str):
        return f"{run.label}: {r}"
    goal = GOAL_MFU.get(run.size)
    verdict = "" if run.size == "XL" or goal is None else \
        f" (goal >= {100 * goal:.0f}%: {'met' if r['mfu'] >= goal else 'NOT met'})"
    return (f"{run.label}: {r['tokens_per_s']:>9,.0f} tokens/s  MFU {100 * r['mfu']:5.1f}%{verdict}  "
            f"peak {r['peak_GiB']:5.1f} GiB (plan {r['plan_GiB']:5.1f})  step {r['step_s']:.3f} s  "
            f"loss {r['loss']:.3f}  [engine {r['init_s']:.0f} s, warm-up {run.warmup} steps {r['warmup_s']:.0f} s, "
            f"{run.steps} steps {r['timed_s']:.1f} s; {run.note}]")


# ---- main ---------------------------------------------------------------------------------------------------
def dry(gpu_mem_gib: float, budget: float) -> None:
    """The runs, their plans and time estimates, without touching CUDA."""
    from igpt.hw import GPU_PEAK_BF16
    from igpt.train.plan import plan

    runs, extra = planned_runs(gpu_mem_gib)
    peak, total = GPU_PEAK_BF16["H100"], 0.0
    print(f"dry run: {gpu_mem_gib:.1f} GiB per GPU, peak {peak / 1e12:.0f} TFLOP/s, budget {budget:.0f} s")
    for kind, group in (("run", runs), ("if time remains", extra)):
        for run in group:
            est = estimate_s(run, peak)
            total += est
            goal = GOAL_MFU.get(run.size)
            speed = "host Adam bound" if run.size == "XL" else "at 25% MFU"
            print(f"  {kind:<15} {run.label}: plan {plan(plan_input(run, gpu_mem_gib)).total / GiB:5.1f} GiB, "
                  f"{run.warmup} + {run.steps} steps, ~{est:.0f} s {speed}"
                  + (f", goal MFU {100 * goal:.0f}%" if goal else ""))
    print(f"  all runs ~{total:.0f} s, before the process start")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="print the planned runs without a GPU")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for all runs; later ones are skipped")
    ap.add_argument("--gpu-mem", type=float, default=None,
                    help="GiB per GPU for the plan (default: the device's; 80 in --dry without one)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    has_gpu = torch.cuda.is_available()
    gpu_mem = args.gpu_mem or (torch.cuda.get_device_properties(0).total_memory / GiB if has_gpu else 80.0)
    if args.dry:
        dry(gpu_mem, args.budget)
        return
    assert has_gpu, "needs a CUDA GPU (--dry prints the plan without one)"
    from igpt.train.train_loop import device_peak_flops

    peak, note = device_peak_flops(True)
    print(f"{torch.cuda.get_device_name()}, {gpu_mem:.1f} GiB, torch {torch.__version__}; MFU against {note}",
          flush=True)
    init_single_process()
    runs, extra = planned_runs(gpu_mem)
    ran: dict[str, int] = {}  # size: the micro batch its eager run ran at (lower than planned after an OOM)
    for run in [*runs, *extra]:
        if run.compiled and run.size in ran:  # compared with eager at the same micro batch
            run = replace(run, micro=ran[run.size])
        if run.half and run.size in ran:
            if ran[run.size] == 1:
                continue
            run = replace(run, micro=ran[run.size] // 2, note=f"half of mb{ran[run.size]}")
        elapsed = time.perf_counter() - start
        if elapsed + estimate_s(run, peak) > args.budget:
            print(f"{run.label}: skipped, ~{estimate_s(run, peak):.0f} s would pass the {args.budget:.0f} s budget "
                  f"at {elapsed:.0f} s", flush=True)
            continue
        run, r = measure_or_halve(run, gpu_mem)
        if not run.compiled and not run.half and isinstance(r, dict):
            ran[run.size] = run.micro
        print(report(run, r), f"  (at {time.perf_counter() - start:.0f} s)", flush=True)
    print(f"total elapsed {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
