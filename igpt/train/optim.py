"""The paper's optimisation recipe: Adam(0.9, 0.95), no weight decay, linear warm-up then cosine decay to 0."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (reaching the peak at step ``warmup_steps - 1``), then a half cosine
    from the peak to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
