"""Connecting to Ray the same way from a laptop and from ``ray job submit``."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (``RAY_ADDRESS`` is set by ``ray job submit``), else start a
    local runtime, dashboard-less and bound to this machine."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
    # after ray.init: Ray's core installs its own SIGTERM handler there, which would end the job as FAILED
    from igpt.track.tracking import stop_on_sigterm

    stop_on_sigterm()
    configure_data()


def local_cpus(per_unit: float, units: int = 1, spare: int = 1) -> int:
    """Logical CPUs for a local runtime: ``units`` things at once (trials, rungs) of ``per_unit`` CPUs each, and
    ``spare`` whole CPUs left for Ray Data's tasks; never fewer than the machine has."""
    import math

    return max(os.cpu_count() or 1, math.ceil(units * per_unit) + spare)


def torch_trainer(loop, loop_config: dict, scaling, name: str, storage_path: str, datasets: dict, *,
                  split: tuple[str, ...] = (), max_failures: int = 0, preserve_order: bool = False):
    """The one Ray Train ``TorchTrainer`` of igpt's runs (pretraining, fine-tuning): ``scaling`` is the job's
    ``igpt.config.ScalingConfig``; ``split``: the datasets Ray Train shards over the workers (the others each
    worker gets whole); ``max_failures``: Ray Train's restarts of the worker group from the newest checkpoint.
    Checkpoints are pruned by the workers (``igpt.train.checkpoints.prune``): Ray's own count forgets what a
    stopped attempt left, and would delete folders by its own list."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from igpt.storage import Loc

    opts = ExecutionOptions()
    opts.preserve_order = preserve_order  # the same batches to the same workers on every run of the same job
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement),
        run_config=RunConfig(name=name, storage_path=Loc(storage_path).uri,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=list(split), execution_options=opts))


def configure_data() -> None:
    """Ray Data settings for our pipelines (one read + one map per record stream).

    Operator resource reservation is off: with it, Ray 2.60 kept all but one of the map tasks waiting on a
    2-CPU node (measured: 7,100 vs 12,300 CIFAR-10 images/s tokenized), holding CPUs back for operators that
    have finished."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.op_resource_reservation_enabled = False


def worker_memory_gib(workers: int, use_gpu: bool, cpus_per_worker: float) -> tuple[float, str]:
    """(GiB one training worker may fill, how it was found), from the cluster Ray is connected to.

    GPU workers: the total memory of the GPU a one-GPU Ray task is given (so the GPUs the workers will get).
    CPU workers: they share their node's memory, so the smallest alive node's Ray ``memory`` resource (what Ray
    lets tasks use there) divided by the workers that can land on it (its CPUs / cpus_per_worker, at most
    ``workers``). Raises RuntimeError when nothing can tell (no GPU free)."""
    import ray

    if use_gpu:
        @ray.remote(num_gpus=1)
        def total_memory() -> int:
            import torch

            return torch.cuda.get_device_properties(0).total_memory

        ref = total_memory.remote()
        ready, _ = ray.wait([ref], timeout=120)
        if not ready:
            ray.cancel(ref, force=True)
            raise RuntimeError("no GPU could be measured within 120 s (none free?)")
        return ray.get(ref) / 1024**3, "the total memory of a GPU a one-GPU Ray task was given"
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise RuntimeError("no alive Ray node with CPUs")
    node = min(nodes, key=lambda r: r.get("memory", 0))
    per_node = max(1, min(workers, int(node["CPU"] // cpus_per_worker) if cpus_per_worker > 0 else workers))
    return node.get("memory", 0) / 1024**3 / per_node, \
        f"Ray's memory on the smallest node, {node.get('memory', 0) / 1024**3:.1f} GiB, shared by {per_node} worker(s)"


def named_trainable(fn, name: str):
    """``fn`` under a name of its own, for ``tune.with_parameters``. Ray Tune keys a function trainable by its
    ``__name__`` in the job's registry and its parameters by ``str(fn)``: two sweeps in one Ray job (a study's
    rungs, each a Ray task) with the same trial function overwrote each other's entries, and a trial of one rung
    ran another rung's configuration (found in the study's test: two trials of one pretraining run at once).
    The name should be stable for a sweep (``Tuner.restore`` looks its trainable up by it)."""
    import functools
    import re

    @functools.wraps(fn)
    def trainable(config, **kwargs):
        return fn(config, **kwargs)

    trainable.__name__ = trainable.__qualname__ = re.sub(r"[^A-Za-z0-9_]", "_", f"{fn.__name__}_{name}")
    return trainable


def experiment_name(base: str, where: str) -> str:
    """A Ray Tune experiment's name, unique to where it is stored: ``<base>-<8 hex digits of where>``. Tune stages
    an experiment's state on the driver's node in ``<session>/artifacts/<start time, to the second>/<name>/`` and
    syncs that folder to its storage: two experiments of one name started in the same second (a study's rungs,
    each starting its sweep at once) shared the folder, each synced the other's trials and searcher into its own
    storage, and a resumed sweep restored the other's. The same ``where`` gives the same name (a re-submitted
    sweep finds its experiment again)."""
    import hashlib

    return f"{base}-{hashlib.blake2b(where.encode(), digest_size=4).hexdigest()}"
