"""Fault injection for tests: a worker that dies abruptly, a loss that turns NaN at a given step, slow data.

Faults are named in the environment of the job's driver (``IGPT_FAULTS``, JSON), never in a user's flags or a
run's MLflow params; the driver hands them to its workers (and a sweep to its trials), so a test arms them with
``monkeypatch.setenv`` or ``ray job submit --runtime-env-json``. A worker death strikes once per run folder (the
file ``fault_injected`` records it), so Ray Train's restart then succeeds."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

ENV = "IGPT_FAULTS"


@dataclass(frozen=True)
class Faults:
    fail_at_step: int = -1
    """worker ``fail_rank`` exits abruptly (``os._exit``) after this optimizer step, once; -1: never"""
    fail_rank: int = 1
    nan_at_step: int = -1
    """the loss of this step (1-based) is multiplied by NaN, gradients included; -1: never"""
    data_delay_s: float = 0.0
    """every micro-batch reaches the step this many seconds late: a data path that does not keep up"""

    @classmethod
    def from_env(cls) -> Faults:
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return cls()
        data = json.loads(raw)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{ENV}: unknown fault(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)
