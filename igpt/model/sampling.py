"""Sampling images from an AR iGPT, one pixel token at a time: unconditional (from SOS alone) or completing given
first tokens (the top half of an image, as in the paper's completion figure).

One decoding loop serves both ways of computing the next logits:
- ``use_cache=True`` (default): a KV cache (``igpt.model.KVCache``). The first call runs SOS and the given
  prefix at once (prefill); every later call runs only the newest token, so a pixel costs one position's work.
- ``use_cache=False``: every token re-runs the whole prefix through the plain forward pass. Slow (quadratic),
  kept as the reference the cache is tested against and for timing (``benchmarks/sampling.py``).
Everything else -- temperature, top-k, greedy, the generator's draws -- is the same code for both, so with the
same generator the two give the same tokens up to float rounding of the logits.

Under ZeRO-3 every rank must call these together (each forward gathers the sharded weights collectively), with
the same generator seed so all ranks agree; both paths run the same number of forwards on every rank.
"""

from __future__ import annotations

import numpy as np
import torch

from igpt.model import IGPT


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): argmax when ``temperature == 0``; otherwise a draw from
    softmax(logits / temperature), restricted to the ``top_k`` largest logits when ``top_k`` is set (0/None: all)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    # draw where the generator lives (a CPU generator with a GPU model: draws do not depend on the device)
    dev = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(dev), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def _decode(model: IGPT, x: torch.Tensor, given: int, temperature: float, top_k: int | None,
            generator: torch.Generator | None, use_cache: bool) -> torch.Tensor:
    """Fill ``x[:, given:]`` (B, T) in place, left to right; ``x[:, :given]`` is kept as it is."""
    if model.cfg.objective != "ar":
        raise ValueError("sampling needs an autoregressive ('ar') model")
    if not 0 <= given <= x.shape[1] <= model.cfg.n_ctx:
        raise ValueError(f"need 0 <= given ({given}) <= length ({x.shape[1]}) <= n_ctx ({model.cfg.n_ctx})")
    # AR input ids [SOS, x_0, x_1, ...]: the logits at input position i predict token x_i.
    sos = torch.full_like(x[:, :1], model.cfg.sos_id)
    cache = model.new_cache() if use_cache else None
    for i in range(given, x.shape[1]):
        if cache is None:
            logits = model(torch.cat([sos, x[:, :i]], 1))[:, -1]  # input positions 0..i, all recomputed
        elif i == given:
            logits = model(torch.cat([sos, x[:, :i]], 1), cache=cache)[:, -1]  # prefill: SOS + the prefix
        else:
            logits = model(x[:, i - 1 : i], cache=cache)[:, -1]  # only input position i, i.e. token x_{i-1}
        x[:, i] = _pick(logits, temperature, top_k, generator).to(x.dtype)
    return x


@torch.no_grad()
def sample(model: IGPT, n: int, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
           use_cache: bool = True) -> torch.Tensor:
    """``n`` whole images as tokens (n, n_ctx), int64, on the model's device.

    Unconditional from SOS, or, with ``prefix`` (n, k), continuing it: the first k tokens of each row are the
    prefix verbatim. ``temperature`` scales the logits (0: greedy argmax); ``top_k`` keeps only the k most likely
    colours (None or 0: all). ``generator`` seeds the draws; ``use_cache=False`` decodes without the KV cache
    (same algorithm, much slower)."""
    device = next(model.parameters()).device
    x = torch.zeros(n, model.cfg.n_ctx, dtype=torch.long, device=device)
    given = 0
    if prefix is not None:
        if prefix.ndim != 2 or prefix.shape[0] != n:
            raise ValueError(f"prefix must have shape ({n}, k), got {tuple(prefix.shape)}")
        given = prefix.shape[1]
        if given > model.cfg.n_ctx:
            raise ValueError(f"prefix of {given} tokens exceeds the context of {model.cfg.n_ctx}")
        x[:, :given] = prefix.to(device=device, dtype=torch.long)
    return _decode(model, x, given, temperature, top_k, generator, use_cache)


@torch.no_grad()
def complete(model: IGPT, tokens: torch.Tensor, given: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Keep the first ``given`` tokens of each row of ``tokens`` (B, T) and sample the rest (same dtype and device
    as ``tokens``). For T == n_ctx this is ``sample(model, B, ..., prefix=tokens[:, :given])``."""
    return _decode(model, tokens.clone(), given, temperature, top_k, generator, use_cache)


def grid(rows: list[list[np.ndarray]], pad: int = 2, scale: int = 4) -> np.ndarray:
    """Images (H, W, 3) uint8 in rows and columns -> one uint8 picture, upscaled for viewing.

    Size: ``scale * (rows * (H + pad) + pad)`` by ``scale * (columns * (W + pad) + pad)``, white between images;
    rows may be shorter than the longest (their end stays white)."""
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = img
    return out.repeat(scale, 0).repeat(scale, 1)


def picture(model: IGPT, palette, images: torch.Tensor | None = None, n: int = 8, completions: int = 3,
            temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
            use_cache: bool = True) -> np.ndarray:
    """The iGPT blog's figure as one uint8 picture (before :func:`grid`'s upscaling it is a grid of IR x IR cells).

    With ``images`` (m, n_ctx) tokens: one row per image, ``original | completion 1 .. completions`` of its top
    half. Then ``n`` unconditional samples, in rows as wide as the completion rows (8 wide without images).
    ``palette`` turns tokens back into colours (:meth:`igpt.data.palette.Palette.dequantize`)."""
    res = model.cfg.resolution
    to_rgb = lambda t: palette.dequantize(t.cpu().numpy().reshape(res, res))  # noqa: E731
    rows: list[list[np.ndarray]] = []
    width = 8
    if images is not None and len(images):
        width = completions + 1
        half = (res // 2) * res
        m = len(images)
        # all completions of all images in one batch: image i's c-th completion is row c * m + i
        prefix = images[:, :half].repeat(completions, 1)
        done = sample(model, len(prefix), temperature, top_k, generator, prefix=prefix, use_cache=use_cache)
        for i in range(m):
            rows.append([to_rgb(images[i])] + [to_rgb(done[c * m + i]) for c in range(completions)])
    if n:
        uncond = [to_rgb(t) for t in sample(model, n, temperature, top_k, generator, use_cache=use_cache)]
        rows += [uncond[s : s + width] for s in range(0, n, width)]
    if not rows:
        raise ValueError("nothing to draw: no images and n == 0")
    return grid(rows)
