"""A pretraining run's schedule, resolved once from the size's recipe, the flags and the split's record count.

The run's length is counted in optimizer steps (the paper's 1M iterations; 2M for XL), never in epochs: the data
stream cycles through as many epochs as the steps need. One epoch is ``records // global_batch`` steps of the
records actually in the split (after ``max_images``, ``holdout``/``part`` and ``key_prefix``), and the warm-up
is one epoch (the paper's) unless ``--optim.warmup_steps`` says otherwise. A warm-up as long as the run would leave
the learning rate rising to the last step (the schedule never decays), so it is refused.

``schedule_fraction`` < 1 runs the same schedule shrunk in time: total and warm-up scaled alike, so the run still
warms up for the same share of its steps and decays to 0 (the learning-rate sweep's trials).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from igpt.errors import UserError
from igpt.recipes import recipe


@dataclass(frozen=True)
class Schedule:
    size: str
    records: int  # records in the training split, counted before decoding
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    epochs: int  # passes the data stream holds: what the steps need, plus one spare for records that fail to decode
    global_batch: int
    micro_batch: int
    grad_accum: int
    workers: int
    lr: float
    resolution: int
    preset: str
    schedule_fraction: float

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(cfg, records: int) -> Schedule:
    """``cfg`` is a ``PretrainJobConfig``; raises ValueError with what to change when the schedule cannot run."""
    rec = recipe(cfg.model.size)
    batch = cfg.optim.global_batch or rec.global_batch
    micro = cfg.deepspeed.micro_batch or rec.micro_batch
    workers = cfg.scaling.workers
    if batch % (micro * workers):
        raise UserError(f"global batch {batch} is not a multiple of micro batch {micro} x {workers} workers; "
                         f"change --optim.global_batch, --deepspeed.micro_batch or --scaling.workers")
    steps_per_epoch = records // batch
    if steps_per_epoch < 1:
        raise UserError(f"the training split has {records} records, not one full global batch of {batch}: "
                         f"use more data or a smaller --optim.global_batch")
    full_total = cfg.steps or rec.steps
    one_epoch = cfg.optim.warmup_steps is None
    full_warmup = steps_per_epoch if one_epoch else cfg.optim.warmup_steps
    f = cfg.schedule_fraction
    total = max(1, round(full_total * f))
    warmup = round(full_warmup * f)
    if warmup >= total:
        why = f"one epoch of {records} records at batch {batch}" if one_epoch else "--optim.warmup_steps"
        raise UserError(
            f"the warm-up ({warmup} steps: {why}) is as long as the run ({total} steps), so the learning rate "
            f"would rise to the last step and never decay: give --optim.warmup_steps below {total} (e.g. "
            f"{max(1, total // 10)}) or more --steps")
    epochs = math.ceil(total * batch / records) + 1
    return Schedule(size=cfg.model.size, records=records, steps_per_epoch=steps_per_epoch, total_steps=total,
                    warmup_steps=warmup, epochs=epochs, global_batch=batch, micro_batch=micro,
                    grad_accum=batch // (micro * workers), workers=workers, lr=cfg.optim.lr,
                    resolution=cfg.model.resolution, preset=rec.preset if cfg.deepspeed.preset is None
                    else cfg.deepspeed.preset, schedule_fraction=f)
