"""Pretrain iGPT: Ray Train workers, each a DeepSpeed engine, fed by the augmented token stream of Ray Data.

    python -m pipelines.pretrain --name s-cifar --palette_path runs/palette/palette.npy \\
        --train.path ../shared/datasets/cifar10 --val.path ../shared/datasets/cifar10 \\
        --model.size debug --deepspeed.preset cpu --scaling.workers 2
    ray job submit --working-dir . -- python -m pipelines.pretrain ... --storage_path s3://bucket/runs

The submitter names the run (``--name`` under ``--storage_path``). Re-submitting the same name continues it
from its newest complete checkpoint and keeps logging to the same MLflow run. Per-worker code: igpt/train/train_loop.py.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace

import ray

from igpt import cli, hw
from igpt.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    IngestLimits,
    ModelConfig,
    ModelTrackingConfig,
    OptimConfig,
    ScalingConfig,
    TransformConfig,
)
from igpt.data import ingest, sources
from igpt.data.palette import Palette
from igpt.data.sources import DatasetSpec
from igpt.data.stream import TrainStream
from igpt.errors import Conflict, UserError
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.model import config as model_config
from igpt.raysetup import init_ray, torch_trainer, worker_memory_gib
from igpt.storage import Loc
from igpt.track.tracking import JobRun, end_status, flatten, log_splits
from igpt.train import checkpoints, deepspeed_config, schedule
from igpt.train import plan as memplan
from igpt.train.checkpoints import newest_complete, read_marker
from igpt.train.faults import Faults
from igpt.train.lease import Lease
from igpt.train.schedule import Schedule
from igpt.train.train_loop import NONFINITE, PretrainSpec, train_loop
from igpt.train.trainer import RunSpec


@dataclass
class PretrainJobConfig:
    """Pretrain iGPT with Ray Train + DeepSpeed on the augmented, tokenized stream of a dataset."""

    name: str = _help("run name: the run lives in <storage_path>/<name>; re-submitting the same name resumes it",
                      default="pretrain")
    storage_path: PathStr = _help("where runs keep checkpoints and state (shared storage on a cluster)",
                                  default="runs/train")
    palette_path: PathStr = _help("palette .npy from fit_palette (required)", default="")
    train: DatasetSpec = field(default_factory=DatasetSpec)
    val: DatasetSpec = field(default_factory=lambda: DatasetSpec(split="test"))
    transform: TransformConfig = field(default_factory=lambda: TransformConfig(augment=True))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    steps: int | None = _help("the run's length in optimizer steps; the stream cycles through as many epochs as "
                              "they need (each epoch its own augmentations); default: the size's recipe (paper: "
                              "1M; 2M for XL); >= 1", default=None)
    schedule_fraction: float = _help("run this fraction of the resolved schedule, warm-up and cosine decay scaled "
                                     "alike (sweep trials); in (0, 1]", default=1.0)
    dry_run: bool = _help("resolve the recipe, count the split's records, print the schedule as one JSON object "
                          "and exit without training", default=False)
    eval_every: int = _help("validation loss every this many steps, besides every epoch (0: epochs only)",
                            default=0)
    val_images: int = _help("validation images per evaluation (0: the whole split)", default=1000)
    completions: int = _help("validation images completed from their top half in each epoch's picture",
                             default=8)
    log_every: int = _help("training metrics every this many steps (the mean loss since the last; a diverged loss "
                           "is found there): 1 on a CPU, 10-100 on GPUs, where each logged step waits for the "
                           "device; >= 1", default=1)
    limits: IngestLimits = field(default_factory=IngestLimits)
    """the error budget of the training and evaluation streams (checked inside the stream)"""
    tracking: ModelTrackingConfig = field(default_factory=ModelTrackingConfig)

    def __post_init__(self) -> None:
        if (self.steps is not None and self.steps < 1) or self.eval_every < 0 or self.val_images < 0 or \
                self.log_every < 1:
            raise ValueError("steps and log_every must be >= 1; eval_every and val_images >= 0")
        if not 0.0 < self.schedule_fraction <= 1.0:
            raise ValueError(f"schedule_fraction must be in (0, 1], got {self.schedule_fraction}")


def datasets(cfg: PretrainJobConfig, palette: Palette, plan: sources.Plan, val_plan: sources.Plan, epochs: int,
             report=None):
    """The training stream (``epochs`` passes, each epoch its own augmentations, its own order of read pieces and
    of records; each worker builds its own share, igpt/data/stream.py) and the validation split, materialized
    once."""
    lut = ray.put(palette.lut)
    log = ingest.error_log(cfg.limits, report)  # the budget is enforced in the stream: no driver loop reads it
    t = cfg.transform
    spec = ingest.TransformSpec.of(t, cfg.model.resolution, cfg.limits.max_pixels, epoch=0)
    train = TrainStream(cfg.train, ray.put(plan), tuple(u.take for u in plan.units), epochs, cfg.scaling.workers,
                        lut, spec, log)
    val_spec = ingest.TransformSpec.of(t, cfg.model.resolution, cfg.limits.max_pixels, train=False, epoch=0)
    val = ingest.tokenize(sources.read(cfg.val, val_plan), lut, val_spec, log).select_columns(["tokens"])
    if cfg.val_images:
        val = val.limit(cfg.val_images)
    return train, ingest.materialize_eval(val), log


def resolve(cfg: PretrainJobConfig) -> tuple[Schedule, sources.Plan, dict, dict]:
    """Everything a run needs decided before Ray starts: the schedule (recipe, flags, the split's record count),
    the DeepSpeed config and the model config. Raises ValueError with what to change."""
    cfg.transform.check_model(cfg.model.resolution)
    plan = sources.check(cfg.train)
    if plan.count is None:
        raise UserError(f"the training split's record count is unknown for format {cfg.train.format}")
    sched = schedule.resolve(cfg, plan.count)
    ds = replace(cfg.deepspeed, preset=sched.preset, micro_batch=sched.micro_batch)
    optim = replace(cfg.optim, global_batch=sched.global_batch)
    ds_conf, model_over = deepspeed_config.build(ds, optim, cfg.scaling.workers, cfg.scaling.use_gpu)
    model_cfg = cli.to_dict(cfg.model)
    for k, v in model_over.items():  # the preset's model needs (XL: activation checkpointing), unless set
        if k == "activation_checkpointing" and v and not cfg.model.activation_checkpointing:
            model_cfg[k] = v
    return sched, plan, ds_conf, model_cfg


def dry_run(cfg: PretrainJobConfig) -> dict:
    """``--dry_run``: the resolved schedule and DeepSpeed settings as one JSON object; nothing trains."""
    sched, _, ds_conf, model_cfg = resolve(cfg)
    out = sched.as_dict()
    out.update(zero_stage=ds_conf["zero_optimization"].get("stage", 0),
               precision=deepspeed_config.precision_of(ds_conf),
               activation_checkpointing=model_cfg["activation_checkpointing"],
               params=cfg.model.param_count(), tokens=sched.total_steps * sched.global_batch * cfg.model.n_ctx)
    print(json.dumps(out))
    return out


def resolved_params(cfg: PretrainJobConfig, sched: Schedule, ds_conf: dict, model_cfg: dict) -> dict:
    """The run's params for MLflow: the config with every recipe and preset default replaced by the value that
    ran (no "None" where DeepSpeed's config says 2); the full config stays the config.json artifact."""
    params = flatten(cli.to_dict(cfg))
    optimizer, offload_params = deepspeed_config.offloads(ds_conf)
    params.update({"deepspeed.zero_stage": ds_conf["zero_optimization"].get("stage", 0),
                   "deepspeed.precision": deepspeed_config.precision_of(ds_conf),
                   "deepspeed.offload_optimizer": optimizer, "deepspeed.offload_params": offload_params,
                   "deepspeed.grad_accum": ds_conf["gradient_accumulation_steps"],
                   "model.activation_checkpointing": model_cfg["activation_checkpointing"],
                   "steps.schedule_fraction": cfg.schedule_fraction})
    params.update({"model.params": cfg.model.param_count(), "steps": sched.total_steps,
                   "steps.total": sched.total_steps, "steps.per_epoch": sched.steps_per_epoch,
                   "steps.warmup": sched.warmup_steps, "optim.warmup_steps": sched.warmup_steps,
                   "optim.global_batch": sched.global_batch, "deepspeed.micro_batch": sched.micro_batch,
                   "deepspeed.preset": sched.preset, "data.train_records": sched.records,
                   "data.epochs_planned": sched.epochs})
    return params


def run(cfg: PretrainJobConfig) -> dict:
    if cfg.dry_run:
        return dry_run(cfg)
    if not cfg.palette_path:
        raise UserError("palette_path is required (fit one with pipelines.fit_palette)")
    sched, plan, ds_conf, model_cfg = resolve(cfg)
    hw.check_cpu_precision(deepspeed_config.precision_of(ds_conf), cfg.scaling.use_gpu, "this run")
    palette = Palette.load(cfg.palette_path)
    if len(palette.centres) != cfg.model.n_colors:
        raise UserError(f"palette has {len(palette.centres)} colours, model.n_colors is {cfg.model.n_colors}")
    if cfg.train.format == "tokens":  # pre-tokenized: of this palette and size; its passes are the augmentations
        sources.check_token_split(plan, palette.digest, cfg.model.resolution, "--train.path")
        passes = int(plan.meta.get("passes", 1))
        if passes < sched.epochs:
            print(f"note: the token split holds {passes} augmented pass(es) and the run plans {sched.epochs} "
                  f"epochs: epoch e reads pass e mod {passes}, so its crops and flips repeat", flush=True)
    run_dir = Loc(cfg.storage_path) / cfg.name  # a local folder, or s3://… / gs://…
    with Lease(run_dir):  # one job per run name: a second one fails now, before Ray starts, naming the owner
        check_resumable(run_dir, cfg.scaling.workers)
        mem = preflight_memory(cfg, ds_conf, model_cfg)
        micro = fill_micro_batch(cfg, ds_conf, model_cfg, mem)
        if micro != sched.micro_batch:
            cfg = replace(cfg, deepspeed=replace(cfg.deepspeed, micro_batch=micro))
            sched, plan, ds_conf, model_cfg = resolve(cfg)
        return _train(cfg, sched, plan, ds_conf, model_cfg, palette, run_dir)


class StorageUnwritable(UserError):
    """The run's storage failed mid-run (a full or read-only volume, a bucket's lost permission)."""


def preflight_memory(cfg: PretrainJobConfig, ds_conf: dict, model_cfg: dict) -> float | None:
    """Refuse, before any data loads or run is recorded, a configuration that ``igpt plan`` says will not fit in a
    worker's memory (XL on a CPU worker would otherwise read data for minutes and then die of it). Returns that
    memory in GiB (None with --scaling.ignore_plan)."""
    if cfg.scaling.ignore_plan:
        return None
    if cfg.scaling.worker_mem_gib is not None:
        mem, where = cfg.scaling.worker_mem_gib, "--scaling.worker_mem_gib"
    else:
        init_ray()
        try:
            mem, where = worker_memory_gib(cfg.scaling.workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker)
        except RuntimeError as e:
            raise UserError(f"cannot check this run's memory plan: {e}; give --scaling.worker_mem_gib (GiB per "
                            "worker) or --scaling.ignore_plan") from None
    model = replace(cfg.model, activation_checkpointing=model_cfg["activation_checkpointing"])
    p = memplan.of_run(model, ds_conf, cfg.scaling.workers, mem)
    if cfg.scaling.use_gpu and cfg.deepspeed.micro_batch is None:  # judged at the micro batch it will get
        p = replace(p, micro_batch=memplan.best_micro_batch(p) or 1)
    why = memplan.refusal(p, where)
    if why:
        raise UserError(why)
    return mem


def fill_micro_batch(cfg: PretrainJobConfig, ds_conf: dict, model_cfg: dict, mem: float | None) -> int:
    """The micro batch a run trains with: the one given (--deepspeed.micro_batch); on GPU workers otherwise the
    largest that ``igpt plan`` fits in the measured memory (larger matmuls, fewer accumulation passes: the GPU
    kept busy); else the recipe's (a CPU run's is sized for its speed, not its memory)."""
    if cfg.deepspeed.micro_batch is not None or not cfg.scaling.use_gpu or mem is None:
        return ds_conf["train_micro_batch_size_per_gpu"]
    model = replace(cfg.model, activation_checkpointing=model_cfg["activation_checkpointing"])
    return memplan.best_micro_batch(memplan.of_run(model, ds_conf, cfg.scaling.workers, mem)) or 1


def check_resumable(run_dir: Loc, workers: int) -> None:
    """Refuse, before Ray starts, to resume a run with another worker count than wrote its newest checkpoint:
    each worker's data position is a place in its own share of the stream, dealt for that count, and DeepSpeed's
    shards are per rank; neither maps to another count."""
    ckpt = newest_complete(run_dir, report=False)
    if ckpt is None:
        return
    written = read_marker(ckpt).get("world_size", workers)
    if written != workers:
        raise Conflict(f"{ckpt} was written by {written} workers and this job has --scaling.workers {workers}: "
                       f"resume with --scaling.workers {written}, or start a new --name (a fine-tuning or probe "
                       "run reads its weights.pt with any worker count)")


def _train(cfg: PretrainJobConfig, sched: Schedule, plan: sources.Plan, ds_conf: dict, model_cfg: dict,
           palette: Palette, run_dir: Loc) -> dict:
    (run_dir / NONFINITE).unlink()  # a re-submission is a new attempt (e.g. with a lower lr)
    # one MLflow run per named run: a re-submission continues it
    with JobRun.open(cfg.tracking, cfg.storage_path, cfg.name, "pretrain", cli.to_dict(cfg),
                     params=resolved_params(cfg, sched, ds_conf, model_cfg), id_file=run_dir / "mlflow_run_id") as job:
        if not job.resumed:
            job.log_dict(ds_conf, "deepspeed_config.json")
            job.log_artifact(str(Palette.local_file(cfg.palette_path)), "palette")
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_conf, indent=2))
        init_ray()
        val_plan = sources.check(cfg.val)
        if cfg.val.format == "tokens":
            sources.check_token_split(val_plan, palette.digest, cfg.model.resolution, "--val.path")
            if val_plan.meta.get("augment"):
                raise UserError(f"--val.path {cfg.val.path} holds augmented tokens (random crops and flips): "
                                "validate on its source's images, or on a split quantized without --transform.augment")
        if not job.resumed:
            log_splits(job.client, job.run_id, {"train": (cfg.train, plan.count), "val": (cfg.val, val_plan.count)})
        train, val, log = datasets(cfg, palette, plan, val_plan, sched.epochs, report=run_dir / "errors.tsv")
        spec = PretrainSpec(
            stream=train,
            run=RunSpec(ds_config=ds_conf, model=model_cfg, seed=cfg.transform.seed,
                        warmup_steps=sched.warmup_steps, total_steps=sched.total_steps, run_id=job.run_id,
                        tracking_uri=job.uri, use_gpu=cfg.scaling.use_gpu, palette=palette.centres.tolist(),
                        run_dir=str(run_dir)),
            steps_per_epoch=sched.steps_per_epoch, records=sched.records, epochs=sched.epochs,
            global_batch=sched.global_batch, eval_every=cfg.eval_every, completions=cfg.completions,
            log_every=cfg.log_every,
            checkpoint_every=cfg.checkpoint.every_steps, keep=cfg.checkpoint.keep)
        try:
            result = job.wait(_trainer(cfg, spec, {"val": val}).fit)
            if result.error:
                raise result.error
        except BaseException as e:  # the report exists even when the run dies (a stream that ran dry points to it)
            if end_status(e) != "FAILED":  # stopped: SIGKILL follows within seconds, for ending the MLflow run
                raise
            with contextlib.suppress(Exception):  # best effort: never hide the run's own error
                ingest.write_error_report(run_dir / "errors.tsv", ray.get(log.all_errors.remote(), timeout=10))
            broken = run_dir.unwritable()
            if broken:  # the workers' errors are about files they could not write or find: say what went wrong
                raise StorageUnwritable(
                    f"the run's storage cannot be written any more ({broken}); the run ended FAILED and its "
                    f"newest complete checkpoint stays the one to resume from: make {run_dir} writable and "
                    f"re-submit --name {cfg.name}") from e
            raise
        read, skipped, model_uri = _record_end(cfg, sched, job, log, run_dir)
    summary = {"records_read": read, "records_skipped": skipped, "run_id": job.run_id, "tracking_uri": job.uri,
               "run_dir": str(run_dir), "total_steps": sched.total_steps, "resumed": job.resumed,
               "checkpoint": str(result.checkpoint.path) if result.checkpoint else None, "model_uri": model_uri}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"trained {sched.total_steps} steps; MLflow run {job.run_id} at {job.uri}; checkpoints in {run_dir}")
    return summary


