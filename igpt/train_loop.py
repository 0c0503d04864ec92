"""The per-worker pretraining loop (runs inside each Ray Train worker; the driver is ``pipelines/pretrain.py``).

Each worker builds the model, wraps it in a DeepSpeed engine (ZeRO stage, precision, offload from the generated
config), streams its share of the augmented token stream, and every ``checkpoint.every_steps`` saves its
DeepSpeed shard plus the client state DeepSpeed does not keep (step, data position, RNG states), and rank 0 the
gathered fp32 weights (igpt/checkpoints.py). Rank 0 writes a completion marker last; a checkpoint without it was
torn mid-write and is never loaded.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from igpt.checkpoints import MARKER, full_fp32_state_dict, newest_complete, prune, write_marker, write_weights
from igpt.faults import Faults
from igpt.model import IGPT
from igpt.optim import lr_factor
from igpt.sampling import complete, grid

NONFINITE = "nonfinite_loss"  # written when the loss diverges; stops Ray Train's automatic retries


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


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


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def device_peak_flops(use_gpu: bool) -> tuple[float, str]:
    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for k, v in GPU_PEAK_BF16.items():
            if k in name:
                return v, f"{name}: {v / 1e12:.0f} TFLOP/s dense bf16 (datasheet)"
    peak = cpu_peak_flops()
    return peak, f"CPU: {peak / 1e9:.1f} GFLOP/s measured fp32 matmul (1024^2) on this worker's threads"


def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train
    from mlflow.tracking import MlflowClient

    from igpt import cli
    from igpt.config import PretrainJobConfig

    cfg = cli.from_dict(PretrainJobConfig, config["cfg"])
    meta = config["meta"]
    faults = Faults(**meta["faults"])  # tests only (igpt.faults): never in the config or the params
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.scaling.use_gpu else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")

    torch.manual_seed(meta["seed"])  # the same initial weights on every rank
    model = IGPT(cli.from_dict(type(cfg.model), meta["model"]))
    total, warmup = meta["total_steps"], meta["warmup_steps"]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=meta["ds_config"],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total)))
    accum = engine.gradient_accumulation_steps()
    micro = engine.train_micro_batch_size_per_gpu()

    # ---- resume from the newest complete checkpoint -----------------------------------------------------
    step, consumed = 0, 0
    run_dir = Path(meta["run_dir"])
    if (run_dir / NONFINITE).exists():  # Ray Train restarts failed workers; retrying a diverged run is futile
        raise FloatingPointError(f"this run diverged ({(run_dir / NONFINITE).read_text().strip()}); not retrying")
    ckpt = newest_complete(run_dir, report=rank == 0)  # the newest that verifies; skipped ones say why
    if ckpt is None and ray.train.get_checkpoint() is not None:
        raise RuntimeError(f"Ray reports a checkpoint but none under {run_dir} is complete")
    if ckpt is not None:
        state = json.loads((ckpt / MARKER).read_text())
        if state.get("world_size", world) != world:
            # the data position is per worker and DeepSpeed's shards per rank: neither maps to another count
            raise ValueError(f"{ckpt} was written by {state['world_size']} workers, this run has {world}: resume "
                             f"with --scaling.workers {state['world_size']}, or start a new --name")
        path, client = engine.load_checkpoint(str(ckpt), tag=state["tag"])
        if path is None:  # DeepSpeed only warns when 'latest' is missing; a checkpoint was expected here
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt} (tag {state['tag']})")
        step, consumed = client["step"], client["micro_batches"]
        if rank >= len(client["rng"]):
            raise ValueError(f"{ckpt} holds RNG states of {len(client['rng'])} ranks, not of rank {rank}")
        _set_rng_state(client["rng"][rank])
        if rank == 0:
            print(f"resumed from {ckpt.name}: step {step}, {consumed} micro-batches consumed per worker")

    client = MlflowClient(meta["tracking_uri"]) if rank == 0 else None
    # steps this MLflow run already has (from an attempt that died after logging them): a resumed run replays
    # them bit for bit (deterministic data order), so they are not logged twice
    logged_until = max((m.step for m in client.get_metric_history(meta["run_id"], "train/loss")), default=0) \
        if client else 0
    peak, peak_note = device_peak_flops(cfg.scaling.use_gpu)
    flops_per_token = model.cfg.train_flops_per_token()
    n_ctx = model.cfg.n_ctx

    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(batch_size=micro, drop_last=True, dtypes={"tokens": torch.int64},
                                       device=device)
    it = iter(batches)

    def next_batch() -> torch.Tensor:
        try:
            return next(it)["tokens"]
        except StopIteration:  # the planned passes hold a spare epoch; only many undecodable records get here
            raise RuntimeError(
                f"the training stream ended on worker {rank} after {consumed} micro-batches of {micro} at step "
                f"{step} of {total}: it holds {meta['epochs']} passes over {meta['records']} records, one more "
                f"than the steps need, so more records failed to decode than a whole epoch (see the run's "
                f"errors.tsv)") from None

    for _ in range(consumed):  # data position: skip what the checkpointed run already trained on
        next_batch()

    def evaluate() -> float:
        engine.eval()
        total_loss, n = 0.0, 0
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in ray.train.get_dataset_shard("val").iter_torch_batches(
                    batch_size=micro, dtypes={"tokens": torch.int64}, device=device):
                x = b["tokens"]
                mask = engine.module.bert_mask(x.cpu(), g).to(device) if model.cfg.objective == "bert" else None
                total_loss += engine.module.loss(x, mask=mask).item() * len(x)
                n += len(x)
        engine.train()
        return total_loss / max(n, 1)

    centres = np.asarray(meta["palette"], np.float32)
    res = model.cfg.resolution

    def completions(epoch: int) -> None:
        """Each epoch: the first validation images, top half given, completed twice; a picture to MLflow."""
        if not cfg.completions or model.cfg.objective != "ar":
            return
        batch = next(iter(ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=cfg.completions, dtypes={"tokens": torch.int64}, device=device)))["tokens"]
        engine.eval()
        g = torch.Generator().manual_seed(epoch)
        half = (res // 2) * res
        samples = [complete(engine.module, batch, half, generator=g) for _ in range(2)]
        engine.train()
        if rank == 0:
            from igpt.palette import Palette

            pal = Palette(centres)
            rows = [[pal.dequantize(t[i].cpu().numpy().reshape(res, res)) for t in (batch, *samples)]
                    for i in range(len(batch))]  # original | completion 1 | completion 2
            client.log_image(meta["run_id"], grid(rows), f"completions/epoch_{epoch:03d}.png")

    def save(step: int) -> None:
        tag = f"step{step}"
        with tempfile.TemporaryDirectory() as tmp:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state())
            engine.save_checkpoint(tmp, tag=tag, client_state={"step": step, "micro_batches": consumed, "rng": rng})
            weights = full_fp32_state_dict(engine)  # collective; the plain file evaluation loads
            if rank == 0:
                write_weights(Path(tmp), weights, meta["model"], centres, step)
            name = f"step_{step:08d}"
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
        dist.barrier()  # every rank's upload has returned
        if rank == 0:  # written last, into the persisted folder: its presence means every rank's files are in
            write_marker(run_dir / name, {"tag": tag, "step": step, "world_size": world})
            prune(run_dir, cfg.checkpoint.keep)  # also what an earlier, stopped attempt left beyond keep
        dist.barrier()

    engine.train()
    steps_per_epoch = meta["steps_per_epoch"]
    while step < total:
        t0 = time.perf_counter()
        losses = []
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside its last engine.step)
        for _ in range(accum):
            x = next_batch()
            consumed += 1
            # BERT: each rank draws its own masks, a function of (seed, rank, micro-batch), so data-parallel ranks
            # mask independently (the paper) and a resumed run draws the same masks again
            mask = bert_mask(model, x, meta["seed"], rank, consumed) if model.cfg.objective == "bert" else None
            loss = engine.module.loss(x, mask=mask)
            if step + 1 == faults.nan_at_step:
                loss = loss * float("nan")  # fault injection for tests: a diverged step, gradients included
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        step += 1
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        mean = (mean / world).item()
        if step == faults.fail_at_step and rank == faults.fail_rank and not (run_dir / "fault_injected").exists():
            (run_dir / "fault_injected").touch()
            os._exit(1)  # an abrupt worker death, as a lost node gives
        if not math.isfinite(mean):
            if client:
                client.log_metric(meta["run_id"], "train/nonfinite_loss", 1.0, step=step)
                (run_dir / NONFINITE).write_text(f"loss {mean} at step {step}\n")
            raise FloatingPointError(f"loss is {mean} at step {step}: stopping (lower optim.lr, or check the data)")
        dt = time.perf_counter() - t0
        if client and step > logged_until:
            tok_s = meta["global_batch"] * n_ctx / dt
            gn = engine.get_global_grad_norm()
            from mlflow.entities import Metric

            ms = int(time.time() * 1000)
            vals = {"train/loss": mean, "train/bits_per_dim": mean / math.log(2),
                    "train/lr": lr, "train/tokens_per_s": tok_s,
                    "train/mfu": tok_s * flops_per_token / (peak * world)}
            if gn is not None:
                vals["train/grad_norm"] = float(gn)
            client.log_batch(meta["run_id"], metrics=[Metric(k, v, ms, step) for k, v in vals.items()])
            if step == 1:
                client.set_tag(meta["run_id"], "mfu_peak", peak_note)
        end_of_epoch = step % steps_per_epoch == 0
        if end_of_epoch or (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            val = evaluate()
            if client and step > logged_until:
                client.log_metric(meta["run_id"], "val/loss", val, step=step)
                client.log_metric(meta["run_id"], "val/bits_per_dim", val / math.log(2), step=step)
        if end_of_epoch or step == total:
            completions(-(-step // steps_per_epoch))
        if step % cfg.checkpoint.every_steps == 0 or step == total:
            save(step)
