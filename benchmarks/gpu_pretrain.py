"""GPU checks for a lent device, in one process (world size 1), on random tokens; one call, < 10 minutes.

    python benchmarks/gpu_pretrain.py            # needs a CUDA GPU; prints every figure it measures

1. iGPT-S at 32x32 in bf16 with ZeRO-2 for 300 steps (micro batch 16, no accumulation): tokens/s and MFU
   against the card's dense bf16 peak (igpt.train.train_loop.GPU_PEAK_BF16).
2. iGPT-XL (6.8B) with ZeRO-3, the optimizer offloaded to the host (DeepSpeed's CPU Adam) and activation
   checkpointing, micro batch 1, a few steps: peak GPU memory and step time, beside `igpt plan`'s estimate.
   Parameters stay on the GPU: with parameter offload too, ZeRO-3 keeps ~18 bytes per parameter on the host
   (DeepSpeed's estimator: ~180 GB with its 1.5x buffer for 6.8B), more than the lent 128 GiB machine has; the
   optimizer states alone are 16 bytes per parameter (~109 GB), not pinned, so they fit.
Not run in CI.
"""

from __future__ import annotations

import os
import socket
import time

import torch


def init_single_process() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")


def run(size: str, preset_overrides: dict, micro: int, steps: int, warmup: int = 5, pin: bool = True) -> dict:
    import deepspeed

    from igpt.config import DeepSpeedConfig, ModelConfig, OptimConfig
    from igpt.model import IGPT
    from igpt.train import deepspeed_config
    from igpt.train.train_loop import device_peak_flops

    cfg = ModelConfig.from_name(size, activation_checkpointing=preset_overrides.pop("ckpt", False))
    conf, _ = deepspeed_config.build(DeepSpeedConfig(micro_batch=micro, **preset_overrides),
                                     OptimConfig(lr=1e-4, global_batch=micro), world_size=1, on_gpu=True)
    if not pin and "offload_optimizer" in conf["zero_optimization"]:
        conf["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    t0 = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    model = IGPT(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=conf)
    print(f"  {size}: engine ready in {time.perf_counter() - t0:.0f} s", flush=True)
    x = torch.randint(0, 512, (micro, cfg.n_ctx), device=engine.device)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = engine.module.loss(x)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = sum(times) / len(times)
    tok_s = micro * cfg.n_ctx / step_s
    peak, note = device_peak_flops(True)
    return {"size": size, "params_M": cfg.param_count() / 1e6, "step_s": step_s, "tokens_per_s": tok_s,
            "mfu": tok_s * cfg.train_flops_per_token() / peak,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "peak_note": note, "loss": loss.item()}


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(torch.cuda.get_device_name(), torch.__version__)
    init_single_process()
    s = run("S", {"zero_stage": 2, "precision": "bf16"}, micro=16, steps=300)
    print(f"iGPT-S 32x32 bf16 ZeRO-2, micro 16, 300 steps: {s['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * s['mfu']:.1f}% ({s['peak_note']}), step {1000 * s['step_s']:.1f} ms, "
          f"peak {s['peak_mem_GiB']:.1f} GiB, loss {s['loss']:.3f}")
    from igpt.config import ModelConfig
    from igpt.train.plan import PlanInput, plan

    xl = run("XL", {"zero_stage": 3, "precision": "bf16", "offload_optimizer": True, "offload_params": False,
                    "ckpt": True}, micro=1, steps=3, warmup=1, pin=False)
    est = plan(PlanInput(ModelConfig.from_name("XL", activation_checkpointing=True), gpus=1, zero_stage=3,
                         offload_optimizer=True, offload_params=False, micro_batch=1, activation_checkpointing=True))
    print(f"iGPT-XL 64x64 bf16 ZeRO-3 + optimizer offload + checkpointing, micro 1: step {xl['step_s']:.1f} s, "
          f"peak {xl['peak_mem_GiB']:.1f} GiB (igpt plan: {est.total / 2**30:.1f} GiB), loss {xl['loss']:.3f}")


if __name__ == "__main__":
    main()
