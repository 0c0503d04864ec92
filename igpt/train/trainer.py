"""The worker side of a training run, written once for pretraining and fine-tuning (runs inside each Ray Train
worker; the loops are ``train_loop`` and ``finetune_loop``, the drivers ``igpt/train/pretrain_job.py`` and
``igpt/train/finetune_job.py``).

A :class:`Trainer` is one rank's DeepSpeed engine over a model, with what every loop needs around it: the
learning-rate schedule, the device, the step (every micro-batch through the engine's forward, backward and step),
the mean of a value over ranks, metrics to the run's MLflow run (rank 0), the gathered fp32 weights, and for runs
that checkpoint, the save (with its completion marker, written last) and the resume (checking the world size and
that every rank's RNG state was saved). The driver decides everything up front in a :class:`RunSpec`.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from igpt.storage import Loc
from igpt.track.tags import TAG_WARNING
from igpt.train.checkpoints import full_fp32_state_dict, newest_complete, prune, rank_file, read_marker, write_marker
from igpt.train.optim import lr_factor


@dataclass(frozen=True)
class RunSpec:
    """What the driver decided for every worker of one run."""

    ds_config: dict
    """the DeepSpeed config (batch sizes, ZeRO stage, precision, optimizer)"""
    model: dict
    """the model config (``ModelConfig`` as a dict)"""
    seed: int
    """initial weights (the same on every rank), data order, masks"""
    warmup_steps: int
    """linear warm-up in optimizer steps"""
    total_steps: int | None
    """the cosine decays to 0 at this step; None: constant after the warm-up (fine-tuning)"""
    run_id: str
    """the MLflow run rank 0 logs to"""
    tracking_uri: str
    use_gpu: bool
    palette: list
    """the run's palette centres ((K, 3) in [-1, 1]), saved with the weights"""
    run_dir: str = ""
    """where checkpoints go (pretraining); empty: the run keeps no checkpoints"""


DATA_WAIT_WARN = 0.10
"""a run whose steps spend more than this share of their time blocked on the next micro-batch (the slowest rank's,
over every logged window after the first, which holds the stream's start-up) gets a warning and a tag"""


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to the full rate over ``warmup_steps``, then constant (fine-tuning has no decay)."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


