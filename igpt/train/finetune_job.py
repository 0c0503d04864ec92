"""Fine-tune a pretrained iGPT for classification (the paper's section 3.3): a Ray Tune sweep of the learning
rate, each trial early-stopped on held-out validation accuracy, then the best refitted on train + held-out for its
best epoch count and evaluated once on the test split. Each run is a Ray Train job of DeepSpeed engines
(``igpt.train.finetune_loop``: last layer pooled, a linear head, L_CLF + L_GEN). The README's "Fine-tuning" says
what is logged and where each file lies.

    python -m pipelines.finetune --name cifar-ft --checkpoint runs/train/s-cifar \\
        --train.path ../shared/datasets/cifar10 --test.path ../shared/datasets/cifar10 --scaling.workers 2
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray

from igpt import cli, hw, tune_space
from igpt.config import DeepSpeedConfig, IngestLimits, OptimConfig, ScalingConfig, TrackingConfig, TransformConfig
from igpt.data import ingest
from igpt.data.sources import DatasetSpec
from igpt.errors import Conflict, UserError
from igpt.eval.ensemble import N_MASKS
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.raysetup import experiment_name, init_ray, local_cpus, named_trainable, torch_trainer
from igpt.storage import Loc, is_remote
from igpt.track.tags import TAG_CHECKPOINT, TAG_PRETRAIN_RUN_ID
from igpt.track.tracking import JobRun, lineage_tags
from igpt.train import checkpoints, deepspeed_config
from igpt.train.finetune_loop import FinetuneSpec
from igpt.train.trainer import RunSpec


@dataclass
class FinetuneJobConfig:
    """Fine-tune a pretrained iGPT as a classifier (the paper's recipe: the last layer's output average-pooled over
    the sequence, a linear head, loss L_CLF + L_GEN), sweeping the learning rate with Ray Tune on a held-out share
    of the training split with early stopping on validation accuracy, then refitting the best learning rate on
    train + held-out for the best trial's number of epochs and evaluating once on the test split."""

    name: str = _help("job name: it lives in <storage_path>/<name>/ (lr_<lr>/ per trial, refit/, tune/)",
                      default="finetune")
    storage_path: PathStr = _help("where the job keeps its runs (shared storage on a cluster); the default MLflow "
                                  "store is <storage_path>/mlflow.db", default="runs/finetune")
    checkpoint: PathStr = _help("a pretraining run folder (its newest complete checkpoint), a step_* folder or a "
                                "weights.pt (required)", default="")
    palette_path: PathStr = _help("optional: the run's palette .npy with its cached lookup table (must equal the "
                                  "checkpoint's palette); without it the table is built once and kept in the job "
                                  "folder", default="")
    train: DatasetSpec = field(default_factory=DatasetSpec)
    test: DatasetSpec = field(default_factory=lambda: DatasetSpec(split="test"))
    holdout: float = _help("share of the training split held out as validation (by a hash of the key); in (0, 1)",
                           default=0.1)
    n_classes: int = _help("classes of the labels (CIFAR-10: 10); labels must lie in [0, n_classes)", default=10)
    transform: TransformConfig = field(default_factory=lambda: TransformConfig(recipe="cifar", augment=True))
    space: str = _help("learning-rate search space: a tune_spaces/ name or a JSON file (job finetune); '' for a "
                       "single trial at optim.lr", default="finetune")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, global_batch=128))
    clf_weight: float = _help("weight of L_CLF in L = clf_weight * L_CLF + L_GEN (paper: 1); >= 0", default=1.0)
    max_epochs: int = _help("epochs of a trial at most; >= 1", default=20)
    patience: int = _help("a trial stops after this many epochs without a higher validation accuracy; >= 1",
                          default=3)
    refit: bool = _help("after the sweep, fine-tune the best lr on train + held-out (part=all) for the best "
                        "trial's epochs and evaluate on the test split", default=True)
    max_concurrent_trials: int = _help("trials at once (each runs scaling.workers Ray Train workers); >= 1",
                                       default=1)
    cpus_per_trial: float = _help("CPUs reserved for each trial's own process (its workers reserve scaling's); > 0",
                                  default=0.1)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    limits: IngestLimits = field(default_factory=IngestLimits)
    """the error budget of the training and evaluation streams (checked inside the stream)"""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.n_classes < 2 or self.max_epochs < 1 or self.patience < 1 or self.max_concurrent_trials < 1:
            raise ValueError("n_classes must be >= 2; max_epochs, patience and max_concurrent_trials >= 1")
        if not (self.clf_weight >= 0 and math.isfinite(self.clf_weight)):
            raise ValueError(f"clf_weight must be a number >= 0, got {self.clf_weight}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"cpus_per_trial must be > 0 (Ray Tune rejects 0), got {self.cpus_per_trial}")
        if not self.name or self.name.startswith("/") or ".." in self.name.split("/"):
            raise ValueError(f"name must be a relative folder name, got {self.name!r}")


METRIC = "val_accuracy"


def job_dir(cfg: FinetuneJobConfig) -> Loc:
    return Loc(cfg.storage_path) / cfg.name  # a local folder, or s3://… / gs://…


def checkpoint_uri(cfg: FinetuneJobConfig, path: str) -> str:
    """Where Ray Train persisted a checkpoint, as a path or URI our code opens (Ray gives a bucket's path without
    its scheme)."""
    if is_remote(cfg.storage_path):
        return f"{cfg.storage_path.split('://', 1)[0]}://{path.lstrip('/')}"
    return str(Path(path))


def tracking_uri(cfg: FinetuneJobConfig) -> str:
    from igpt.track.tracking import default_tracking_uri

    return cfg.tracking.tracking_uri or default_tracking_uri(cfg.storage_path)


def palette_file(cfg: FinetuneJobConfig) -> str:
    """A palette .npy with its cached lookup table, equal to the checkpoint's palette: ``--palette_path``, else one
    written (and its table built, once) into the job folder, on a mount or a bucket: every trial on any node reads
    it from there (``Palette.load``)."""
    from igpt.data.palette import Palette

    centres = checkpoints.header(cfg.checkpoint)["palette"].numpy()
    if cfg.palette_path:
        if not np.array_equal(Palette.load(cfg.palette_path).centres, centres):
            raise UserError(f"palette_path {cfg.palette_path} is not the palette of checkpoint {cfg.checkpoint}")
        return cfg.palette_path
    path = job_dir(cfg) / "palette.npy"
    lut = path.parent / Palette(centres).lut_path(path.name).name
    if not (path.exists() and lut.exists() and np.array_equal(Palette.load(str(path)).centres, centres)):
        Palette(centres).save(str(path))  # builds the table and keeps it beside the centres
    return str(path)


def split_specs(cfg: FinetuneJobConfig, part: str) -> dict:
    """Training part (``rest`` for a trial, ``all`` for the refit), its validation share (trials) or test (refit)."""
    rest, holdout, every = cfg.train.held_out_split(cfg.holdout)
    if part == "rest":
        return {"train": rest, "val": holdout}
    return {"train": every, "test": cfg.test}


# ------------------------------------------------------------------------------------------------ one run
def _plan_splits(cfg: FinetuneJobConfig, part: str) -> tuple[dict, dict, int, int]:
    """The run's splits, their read plans, the training images and the optimizer steps per epoch."""
    from igpt.data import sources

    specs = split_specs(cfg, part)
    plans = {k: sources.check(s) for k, s in specs.items()}
    count = plans["train"].count
    if count is None:
        raise UserError("the training split's size must be known up front (parquet, imagefolder, cifar, stl10)")
    steps_per_epoch = count // cfg.optim.global_batch
    if steps_per_epoch < 1:
        raise UserError(f"{count} training images make no full global batch of {cfg.optim.global_batch}")
    return specs, plans, count, steps_per_epoch


def _datasets(cfg: FinetuneJobConfig, specs: dict, plans: dict, res: int, epochs: int, report=None):
    """The training stream (every epoch its own augmentations and order) and the evaluation splits,
    materialized once; the names of those evaluated; the error log."""
    from igpt.data import sources
    from igpt.data.palette import Palette

    lut = ray.put(Palette.load(palette_file(cfg)).lut)
    log = ingest.error_log(cfg.limits, report)  # the budget is enforced in the stream: no driver loop reads it
    t = cfg.transform

    def spec(epoch: int, augment: bool) -> ingest.TransformSpec:
        return ingest.TransformSpec.of(t, res, cfg.limits.max_pixels, train=augment, epoch=epoch)

    # every epoch its own crops and flips and its own order: a split stored class by class (an image folder, a
    # sorted file) would otherwise give batches of one class; seeded, so a run can be repeated exactly
    train = [ingest.tokenize(sources.read(specs["train"], plans["train"]), lut, spec(e, t.augment), log
                             ).select_columns(["tokens", "label"]).random_shuffle(seed=t.seed * 100_003 + e)
             for e in range(epochs)]
    datasets = {"train": train[0].union(*train[1:]) if len(train) > 1 else train[0]}
    evals = [k for k in ("val", "test") if k in specs]
    for k in evals:
        datasets[k] = ingest.tokenize(sources.read(specs[k], plans[k]), lut, spec(0, False), log
                                      ).select_columns(["key", "tokens", "label"])
        datasets[k] = ingest.materialize_eval(datasets[k])
    return datasets, evals, log


def fit(cfg: FinetuneJobConfig, *, lr: float, folder: str, part: str, epochs: int, parent_run_id: str | None = None,
        clf_weight: float | None = None) -> dict:
    """One fine-tuning run through Ray Train: ``part="rest"`` (a trial: early stopping on the held-out share, at most
    ``epochs``) or ``"all"`` (the refit: ``epochs``, then test once), in its own MLflow run (under ``parent_run_id``).
    Returns the workers' result (``best_val_accuracy``, ``best_epoch``, ...) with ``run_id`` and ``classifier``."""
    if part not in ("rest", "all"):
        raise UserError(f"part must be rest (a trial) or all (the refit), got {part!r}")
    clf_weight = cfg.clf_weight if clf_weight is None else clf_weight
    ckpt = checkpoints.header(cfg.checkpoint)
    model_cfg = dict(ckpt["model"])
    optim = replace(cfg.optim, lr=lr)
    ds_conf, model_over = deepspeed_config.build(cfg.deepspeed, optim, cfg.scaling.workers, cfg.scaling.use_gpu)
    hw.check_cpu_precision(deepspeed_config.precision_of(ds_conf), cfg.scaling.use_gpu, "this fine-tuning run")
    model_cfg["activation_checkpointing"] |= bool(model_over.get("activation_checkpointing"))  # XL's preset
    init_ray()  # joins the running runtime (a Tune trial's, or the driver's); sets our Ray Data options
    specs, plans, count, steps_per_epoch = _plan_splits(cfg, part)
    report = Loc(cfg.storage_path) / cfg.name / folder / "errors.tsv"  # beside the trial's checkpoints
    datasets, evals, log = _datasets(cfg, specs, plans, model_cfg["resolution"], epochs, report)
    # no recipe for fine-tuning (the paper gives none): a tenth of an epoch unless set
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else round(0.1 * steps_per_epoch)
    warmup = min(epochs * steps_per_epoch, warmup)
    params = {"lr": lr, "clf_weight": clf_weight, "part": part, "epochs": epochs,
              "patience": cfg.patience if part == "rest" else "none", "steps.per_epoch": steps_per_epoch,
              "steps.warmup": warmup, "data.train_images": count, "checkpoint.step": ckpt["step"],
              **_model_params(cfg, model_cfg, optim)}
    tracking = replace(cfg.tracking, run_name=f"{cfg.name}/{folder}", parent_run_id=parent_run_id)
    with JobRun.open(tracking, cfg.storage_path, f"{cfg.name}/{folder}",
                     f"finetune_{'trial' if part == 'rest' else 'refit'}", None, params=params,
                     tags={TAG_CHECKPOINT: str(checkpoints.resolve(cfg.checkpoint)),
                           **lineage_tags(model_cfg, checkpoints.pretrain_run_id(cfg.checkpoint))}) as job:
        job.log_dict(ds_conf, "deepspeed_config.json")
        spec = FinetuneSpec(
            run=RunSpec(ds_config=ds_conf, model=model_cfg, seed=cfg.transform.seed, warmup_steps=warmup,
                        total_steps=None,
                        run_id=job.run_id, tracking_uri=job.uri, use_gpu=cfg.scaling.use_gpu,
                        palette=ckpt["palette"].tolist()),
            checkpoint=str(checkpoints.resolve(cfg.checkpoint)), n_classes=cfg.n_classes, lr=lr,
            clf_weight=clf_weight, epochs=epochs, patience=cfg.patience if part == "rest" else None,
            steps_per_epoch=steps_per_epoch, evals=tuple(evals))
        trainer = _trainer(cfg, spec, f"{cfg.name}/{folder}", datasets)
        try:
            result = job.wait(trainer.fit)
            if result.error:
                raise result.error
        finally:  # the skipped records' keys and reasons, whether the trial finished or died
            with contextlib.suppress(Exception):  # best effort: never hide the trial's own error
                text = ingest.write_error_report(report, ray.get(log.all_errors.remote(), timeout=10))
                job.log_text(text, "errors.tsv")
        out = _log_result(job, dict(result.metrics), log)
    out.update(run_id=job.run_id, lr=lr, clf_weight=clf_weight, folder=folder, train_images=count,
               classifier=checkpoint_uri(cfg, result.checkpoint.path))
    return out


def _log_result(job, out: dict, log) -> dict:
    """The workers' result on the run's MLflow record (test/accuracy the workers logged), and the data counts."""
    read, skipped = ray.get(log.stats.remote())
    names = {"best_val_accuracy": "best/val_accuracy", "best_epoch": "best/epoch", "epochs": "epochs",
             "steps": "steps", "stopped_early": "stopped_early"}
    for k, name in names.items():
        if k in out:
            job.log_metric(name, float(out[k]))
    job.log_metric("data/records_read", read)
    job.log_metric("data/records_skipped", skipped)
    return out


def _model_params(cfg: FinetuneJobConfig, model_cfg: dict, optim) -> dict:
    from igpt.track.tracking import flatten

    return {"objective": model_cfg["objective"], "eval.masks": N_MASKS if model_cfg["objective"] == "bert" else 1,
            **{f"model.{k}": v for k, v in model_cfg.items()},
            **{f"deepspeed.{k}": v for k, v in flatten(cli.to_dict(cfg.deepspeed)).items()},
            **{f"optim.{k}": v for k, v in cli.to_dict(optim).items()}}


def _trainer(cfg: FinetuneJobConfig, spec, name: str, datasets: dict):
    from igpt.train.finetune_loop import finetune_loop

    return torch_trainer(finetune_loop, {"spec": spec}, cfg.scaling, name, cfg.storage_path, datasets,
                         split=("train",), preserve_order=True)


# ------------------------------------------------------------------------------------------------ the sweep
def trial_run_name(config: dict) -> str:
    return "_".join(f"{k}_{config[k]:g}" for k in sorted(config) if k != "index")


def trial(config: dict, cfg_dict: dict, parent_run_id: str) -> None:
    """Ray Tune function trainable: one early-stopped fine-tuning run; reports its best validation accuracy."""
    from ray import tune

    cfg = cli.from_dict(FinetuneJobConfig, cfg_dict)
    out = fit(cfg, lr=float(config["lr"]), clf_weight=config.get("clf_weight"), folder=trial_run_name(config),
              part="rest", epochs=cfg.max_epochs, parent_run_id=parent_run_id)
    tune.report({METRIC: out["best_val_accuracy"], "best_epoch": out["best_epoch"], "epochs": out["epochs"],
                 "stopped_early": out["stopped_early"], "val_images": out["val_images"], "lr": out["lr"],
                 "clf_weight": out["clf_weight"], "run_id": out["run_id"]})


def param_space(cfg: FinetuneJobConfig) -> dict:
    if not cfg.space:
        return {"lr": cfg.optim.lr}  # a single trial
    return tune_space.to_tune(tune_space.load(cfg.space, job="finetune")["params"])


def best_trial(trials: list[dict]) -> dict:
    """The highest validation accuracy; ties: the earlier best epoch (a cheaper refit), then the smaller lr."""
    return max(trials, key=lambda t: (t[METRIC], -t["best_epoch"], -t["lr"]))


def _ray_cpus(cfg: FinetuneJobConfig) -> int:
    """Logical CPUs for a local runtime: the trials, their workers, and a whole CPU left for Ray Data's tasks."""
    s = cfg.scaling
    return local_cpus(s.workers * s.cpus_per_worker + cfg.cpus_per_trial, cfg.max_concurrent_trials)


def run(cfg: FinetuneJobConfig) -> dict:
    if not cfg.checkpoint:
        raise UserError("checkpoint is required: a pretraining run folder, a step_* folder or a weights.pt")
    if cfg.train.part != "all" or cfg.train.holdout:
        raise UserError("the job draws its splits itself (trials: part=rest/holdout, refit: part=all): give "
                        "--holdout, not --train.part/--train.holdout")
    cfg = cli.absolute_paths(cfg)  # Tune runs each trial in its own working directory
    ckpt = checkpoints.header(cfg.checkpoint)  # a clear error now rather than in every worker
    cfg.transform.check_model(ckpt["model"]["resolution"])
    space = param_space(cfg)
    out_dir = job_dir(cfg)
    if (out_dir / "summary.json").exists():
        raise Conflict(f"{out_dir} holds a finished fine-tuning job; choose another --name")
    palette_file(cfg)  # the lookup table, built once here rather than in every trial
    tags = {TAG_CHECKPOINT: str(checkpoints.resolve(cfg.checkpoint))}
    if checkpoints.pretrain_run_id(cfg.checkpoint):  # igpt.track.compare links the job to its pretraining run by it
        tags[TAG_PRETRAIN_RUN_ID] = checkpoints.pretrain_run_id(cfg.checkpoint)
    params = {"space": cfg.space or f"lr={cfg.optim.lr:g}", "objective": ckpt["model"]["objective"],
              "checkpoint.step": ckpt["step"]}
    # the store and experiment are created here, before any trial touches them (SQLite schema race)
    with JobRun.open(cfg.tracking, cfg.storage_path, cfg.name, "finetune", cli.to_dict(cfg), params=params,
                     tags=tags, id_file=out_dir / "mlflow_run_id") as job:
        init_ray(num_cpus=_ray_cpus(cfg))
        trials, failed = _sweep(cfg, space, out_dir, job)
        best = best_trial(trials)
        _log_trials(job, trials, failed, best)
        summary = {"name": cfg.name, "parent_run_id": job.run_id, "tracking_uri": job.uri, "job_dir": str(out_dir),
                   "trials": trials, "failed_trials": failed, "best": best, "refit": None}
        if cfg.refit:
            refit = fit(cfg, lr=best["lr"], clf_weight=best["clf_weight"], folder="refit", part="all",
                        epochs=int(best["best_epoch"]), parent_run_id=job.run_id)
            job.log_metric("test/accuracy", refit["test_accuracy"])
            job.log_metric("test/images", refit["test_images"])
            job.set_tag("finetune.refit_run_id", refit["run_id"])
            summary["refit"] = refit
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tried = ", ".join(f"lr={t['lr']:g}: {t[METRIC]:.4f} (epoch {t['best_epoch']})" for t in trials)
    print(f"fine-tuning {cfg.name}: {tried}; best lr {best['lr']:g}"
          + (f"; refit test accuracy {summary['refit']['test_accuracy']:.4f} on {summary['refit']['test_images']} "
             f"images" if summary["refit"] else "") + f"; MLflow run {job.run_id} at {job.uri}")
    return summary


def _sweep(cfg: FinetuneJobConfig, space: dict, out_dir: Loc, job) -> tuple[list[dict], list[str]]:
    """The Tune sweep of fine-tuning trials; its finished trials (by lr, clf_weight) and its failures."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(named_trainable(trial, cfg.name), cfg_dict=cli.to_dict(cfg), parent_run_id=job.run_id),
        {"CPU": cfg.cpus_per_trial})
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=cfg.max_concurrent_trials),
                       run_config=tune.RunConfig(name=experiment_name("tune", out_dir.uri), storage_path=out_dir.uri,
                                                 verbose=1))
    grid = job.wait(tuner.fit)
    trials, failed = [], []
    for r in grid:
        if r.error is not None or METRIC not in (r.metrics or {}):
            failed.append(f"{r.config}: {r.error}")
        else:
            trials.append({k: r.metrics[k] for k in (METRIC, "best_epoch", "epochs", "stopped_early",
                                                     "val_images", "lr", "clf_weight", "run_id")})
    if failed:
        job.set_tag("finetune.failed_trials", "; ".join(failed)[:5000])
    if not trials:
        raise RuntimeError(f"every fine-tuning trial failed: {failed}")
    return sorted(trials, key=lambda t: (t["lr"], t["clf_weight"])), failed


def _log_trials(job, trials: list[dict], failed: list[str], best: dict) -> None:
    for i, t in enumerate(trials):
        for k, v in (("trial/lr", t["lr"]), ("trial/val_accuracy", t[METRIC]), ("trial/best_epoch", t["best_epoch"])):
            job.log_metric(k, float(v), step=i)
    job.log_metric("best/lr", best["lr"])
    job.log_metric("best/val_accuracy", best[METRIC])
    job.log_metric("best/epoch", best["best_epoch"])
    job.set_tag("finetune.best_run_id", best["run_id"])
