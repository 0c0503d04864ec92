"""CPU training-step throughput of our model against transformers' ImageGPT at the same shape, one run.

    .venv/bin/python benchmarks/train_step.py [--layers 4 --d 128 --heads 4 --res 16 --batch 32 --steps 20]

Both: fp32, AdamW, dropout off, AR loss on the same random tokens, same thread count; the first 3 steps are
warm-up and not timed. Prints tokens/s side by side (the field notes measured HF at ~3,068 tokens/s for
4 layers, d 128, 256 tokens, batch 32 on this machine).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from igpt.config import ModelConfig
from igpt.model import IGPT


def timed(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--res", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(size="debug", n_layer=args.layers, d_model=args.d, n_head=args.heads, resolution=args.res)
    x = torch.randint(0, 512, (args.batch, cfg.n_ctx))
    tokens = args.batch * cfg.n_ctx

    ours = IGPT(cfg).train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)

    def ours_step():
        loss = ours.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(
        vocab_size=513, n_positions=cfg.n_ctx, n_embd=args.d, n_layer=args.layers, n_head=args.heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    ids = ours.ar_inputs(x)

    def hf_step():
        logits = hf(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), x.reshape(-1))
        hf_opt.zero_grad(set_to_none=True)
        loss.backward()
        hf_opt.step()

    t_hf = timed(hf_step, args.steps)
    t_ours = timed(ours_step, args.steps)
    print(f"shape: {args.layers} layers, d {args.d}, {args.heads} heads, {cfg.n_ctx} tokens, batch {args.batch}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  transformers ImageGPT: {tokens / t_hf:>9,.0f} tokens/s")
    print(f"  igpt (SDPA):           {tokens / t_ours:>9,.0f} tokens/s   -> {t_hf / t_ours:.1f}x")


if __name__ == "__main__":
    main()