def _record_end(cfg: PretrainJobConfig, sched: Schedule, job: JobRun, log, run_dir: Loc) -> tuple[int, int, str | None]:
    """A finished run's records: the error report, the data counts, the numbers the runs table sorts by (the same
    formulas as ``igpt compare``), the final weights as an MLflow model. Returns (read, skipped, model URI)."""
    report = ingest.write_error_report(run_dir / "errors.tsv", ray.get(log.all_errors.remote()))
    read, skipped = ray.get(log.stats.remote())
    job.log_text(report, "errors.tsv")  # the text just written, not read back from storage
    job.log_metric("data/records_read", read)
    job.log_metric("data/records_skipped", skipped)
    m = cfg.model
    tokens, flops = model_config.train_compute(m.n_layer, m.d_model, m.resolution, sched.total_steps,
                                               sched.global_batch, m.n_colors)
    final = {"summary/tokens": tokens, "summary/train_flops": flops}
    val_loss = job.client.get_run(job.run_id).data.metrics.get("val/loss")  # the latest: the final one
    if val_loss is not None:
        final["summary/final_val_loss"] = val_loss
    for k, v in final.items():
        job.log_metric(k, v)
    if not cfg.tracking.log_model:
        return read, skipped, None
    from igpt.track.models import log_pretrained

    # the final step always saves: the newest complete checkpoint is the end
    return read, skipped, log_pretrained(job, checkpoints.resolve(run_dir), cfg.tracking.register).model_uri


def _trainer(cfg: PretrainJobConfig, spec: PretrainSpec, datasets: dict):
    # test faults (igpt.train.faults) travel beside the config, never in it or in the run's params; the training
    # stream is no Ray Train dataset: each worker reads its own share from its own position
    return torch_trainer(train_loop, {"spec": spec, "faults": Faults.from_env().as_dict()}, cfg.scaling, cfg.name,
                         cfg.storage_path, datasets, max_failures=cfg.checkpoint.max_failures)
