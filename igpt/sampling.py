"""Image completion: the model continues an image from its top rows, one pixel token at a time.

Plain autoregressive decoding: each new token re-runs the whole prefix (the model has no KV cache yet), which
is fine for the small picture logged each epoch. Every rank must call this together under ZeRO-3 (each forward
gathers the sharded weights collectively), with the same generator seed so all ranks agree.
"""

from __future__ import annotations

import numpy as np
import torch

from igpt.model import IGPT


@torch.no_grad()
def complete(model: IGPT, tokens: torch.Tensor, given: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep the first ``given`` tokens of each row of ``tokens`` (B, T) and sample the rest."""
    x = tokens.clone()
    for i in range(given, x.shape[1]):
        logits = model(model.ar_inputs(x)[:, : i + 1])[:, i].float() / max(temperature, 1e-6)
        if top_k:
            kth = logits.topk(top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        x[:, i] = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x.device)
    return x


def grid(rows: list[list[np.ndarray]], pad: int = 2, scale: int = 4) -> np.ndarray:
    """Images (H, W, 3) uint8 in rows and columns -> one uint8 picture, upscaled for viewing."""
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = img
    return out.repeat(scale, 0).repeat(scale, 1)
