"""Time to sample whole images with the KV cache against without it (each pixel re-running the whole prefix).

    .venv/bin/python benchmarks/sampling.py [--size tiny --res 16 --n 8 --temperature 1.0 --top_k 0 --device cpu]

The default resolution is 16 (256 tokens) so the baseline takes seconds: without the cache, pixel i re-runs i
positions through every block, so an image costs ~T^2/2 position-steps (and ~T^3/3 attention scores) against
T with it; at ``--res 32`` (1,024 tokens) the baseline takes many minutes on 2 CPU cores.
On a GPU a small model is bound by kernel launches and Python, not arithmetic, so the cache pays off with model
size (H100, 2026-11-28: tiny at 32x32, n 8: 0.7x, i.e. slower; S at 32x32, n 16: 3.7x).

Same model (random weights, random output matrix so the draws are not trivial), same generator seed, same
decoding loop (``igpt.model.sampling.sample``): only ``use_cache`` differs. One untimed warm-up image each first.
Prints seconds, images/s and tokens/s side by side, the speed-up, and whether both gave the same tokens (they
should up to float32 rounding of the logits, which can flip a draw that lands exactly at a boundary).
"""

from __future__ import annotations

import argparse
import time

import torch

from igpt.config import ModelConfig
from igpt.model import IGPT
from igpt.model.sampling import sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", help="a named model size (debug, tiny, small, S, ...)")
    ap.add_argument("--res", type=int, default=16, help="resolution: images are res x res, res^2 tokens")
    ap.add_argument("--n", type=int, default=8, help="images per sample() call (the batch)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = IGPT(ModelConfig(size=args.size, resolution=args.res))
    torch.nn.init.normal_(model.head.weight, std=0.02)  # the released zero init would make every draw uniform
    model = model.to(args.device).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"{args.size} ({model.num_params() / 1e6:.1f}M params), {args.res}x{args.res} = {model.cfg.n_ctx} tokens, "
          f"n = {args.n}, temperature {args.temperature}, top_k {args.top_k}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    out, secs = {}, {}
    for use_cache in (True, False):
        sample(model, 1, args.temperature, args.top_k, torch.Generator().manual_seed(1), use_cache=use_cache)
        sync()
        t = time.perf_counter()
        out[use_cache] = sample(model, args.n, args.temperature, args.top_k, torch.Generator().manual_seed(0),
                                use_cache=use_cache)
        sync()
        secs[use_cache] = time.perf_counter() - t
    tokens = args.n * model.cfg.n_ctx
    print(f"{'':<21}{'seconds':>10}{'images/s':>12}{'tokens/s':>12}")
    for use_cache, name in ((True, "KV cache"), (False, "no cache (baseline)")):
        s = secs[use_cache]
        print(f"{name:<21}{s:>10.2f}{args.n / s:>12.2f}{tokens / s:>12,.0f}")
    same = (out[True] == out[False]).float().mean().item()
    print(f"speed-up {secs[False] / secs[True]:.1f}x; same tokens: {same:.2%}")


if __name__ == "__main__":
    main()
