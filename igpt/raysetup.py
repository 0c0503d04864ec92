"""Connecting to Ray the same way from a laptop and from ``ray job submit``."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (``RAY_ADDRESS`` is set by ``ray job submit``), else start a
    local runtime, dashboard-less and bound to this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
