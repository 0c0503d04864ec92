"""The pretraining recipe of each model size, as data: ``cluster/recipes.json``.

One table read by everything that needs it (``pipelines.pretrain``, ``pipelines.sweep_lr``, ``igpt plan``), so
the plan and the run cannot disagree about a batch size. S/M/L/XL follow the paper (batch 128 and 1M steps; XL
batch 64 and 2M steps); the warm-up is one epoch of the split actually trained on, so it is resolved per run
(``igpt.train.schedule``), not stored here. Explicit flags override a recipe field by field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

from igpt.errors import UserError

RECIPES_FILE = Path(__file__).resolve().parents[1] / "cluster" / "recipes.json"


@dataclass(frozen=True)
class Recipe:
    size: str
    global_batch: int  # images per optimizer step over all workers
    steps: int  # optimizer steps of the whole run
    resolution: int  # input resolution IR (context IR^2)
    preset: str  # cluster/deepspeed/<preset>.json
    micro_batch: int  # images per worker per forward/backward; the rest by gradient accumulation

    def __post_init__(self) -> None:
        for f in ("global_batch", "steps", "micro_batch"):
            if getattr(self, f) < 1:
                raise UserError(f"recipe {self.size}: {f} must be >= 1, got {getattr(self, f)}")
        if not 1 <= self.resolution <= 64:
            raise UserError(f"recipe {self.size}: resolution must be in 1..64, got {self.resolution}")
        if self.global_batch % self.micro_batch:
            raise UserError(f"recipe {self.size}: global_batch {self.global_batch} is not a multiple of "
                             f"micro_batch {self.micro_batch}")


def load(path: Path | str = RECIPES_FILE) -> dict[str, Recipe]:
    """Every recipe of the file, checked: known keys only, each value in range."""
    data = json.loads(Path(path).read_text())
    names = {f.name for f in fields(Recipe)} - {"size"}
    out = {}
    for size, r in data.items():
        if size.startswith("_"):
            continue
        if set(r) != names:
            raise UserError(f"{path}: recipe {size} has keys {sorted(r)}, expected {sorted(names)}")
        out[size] = Recipe(size=size, **r)
    return out


@cache
def _default() -> dict[str, Recipe]:
    return load()


def recipe(size: str) -> Recipe:
    recipes = _default()
    if size not in recipes:
        raise UserError(f"no pretraining recipe for size {size!r} in {RECIPES_FILE}; known: {sorted(recipes)}")
    return recipes[size]
