"""``igpt``: small commands around the library. The jobs themselves live in ``pipelines/``."""

from __future__ import annotations

import argparse

from igpt.config import MODEL_SIZES, PAPER_PARAMS_M, ModelConfig


def sizes(resolution: int | None) -> str:
    rows = ["size   layers  d_model  heads  IR  params (M)  paper (M)  diff"]
    for name in MODEL_SIZES:
        cfg = ModelConfig.from_name(name, resolution=resolution)
        p = cfg.param_count() / 1e6
        paper = PAPER_PARAMS_M.get(name)
        ref = f"{paper:>9,}  {100 * (p - paper) / paper:+.2f}%" if paper else f"{'-':>9}"
        rows.append(f"{name:<6} {cfg.n_layer:>6}  {cfg.d_model:>7}  {cfg.n_head:>5}  {cfg.resolution:>2}  "
                    f"{p:>10,.1f}  {ref}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="igpt")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sizes", help="the named model sizes and their parameter counts against the paper")
    p.add_argument("--resolution", type=int, default=None, help="override each size's input resolution")
    p = sub.add_parser("plan", help="per-GPU memory of model states and activations, and whether it fits")
    p.add_argument("--size", default="all", help="a model size, or 'all' for S, M, L and XL")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the data-parallel group")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU, GiB")
    p.add_argument("--zero", type=int, default=None, help="ZeRO stage 0-3 (default: compare 2 and 3)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-params", action="store_true")
    p.add_argument("--global-batch", type=int, default=None, help="default: the paper's 128 (64 for XL)")
    p.add_argument("--micro-batch", type=int, default=None, help="per GPU; default: global batch / GPUs")
    p.add_argument("--activation-checkpointing", action="store_true", help="(default: compare off and on)")
    args = parser.parse_args(argv)
    if args.cmd == "sizes":
        print(sizes(args.resolution))
    elif args.cmd == "plan":
        print(plan_table(args))


def plan_table(args) -> str:
    from igpt.plan import PlanInput, table

    rows = []
    for name in (["S", "M", "L", "XL"] if args.size == "all" else [args.size]):
        cfg = ModelConfig.from_name(name, resolution=args.resolution)
        global_batch = args.global_batch or (64 if name == "XL" else 128)
        micro = args.micro_batch or max(1, global_batch // args.gpus)
        for stage in [args.zero] if args.zero is not None else [2, 3]:
            for ckpt in [True] if args.activation_checkpointing else [False, True]:
                p = PlanInput(cfg, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, zero_stage=stage,
                              precision=args.precision, offload_optimizer=args.offload_optimizer,
                              offload_params=args.offload_params, micro_batch=micro, activation_checkpointing=ckpt)
                label = f"{name} IR{cfg.resolution} z{stage} mb{micro}{' ckpt' if ckpt else ''}"
                label += " offl-opt" if args.offload_optimizer else ""
                label += " offl-par" if args.offload_params else ""
                rows.append((label, p))
    return f"{args.gpus} GPUs x {args.gpu_mem:g} GiB, {args.precision}\n" + table(rows)


if __name__ == "__main__":
    main()
