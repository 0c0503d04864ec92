"""BERT evaluation as the paper does it: each image seen under 5 independent masks, the modal prediction wins.

A BERT model was trained on inputs with 15% of their content zeroed; evaluating it on unmasked inputs would be
a different input distribution, so evaluation masks too, and ensembles over masks to cancel their noise.
"""

from __future__ import annotations

import hashlib

import torch

N_MASKS = 5


def eval_masks(keys: list[str], n_ctx: int, prob: float, n: int = N_MASKS) -> torch.Tensor:
    """(n, B, T) bool: mask k of image ``key`` is drawn from a generator seeded by (key, k), so an image gets the
    same n masks in every job (extract, probe, finetune) and on every worker. Redrawn until the n are distinct."""
    out = torch.empty(n, len(keys), n_ctx, dtype=torch.bool)
    for b, key in enumerate(keys):
        seen: set[bytes] = set()
        k, attempt = 0, 0
        while k < n:
            seed = int.from_bytes(hashlib.blake2b(f"{key}/{attempt}".encode(), digest_size=8).digest(), "big")
            m = torch.rand(n_ctx, generator=torch.Generator().manual_seed(seed % 2**63)) < prob
            attempt += 1
            if m.numpy().tobytes() in seen:
                continue
            seen.add(m.numpy().tobytes())
            out[k, b] = m
            k += 1
    return out


def modal(predictions: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """(n, B) class predictions -> (B,) the most frequent class per image. Ties go to the tied class with the
    highest summed score when ``scores`` (n, B, C) is given, else to the smallest class id."""
    n, b = predictions.shape
    n_classes = int(predictions.max()) + 1 if scores is None else scores.shape[-1]
    votes = torch.zeros(b, n_classes).scatter_add_(1, predictions.T.long(), torch.ones(b, n))
    if scores is not None:
        # a tie-break below one vote: scores summed over masks, squashed into (0, 0.5)
        votes = votes + torch.sigmoid(scores.float().sum(0)) * 0.5
    return votes.argmax(1)
