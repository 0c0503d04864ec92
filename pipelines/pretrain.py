"""Pretrain iGPT: Ray Train workers, each a DeepSpeed engine, fed by the augmented token stream of Ray Data.

    python -m pipelines.pretrain --name s-cifar --palette_path runs/palette/palette.npy \\
        --train.path ../shared/datasets/cifar10 --val.path ../shared/datasets/cifar10 \\
        --model.size debug --deepspeed.preset cpu --scaling.workers 2
    ray job submit --working-dir . -- python -m pipelines.pretrain ... --storage_path s3://bucket/runs

The submitter names the run (``--name`` under ``--storage_path``). Re-submitting the same name continues it
from its newest complete checkpoint and keeps logging to the same MLflow run. Per-worker code: igpt/train_loop.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray

from igpt.tracking import stop_on_sigterm
from igpt import cli, deepspeed_config, ingest, sources
from igpt.config import PretrainJobConfig
from igpt.palette import Palette
from igpt.raysetup import init_ray
from igpt.train_loop import NONFINITE, train_loop


def datasets(cfg: PretrainJobConfig, palette: Palette):
    """The training stream (every epoch's own augmentations, one after another) and the validation split."""
    plan = sources.check(cfg.train)
    val_plan = sources.check(cfg.val)
    if plan.count is None:
        raise ValueError("the training split's size must be known up front (parquet, imagefolder, cifar, stl10)")
    count = min(plan.count, cfg.train.max_images) if cfg.train.max_images else plan.count
    lut = ray.put(palette.lut)
    log = ingest.ErrorLog.remote()
    t = cfg.transform
    epochs = []
    for e in range(cfg.epochs):
        spec = ingest.TransformSpec(t.recipe, cfg.model.resolution, t.augment, t.seed, e, t.draft)
        epochs.append(ingest.tokenize(sources.read(cfg.train, plan), lut, spec, log).select_columns(["tokens"]))
    train = epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]
    val_spec = ingest.TransformSpec(t.recipe, cfg.model.resolution, False, t.seed, 0, t.draft)
    val = ingest.tokenize(sources.read(cfg.val, val_plan), lut, val_spec, log).select_columns(["tokens"])
    if cfg.val_images:
        val = val.limit(cfg.val_images)
    return train, ingest.materialize_eval(val), count, log


def _execution_options(cfg: PretrainJobConfig):
    """With ``deterministic``: ordered execution, so the splitter deals the same blocks to the same workers in
    the same order every time (it gives each block to the worker with the fewest rows so far)."""
    from ray.data import ExecutionOptions

    opts = ExecutionOptions()
    opts.preserve_order = cfg.deterministic
    return opts


def run(cfg: PretrainJobConfig) -> dict:
    import mlflow
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from igpt.tracking import default_tracking_uri, end_status, ensure_experiment, flatten, interruptible

    if not cfg.palette_path:
        raise ValueError("palette_path is required (fit one with pipelines.fit_palette)")
    if cfg.transform.resolution != cfg.model.resolution:
        raise ValueError(f"transform.resolution ({cfg.transform.resolution}) must equal model.resolution "
                         f"({cfg.model.resolution})")
    palette = Palette.load(cfg.palette_path)
    if len(palette.centres) != cfg.model.n_colors:
        raise ValueError(f"palette has {len(palette.centres)} colours, model.n_colors is {cfg.model.n_colors}")
    run_dir = Path(cfg.storage_path).resolve() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / NONFINITE).unlink(missing_ok=True)  # a re-submission is a new attempt (e.g. with a lower lr)
    ds_conf, model_over = deepspeed_config.build(cfg.deepspeed, cfg.optim, cfg.scaling.workers, cfg.scaling.use_gpu)
    model_cfg = cli.to_dict(cfg.model)
    for k, v in model_over.items():  # the preset's model needs (XL: activation checkpointing), unless set
        if k == "activation_checkpointing" and v and not cfg.model.activation_checkpointing:
            model_cfg[k] = v
    init_ray()
    train, val, count, log = datasets(cfg, palette)
    steps_per_epoch = count // cfg.optim.global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{count} training images make no full global batch of {cfg.optim.global_batch}")
    total = min(cfg.max_steps, steps_per_epoch * cfg.epochs) if cfg.max_steps else steps_per_epoch * cfg.epochs
    warmup = min(total, round(cfg.optim.warmup_epochs * steps_per_epoch))

    # one MLflow run per named run: a re-submission continues it
    uri = cfg.tracking.tracking_uri or default_tracking_uri(Path(cfg.storage_path))
    exp_id = ensure_experiment(uri, cfg.tracking.experiment, Path(cfg.storage_path) / "mlartifacts")
    id_file = run_dir / "mlflow_run_id"
    resumed = id_file.exists()
    client = mlflow.tracking.MlflowClient(uri)
    if resumed:
        run_id = id_file.read_text().strip()
    else:
        tags = {"igpt.job": "pretrain"}
        if cfg.tracking.parent_run_id:  # e.g. a trial of a sweep: nested under the sweep's run
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        run_id = client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.name, tags=tags).info.run_id
        id_file.write_text(run_id)
        params = flatten(cli.to_dict(cfg))
        params.update({"model.params": cfg.model.param_count(), "steps.total": total,
                       "steps.per_epoch": steps_per_epoch, "steps.warmup": warmup})
        items = list(params.items())
        for i in range(0, len(items), 90):
            from mlflow.entities import Param

            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in items[i:i + 90]])
        client.log_dict(run_id, cli.to_dict(cfg), "config.json")
        client.log_dict(run_id, ds_conf, "deepspeed_config.json")
        client.log_artifact(run_id, cfg.palette_path, "palette")
    (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_conf, indent=2))

    meta = {"total_steps": total, "warmup_steps": warmup, "steps_per_epoch": steps_per_epoch,
            "ds_config": ds_conf, "model": model_cfg, "seed": cfg.transform.seed, "run_dir": str(run_dir),
            "run_id": run_id, "tracking_uri": uri, "palette": palette.centres.tolist()}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cli.to_dict(cfg), "meta": meta},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=str(Path(cfg.storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
        datasets={"train": train, "val": val},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=_execution_options(cfg)),
    )
    try:
        result = interruptible(trainer.fit)
    except BaseException as e:  # FAILED, or KILLED when stopped (ray job stop): never left RUNNING
        client.set_terminated(run_id, end_status(e))
        raise
    if result.error:
        client.set_terminated(run_id, "FAILED")
        raise result.error
    read, skipped = ray.get(log.stats.remote())
    ingest.write_error_report(run_dir / "errors.tsv", ray.get(log.all_errors.remote()))
    client.log_artifact(run_id, str(run_dir / "errors.tsv"))
    client.log_metric(run_id, "data/records_read", read)
    client.log_metric(run_id, "data/records_skipped", skipped)
    client.set_terminated(run_id, "FINISHED")
    summary = {"records_read": read, "records_skipped": skipped, "run_id": run_id, "tracking_uri": uri, "run_dir": str(run_dir), "total_steps": total,
               "resumed": resumed, "checkpoint": str(result.checkpoint.path) if result.checkpoint else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"trained {total} steps; MLflow run {run_id} at {uri}; checkpoints in {run_dir}")
    return summary


def main(argv: list[str] | None = None) -> None:
    stop_on_sigterm()  # ray job stop -> the MLflow run ends KILLED
    run(cli.parse(PretrainJobConfig, argv, prog="python -m pipelines.pretrain"))


if __name__ == "__main__":
    main(sys.argv[1:])
