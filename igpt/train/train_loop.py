"""The per-worker pretraining loop (runs inside each Ray Train worker; the driver is ``igpt/train/pretrain_job.py``).

Each worker builds the model, wraps it in a DeepSpeed engine (ZeRO stage, precision, offload from the generated
config), streams its share of the augmented token stream, and every ``checkpoint.every_steps`` saves its
DeepSpeed shard plus the client state DeepSpeed does not keep (step, data position, RNG states), and rank 0 the
gathered fp32 weights (igpt/train/checkpoints.py). Rank 0 writes a completion marker last; a checkpoint without it was
torn mid-write and is never loaded.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from igpt import hw
from igpt.data.palette import Palette
from igpt.data.stream import TrainStream
from igpt.model import IGPT, ModelConfig
from igpt.model.sampling import complete, grid
from igpt.storage import Loc
from igpt.train.checkpoints import write_weights
from igpt.train.faults import Faults
from igpt.train.trainer import RunSpec, Trainer

NONFINITE = "nonfinite_loss"  # written when the loss diverges; stops Ray Train's automatic retries


def bert_mask(model: IGPT, x: torch.Tensor, seed: int, rank: int, micro_batch: int) -> torch.Tensor:
    """The BERT mask of one micro-batch, drawn from a generator seeded by (seed, rank, micro-batch index): ranks
    differ at the same step, and the draw depends on no RNG state a resume would have to restore."""
    g = torch.Generator().manual_seed(hash((seed, rank, micro_batch)) & (2**63 - 1))
    return model.bert_mask(x.cpu(), g).to(x.device)


def cpu_peak_flops(seconds: float = 0.3) -> float:
    """Achievable fp32 matmul FLOP/s of this process's threads, measured: the CPU 'peak' MFU is taken against."""
    a = torch.randn(1024, 1024)
    torch.mm(a, a)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        torch.mm(a, a)
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - t)


def device_peak_flops(use_gpu: bool) -> tuple[float, str]:
    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for k, v in hw.GPU_PEAK_BF16.items():
            if k in name:
                return v, f"{name}: {v / 1e12:.0f} TFLOP/s dense bf16 (datasheet)"
    peak = cpu_peak_flops()
    return peak, f"CPU: {peak / 1e9:.1f} GFLOP/s measured fp32 matmul (1024^2) on this worker's threads"


def train_loop(config: dict) -> None:
    """One pretraining run on one worker: ``config`` holds the driver's :class:`PretrainSpec` (``spec``) and the
    test faults (``faults``, igpt.train.faults)."""
    job = Pretraining(config["spec"], Faults(**config["faults"]))
    try:
        job.run()
    finally:
        job.t.close()


@dataclass(frozen=True)
class PretrainSpec:
    """What the pretraining driver decided for every worker, beyond the shared :class:`RunSpec`."""

    run: RunSpec
    stream: TrainStream
    """this run's training stream: each worker reads its own share from its own position (igpt/data/stream.py)"""
    steps_per_epoch: int
    records: int
    """records in the training split: the stream holds ``epochs`` passes over them"""
    epochs: int
    global_batch: int
    eval_every: int
    """validation loss every this many steps (0: only at epoch ends and the end)"""
    completions: int
    """validation images completed from their top half at each epoch's end (AR models)"""
    log_every: int
    """training metrics (and the finiteness check) every this many steps, besides evaluations and checkpoints:
    the loss mean over the window, a host sync per logged step rather than per step"""
    checkpoint_every: int
    keep: int
    """checkpoints kept, the newest"""