class Trainer:
    def __init__(self, spec: RunSpec, model: nn.Module):
        import deepspeed
        import ray.train
        from mlflow.tracking import MlflowClient

        self.spec = spec
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if spec.use_gpu else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if spec.use_gpu else "gloo")
        warmup, total = spec.warmup_steps, spec.total_steps

        def factor(s: int) -> float:
            return lr_factor(s, warmup, total) if total is not None else warmup_factor(s, warmup)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=spec.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        self.accum = self.engine.gradient_accumulation_steps()
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.client = MlflowClient(spec.tracking_uri) if self.rank == 0 else None
        self.waited = 0.0  # seconds blocked on the next micro-batch since the last data_wait()
        self.wait_totals = [0.0, 0.0, 0]  # after the first window: waited (slowest rank), seconds; windows
        self.wait_warned = False
        self.system = None
        if self.rank == 0:  # MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) of rank 0's node
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system = SystemMetricsMonitor(spec.run_id, resume_logging=True, tracking_uri=spec.tracking_uri)
            self.system.start()

    def close(self) -> None:
        """Stop the system-metrics monitor, flushing what it sampled."""
        if self.system is not None:
            self.system.finish()
            self.system = None

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    # ---- the step -----------------------------------------------------------------------------------------
    def lr(self) -> float:
        """The rate the next step uses (the scheduler moves on inside the last micro-batch's engine.step)."""
        return self.engine.get_lr()[0]

    def step(self, micro_batches: Iterator, loss_of: Callable) -> list:
        """One optimizer step: ``accum`` micro-batches, each ``loss_of(engine, batch)`` (a call through the
        engine's forward) -> (loss to minimise, anything to keep); backward and step per micro-batch, as DeepSpeed
        accumulates. Returns what was kept, one per micro-batch."""
        kept = []
        for _ in range(self.accum):
            t = time.perf_counter()
            batch = next(micro_batches)
            self.waited += time.perf_counter() - t
            loss, keep = loss_of(self.engine, batch)
            self.engine.backward(loss)
            self.engine.step()
            kept.append(keep)
        return kept

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world

    def data_wait(self, seconds: float, steps: int, step: int) -> dict:
        """Collective (every rank calls it): of the ``steps`` steps that took ``seconds`` since the last call, the
        seconds per step this rank was blocked on its next micro-batch and their share of the step, the max over
        ranks (the others wait for the slowest in the gradient all-reduce). Warns once (stderr and the tag
        ``igpt.warning.data_wait``) when the share over the run so far passes :data:`DATA_WAIT_WARN`."""
        w = torch.tensor([self.waited / max(steps, 1), self.waited / max(seconds, 1e-9)], device=self.device)
        dist.all_reduce(w, op=dist.ReduceOp.MAX)
        self.waited = 0.0
        per_step, share = w.tolist()
        totals = self.wait_totals
        if totals[2] > 0:  # the first window (the stream's start-up) is not counted
            totals[0], totals[1] = totals[0] + share * seconds, totals[1] + seconds
        totals[2] += 1
        if totals[2] >= 3 and not self.wait_warned and totals[0] / max(totals[1], 1e-9) > DATA_WAIT_WARN:
            self.wait_warned = True  # once per run attempt
            note = (f"the step waited on data for {totals[0] / totals[1]:.0%} of its time (slowest rank, up to step "
                    f"{step}): the data path does not keep up. Give each worker more CPUs for its reads "
                    "(--scaling.cpus_per_worker, fewer workers per node), or train from pre-tokenized shards "
                    "(python -m pipelines.quantize, then --train.format tokens)")
            if self.rank == 0:
                print(f"warning: {note}", file=sys.stderr, flush=True)
                self.client.set_tag(self.spec.run_id, f"{TAG_WARNING}data_wait", note[:5000])
        return {"train/data_wait_s": per_step, "train/data_wait_share": share}

    def log_data_wait_share(self, step: int) -> None:
        """``summary/data_wait_share`` at the run's end (rank 0): the share of step time spent waiting on data over
        the windows counted in this attempt (the first, the stream's start-up, left out)."""
        waited, seconds, _ = self.wait_totals
        if seconds > 0:
            self.log({"summary/data_wait_share": waited / seconds}, step)

    # ---- metrics ------------------------------------------------------------------------------------------
    def log(self, metrics: dict, step: int) -> None:
        """Metrics at ``step`` to the run's MLflow run, from rank 0 only, in one call."""
        if self.client:
            from mlflow.entities import Metric

            ms = int(time.time() * 1000)
            self.client.log_batch(self.spec.run_id,
                                  metrics=[Metric(k, float(v), ms, step) for k, v in metrics.items()])

    def logged_until(self, key: str) -> int:
        """The last step of ``key`` this MLflow run already has (an attempt that died after logging it): a resumed
        run replays those steps bit for bit (deterministic data order), so they are not logged twice."""
        if not self.client:
            return 0
        return max((m.step for m in self.client.get_metric_history(self.spec.run_id, key)), default=0)

    def gathered_weights(self) -> dict[str, torch.Tensor]:
        """The full fp32 weights (a collective: every rank calls it; rank 0 gets them)."""
        return full_fp32_state_dict(self.engine)

    # ---- checkpoints (runs with a run_dir) -----------------------------------------------------------------
    def resume(self) -> dict | None:
        """Load the newest complete checkpoint of ``run_dir`` and this rank's RNG state; its client state, or None
        for a fresh run. Refuses a checkpoint written by another number of workers (the data position is per
        worker and DeepSpeed's shards per rank: neither maps to another count) or one lacking this rank's RNG."""
        import ray.train

        run_dir = Loc(self.spec.run_dir)
        ckpt = newest_complete(run_dir, report=self.rank == 0)  # the newest that verifies; skipped ones say why
        if ckpt is None and ray.train.get_checkpoint() is not None:
            raise RuntimeError(f"Ray reports a checkpoint but none under {run_dir} is complete")
        if ckpt is None:
            return None
        state = read_marker(ckpt)
        if state.get("world_size", self.world) != self.world:
            raise ValueError(f"{ckpt} was written by {state['world_size']} workers, this run has {self.world}: "
                             f"resume with --scaling.workers {state['world_size']}, or start a new --name")
        with tempfile.TemporaryDirectory() as tmp:
            # DeepSpeed loads from a local folder: on object storage, this rank's files are copied down first
            local = ckpt.download(tmp, keep=lambda name: rank_file(name, self.rank)) if ckpt.remote else ckpt.local()
            path, client = self.engine.load_checkpoint(str(local), tag=state["tag"])
        if path is None:  # DeepSpeed only warns when 'latest' is missing; a checkpoint was expected here
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt} (tag {state['tag']})")
        if self.rank >= len(client["rng"]):
            raise ValueError(f"{ckpt} holds RNG states of {len(client['rng'])} ranks, not of rank {self.rank}")
        _set_rng_state(client["rng"][self.rank])
        if self.rank == 0:
            print(f"resumed from {ckpt.name}: step {client['step']}, {client['micro_batches']} micro-batches "
                  "consumed per worker")
        return client

    def save(self, step: int, client_state: dict, keep: int, write_weights: Callable[[Path, dict], None]) -> None:
        """Every rank's DeepSpeed shard with ``client_state`` and every rank's RNG state, and (rank 0)
        ``write_weights(folder, gathered fp32 weights)``, reported to Ray Train as ``step_<step>``; then, once every
        rank's upload has returned, rank 0 writes the completion marker (last: its presence means every file is
        in) and prunes to the newest ``keep``."""
        import ray.train

        tag, name, run_dir = f"step{step}", f"step_{step:08d}", Loc(self.spec.run_dir)
        with tempfile.TemporaryDirectory() as tmp:
            rng = [None] * self.world
            dist.all_gather_object(rng, _rng_state())
            self.engine.save_checkpoint(tmp, tag=tag, client_state={**client_state, "step": step, "rng": rng})
            weights = self.gathered_weights()
            if self.rank == 0:
                write_weights(Path(tmp), weights)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
        dist.barrier()
        if self.rank == 0:
            write_marker(run_dir / name, {"tag": tag, "step": step, "world_size": self.world})
            prune(run_dir, keep)  # also what an earlier, stopped attempt left beyond keep
        dist.barrier()
