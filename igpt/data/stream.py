"""The training stream of one worker, and where it stands: what makes a resume cost the same at any step.

Ray Data has no mid-epoch checkpoint of its own (ray-project/ray#48224), and Ray Train's splitter deals blocks
to workers as they finish, so a resumed run could only find its place by reading, decoding and tokenizing every
record it had trained on again. Here the position is ours:

- the stream is a sequence of *slots* (``igpt.data.sources.read``): slot ``s`` is one piece of one read unit in
  one epoch, a function of (seed, epoch) alone; inside it the records come in an order drawn from (seed, epoch);
- :func:`deal` gives every slot to one worker, in slot order, each to the worker dealt the fewest records so far:
  a function of the plan, the seed and the worker count, so every worker computes its own share and nobody has
  to coordinate;
- a worker's position is (slot, index) of the last record it trained on. A checkpoint stores it; a resumed
  worker starts reading at that slot and skips that slot's records up to the index, decoding nothing else it
  already trained on: at most one piece is read again, whatever the step.

The worker count is part of the deal: a checkpoint written by 4 workers cannot be resumed by 8 (nor DeepSpeed's
per-rank shards), and the pretraining driver refuses it before Ray starts.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from igpt.data import ingest, sources

PIECES_PER_WORKER = 4
"""each epoch has at least this many pieces per worker: every worker reads from the epoch at once (a worker dealt
whole epochs of a one-unit split would put copies of the same images in one global batch)"""


def parts_for(n_units: int, world: int) -> int:
    """How many pieces each read unit is cut into so an epoch has at least PIECES_PER_WORKER per worker."""
    return max(1, math.ceil(PIECES_PER_WORKER * world / max(n_units, 1)))


def deal(takes: tuple[int, ...], parts: int, epochs: int, seed: int | None, world: int) -> list[np.ndarray]:
    """Every slot of ``epochs`` passes to one of ``world`` workers: the slots in order, each to the worker dealt the
    fewest records so far (ties: the lowest rank). ``takes``: each unit's records. A worker's share never falls
    behind another's by more than one piece, whatever the piece sizes; each list is in slot order."""
    n = len(takes)
    sizes = [t * (p + 1) // parts - t * p // parts for t in takes for p in range(parts)]  # piece u*parts+p
    loads = [(0, r) for r in range(world)]
    out: list[list[int]] = [[] for _ in range(world)]
    for epoch in range(epochs):
        order = sources.unit_order(n * parts, epoch, seed)
        base = epoch * n * parts
        for pos, piece in enumerate(order):
            load, r = heapq.heappop(loads)
            out[r].append(base + pos)
            heapq.heappush(loads, (load + sizes[piece], r))
    return [np.asarray(o, np.int64) for o in out]


@dataclass(frozen=True)
class TrainStream:
    """What each worker needs to build its share of the training stream (the driver decides it once)."""

    spec: sources.DatasetSpec
    plan: object
    """the split's :class:`~igpt.data.sources.Plan`, in the object store (an ImageNet plan lists 1.28M files)"""
    takes: tuple[int, ...]
    """each read unit's records (the plan's takes): all the deal needs"""
    epochs: int
    world: int
    lut: object
    """the palette's lookup table, in the object store"""
    transform: ingest.TransformSpec
    log: object
    """the :class:`~igpt.data.ingest.ErrorLog` actor the error budget is kept in"""

    @property
    def parts(self) -> int:
        return parts_for(len(self.takes), self.world)

    def slots(self, rank: int) -> np.ndarray:
        return deal(self.takes, self.parts, self.epochs, self.transform.seed, self.world)[rank]

    def dataset(self, rank: int, after: tuple[int, int] | None = None):
        """Worker ``rank``'s records, tokenized, in order (columns tokens, slot, index), from just past ``after``
        (the position of the last record trained on) or from the start."""
        from igpt.raysetup import configure_data

        configure_data()  # this worker's own Ray Data context
        mine = self.slots(rank)
        if after is not None:
            mine = mine[np.searchsorted(mine, after[0]):]
            if not len(mine) or mine[0] != after[0]:
                raise ValueError(f"position {after} is not in worker {rank}'s share of the stream: was it written "
                                 f"by another number of workers than {self.world}?")
        ds = sources.read(self.spec, self.plan, self.epochs, self.transform.seed, self.parts, slots=mine,
                          after=after)
        ds = ingest.tokenize(ds, self.lut, self.transform, self.log, carry=("slot", "index"))
        ds = ds.select_columns(["tokens", "slot", "index"])
        ds.context.execution_options.preserve_order = True  # the position means "everything before it"
        return ds

    def batches(self, rank: int, micro: int, after: tuple[int, int] | None = None) -> Iterator[dict]:
        """Micro-batches of worker ``rank``: numpy ``tokens`` (micro, IR^2) and the position after each."""
        for b in self.dataset(rank, after).iter_batches(batch_size=micro, drop_last=True, batch_format="pyarrow",
                                                         prefetch_batches=2):
            tokens = b["tokens"].combine_chunks().flatten().to_numpy().reshape(b.num_rows, -1)
            yield {"tokens": tokens, "position": (b["slot"][-1].as_py(), b["index"][-1].as_py())}