class Pretraining:
    """The pretraining loop of one worker: resume, stream, step, log, evaluate, complete, checkpoint."""

    def __init__(self, spec: PretrainSpec, faults: Faults):
        self.started = time.perf_counter()
        self.spec, self.faults = spec, faults
        self.run_dir = Loc(spec.run.run_dir)
        if (self.run_dir / NONFINITE).exists():  # Ray Train restarts failed workers; a diverged run is final
            raise FloatingPointError(f"this run diverged ({(self.run_dir / NONFINITE).read_text().strip()}); "
                                     "not retrying")
        torch.manual_seed(spec.run.seed)  # the same initial weights on every rank
        self.model = IGPT(ModelConfig(**spec.run.model))
        if self.model.cfg.compile:  # in place, before DeepSpeed wraps it (igpt/train/compile.py)
            from igpt.train.compile import compile_model

            compile_model(self.model)
        self.t = Trainer(spec.run, self.model)
        self.step, self.consumed, self.position = 0, 0, None
        client = self.t.resume()
        if client is not None:
            if len(client.get("positions", ())) != self.t.world:
                raise ValueError("this run's checkpoint holds no stream position per worker (it predates them): "
                                 "start a new --name, or fine-tune from its weights.pt")
            self.step, self.consumed = client["step"], client["micro_batches"]
            self.position = client["positions"][self.t.rank]
        self.logged_until = self.t.logged_until("train/loss")
        self.peak, self.peak_note = device_peak_flops(spec.run.use_gpu)
        # the stream starts just past the last record the checkpoint trained on: nothing before it is read again
        self.stream = spec.stream.batches(self.t.rank, self.t.micro, after=self.position)

    def _next_batch(self) -> torch.Tensor:
        try:
            b = next(self.stream)
            if self.faults.data_delay_s:
                time.sleep(self.faults.data_delay_s)  # test fault: a data path slower than the step
        except StopIteration:  # the planned passes hold a spare epoch; only many undecodable records get here
            s = self.spec
            raise RuntimeError(
                f"the training stream ended on worker {self.t.rank} after {self.consumed} micro-batches of "
                f"{self.t.micro} at step {self.step} of {s.run.total_steps}: it holds {s.epochs} passes over "
                f"{s.records} records, one more than the steps need, so more records failed to decode than a "
                f"whole epoch (see the run's errors.tsv)") from None
        self.position = b["position"]
        x = torch.from_numpy(b["tokens"].astype(np.int64))
        return x.pin_memory().to(self.t.device, non_blocking=True) if self.t.device.type == "cuda" else x

    def _micro_batches(self) -> Iterator[torch.Tensor]:
        while True:
            x = self._next_batch()
            self.consumed += 1
            yield x

    def _loss(self, engine, x: torch.Tensor):
        # BERT: each rank draws its own masks, a function of (seed, rank, micro-batch), so data-parallel ranks
        # mask independently (the paper) and a resumed run draws the same masks again
        mask = bert_mask(self.model, x, self.spec.run.seed, self.t.rank, self.consumed) \
            if self.model.cfg.objective == "bert" else None
        loss = engine(**self.model.objective_inputs(x, mask=mask))  # through DeepSpeed's forward
        if self.step + 1 == self.faults.nan_at_step:
            loss = loss * float("nan")  # test fault: a diverged step, gradients included
        return loss, loss.detach().float()

    def run(self) -> None:
        total, per_epoch, every = self.spec.run.total_steps, self.spec.steps_per_epoch, self.spec.log_every
        self.t.engine.train()
        batches = self._micro_batches()
        first, window, t0 = True, [], time.perf_counter()
        while self.step < total:
            lr = self.t.lr()
            losses = self.t.step(batches, self._loss)
            self.step += 1
            window.append(torch.stack(losses).mean())  # stays on the device: no host sync on the hot path
            self._maybe_die()
            end_of_epoch = self.step % per_epoch == 0
            evaluate = end_of_epoch or (self.spec.eval_every and self.step % self.spec.eval_every == 0) or \
                self.step == total
            save = self.step % self.spec.checkpoint_every == 0 or self.step == total
            if first or self.step % every == 0 or evaluate or save:
                # one all-reduce and one host sync per logged step: the mean loss of the steps since the last
                mean = self.t.mean_over_ranks(torch.stack(window).mean()).item()
                if first and self.t.client:  # a resume's cost: engine, checkpoint, stream to its position, a step
                    self.t.log({"train/seconds_to_first_step": time.perf_counter() - self.started}, self.step)
                self._check_finite(mean)
                seconds = time.perf_counter() - t0
                self._log_step(mean, lr, seconds / len(window), self.t.data_wait(seconds, len(window), self.step))
                first, window, t0 = False, [], time.perf_counter()
            if evaluate:
                val = self._evaluate()
                if self.step > self.logged_until:
                    # bits per pixel token (a token is one pixel's 9-bit palette colour), not the literature's
                    # bits/dim, which counts the three 8-bit channels of an unquantized pixel
                    self.t.log({"val/loss": val, "val/bits_per_token": val / math.log(2)}, self.step)
            if end_of_epoch or self.step == total:
                self._completions(-(-self.step // per_epoch))
            if save:
                self._save()
            if evaluate or save:
                t0 = time.perf_counter()  # the step time measures steps, not evaluations or checkpoints
        self.t.log_data_wait_share(self.step)

    def _maybe_die(self) -> None:
        f = self.faults
        if self.step == f.fail_at_step and self.t.rank == f.fail_rank and \
                not (self.run_dir / "fault_injected").exists():
            (self.run_dir / "fault_injected").write_text("")
            os._exit(1)  # test fault: an abrupt worker death, as a lost node gives

    def _check_finite(self, mean: float) -> None:
        if math.isfinite(mean):
            return
        if self.t.client:
            self.t.log({"train/nonfinite_loss": 1.0}, self.step)
            (self.run_dir / NONFINITE).write_text(f"loss {mean} at step {self.step}\n")
        raise FloatingPointError(f"loss is {mean} at step {self.step}: stopping (lower optim.lr, or check the data)")

    def _log_step(self, mean: float, lr: float, seconds: float, data_wait: dict) -> None:
        if not self.t.client or self.step <= self.logged_until:
            return
        tok_s = self.spec.global_batch * self.model.cfg.n_ctx / seconds
        vals = {"train/loss": mean, "train/bits_per_token": mean / math.log(2), "train/lr": lr,
                "train/tokens_per_s": tok_s, **data_wait,
                "train/mfu": tok_s * self.model.cfg.train_flops_per_token() / (self.peak * self.t.world)}
        gn = self.t.engine.get_global_grad_norm()
        if gn is not None:
            vals["train/grad_norm"] = float(gn)
        self.t.log(vals, self.step)
        if self.step == 1:
            self.t.client.set_tag(self.spec.run.run_id, "mfu_peak", self.peak_note)

    def _evaluate(self) -> float:
        """Mean loss over the validation split (BERT: masks from a fixed generator, the same at every eval)."""
        import ray.train

        engine, model = self.t.engine, self.model
        engine.eval()
        total_loss, n = 0.0, 0
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in ray.train.get_dataset_shard("val").iter_torch_batches(
                    batch_size=self.t.micro, dtypes={"tokens": torch.int64}, device=self.t.device):
                x = b["tokens"]
                mask = model.bert_mask(x.cpu(), g).to(x.device) if model.cfg.objective == "bert" else None
                total_loss += engine(**model.objective_inputs(x, mask=mask)).item() * len(x)
                n += len(x)
        engine.train()
        return total_loss / max(n, 1)

    def _completions(self, epoch: int) -> None:
        """Each epoch: the first validation images, top half given, completed twice; a picture to MLflow."""
        import ray.train

        n, res = self.spec.completions, self.model.cfg.resolution
        if not n or self.model.cfg.objective != "ar":
            return
        batch = next(iter(ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=n, dtypes={"tokens": torch.int64}, device=self.t.device)))["tokens"]
        self.t.engine.eval()
        g = torch.Generator().manual_seed(epoch)
        samples = [complete(self.t.module, batch, (res // 2) * res, generator=g) for _ in range(2)]
        self.t.engine.train()
        if self.t.client:
            pal = Palette(np.asarray(self.spec.run.palette, np.float32))
            rows = [[pal.dequantize(t[i].cpu().numpy().reshape(res, res)) for t in (batch, *samples)]
                    for i in range(len(batch))]  # original | completion 1 | completion 2
            self.t.client.log_image(self.spec.run.run_id, grid(rows), f"completions/epoch_{epoch:03d}.png")

    def _save(self) -> None:
        run = self.spec.run
        centres = np.asarray(run.palette, np.float32)
        # DeepSpeed keeps one client state (rank 0's): every rank's own position goes into it, gathered
        positions = [None] * self.t.world
        dist.all_gather_object(positions, self.position)
        self.t.save(self.step, {"micro_batches": self.consumed, "positions": positions}, self.spec.keep,
                    lambda folder, weights: write_weights(folder, weights, run.model, centres, self.step))
