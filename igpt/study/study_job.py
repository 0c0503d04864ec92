"""The study job (``python -m pipelines.study``): a ladder of model sizes, each rung a Ray task running the paper's
procedure (lr sweep -> refit -> features -> probes), as many at once as the cluster holds whole, then the scaling
laws fitted across them (igpt/track/study_report.py). The manual is the README's "A scaling study: one job".

Why rungs are admitted only as far as the cluster holds them whole (``concurrent_rungs``): left to Ray's queue, a
rung took the CPUs its Ray Data tasks needed after its workers had theirs, and every training waited on data
forever. Layout under ``<storage_path>/<name>/``: ``palette/``, ``train/<rung>`` (fixed rate) or ``sweep/<rung>/``,
``features/<rung>``, ``probe/<rung>``, ``rungs/<rung>/summary.json`` (what a re-submission reads back),
``report/``, ``compare/``, ``summary.json``.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from igpt import cli, storage
from igpt.config import (
    DEFAULT_DATA,
    CheckpointConfig,
    DeepSpeedConfig,
    ModelTrackingConfig,
    OptimConfig,
    PaletteConfig,
    ScalingConfig,
    StoreConfig,
    TrackingConfig,
    TransformConfig,
)
from igpt.data import sources
from igpt.data.sources import DatasetSpec
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.model import MODEL_SIZES, ModelConfig
from igpt.model.config import train_compute
from igpt.storage import Loc, is_remote
from igpt.track.compare import CompareJobConfig
from igpt.track.tags import TAG_RUNG, TAG_STUDY, TAG_STUDY_CONCURRENT_RUNGS, TAG_STUDY_RUN_ID, TAG_STUDY_VERDICT_SCALE

_SHAPE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


@dataclass
class DataConfig:
    """The dataset of every stage, in any layout the jobs read: its training split (the palette, pretraining, and
    the probe's train and held-out validation) and its test split (pretraining's validation loss, the probe's test).
    The shipped sample is one Parquet file holding both splits, told apart by key prefix."""

    path: PathStr = _help(
        "file, folder or URI of the dataset; default: the CIFAR-10 sample shipped inside the package (Parquet, "
        "1,000 train + 200 test images)", default=DEFAULT_DATA)
    format: sources.Format = _help("its layout, as every job's --*.format: parquet | imagefolder | webdataset | "
                                   "cifar10 | cifar100 | stl10", default="parquet")
    train_split: str = _help("the training split", default="train")
    test_split: str = _help("the test split (an ImageNet folder: val, with labels_file)", default="test")
    labels_file: PathStr = _help("imagefolder: labels of a flat split folder (ImageNet's LOC_val_solution.csv)",
                                 default="")
    max_images: int = _help("use at most this many training images (0: all; Parquet: the first in file order)",
                            default=0)
    test_max_images: int = _help("use at most this many test images (0: all; Parquet: the first in file order)",
                                 default=0)
    train_prefix: str | None = _help("parquet: keys of training images start with this; default train/ (the "
                                     "sample's); other layouts choose a split by train_split", default=None)
    test_prefix: str | None = _help("parquet: keys of test images start with this; default test/", default=None)

    def __post_init__(self) -> None:
        if not is_remote(self.path) and not Path(storage.local_path(self.path)).exists():
            raise FileNotFoundError(f"data.path does not exist: {self.path}")
        if self.max_images < 0 or self.test_max_images < 0:
            raise ValueError("data.max_images and data.test_max_images must be >= 0")
        if self.format != "parquet" and (self.train_prefix or self.test_prefix):
            raise ValueError(f"data.train_prefix and data.test_prefix select Parquet rows by key; a {self.format} "
                             "dataset's splits are chosen by data.train_split and data.test_split")

    def split(self, which: Literal["train", "test"]) -> DatasetSpec:
        parquet = self.format == "parquet"
        given = self.train_prefix if which == "train" else self.test_prefix
        return DatasetSpec(path=self.path, format=self.format, split=getattr(self, f"{which}_split"),
                           key_prefix=(f"{which}/" if given is None else given) if parquet else "",
                           labels_file=self.labels_file,
                           max_images=self.max_images if which == "train" else self.test_max_images)


@dataclass
class Rung:
    """One rung of the ladder as given (``S``, ``4x128``, ``8x256x4@400``): its label and model shape."""

    label: str
    size: str  # the size-table entry the shape starts from (a shape: "debug", its other fields overridden)
    n_layer: int
    d_model: int
    n_head: int
    steps: int | None  # its own length (``@<steps>``), else the study's

    @classmethod
    def parse(cls, token: str) -> Rung:
        label = token.strip()
        body, _, steps = label.partition("@")
        if steps and (not steps.isdigit() or int(steps) < 1):
            raise ValueError(f"ladder: {label!r}: the steps after @ must be a positive integer")
        n = int(steps) if steps else None
        if body in MODEL_SIZES:
            s = MODEL_SIZES[body]
            return cls(label, body, s["n_layer"], s["d_model"], s["n_head"], n)
        m = _SHAPE.match(body)
        if not m:
            raise ValueError(f"ladder: {label!r} is neither a named size ({', '.join(MODEL_SIZES)}) nor a shape "
                             "<layers>x<width>[x<heads>] such as 4x128 or 8x256x4")
        n_layer, d_model = int(m.group(1)), int(m.group(2))
        n_head = int(m.group(3)) if m.group(3) else max(1, d_model // 64) if d_model % 64 == 0 else 1
        return cls(label, "debug", n_layer, d_model, n_head, n)


@dataclass
class StageData:
    """What every stage of a study (and of the main job, a one-rate study) reads and how: the objective, the input
    resolution, the paper's transforms, the palette and the dataset. One definition for both jobs' flags."""

    objective: Literal["ar", "bert"] = _help("pretraining objective of every model", default="ar")
    resolution: int = _help("input resolution of every stage (palette, pretraining, features); 1..64", default=32)
    recipe: Literal["cifar", "imagenet", "none"] = _help(
        "the paper's transforms of every stage: cifar (small images: pad-crop-flip when training) or imagenet "
        "(photographs: random resized crops when training, a centre crop otherwise), box-filtered to the resolution",
        default="cifar")
    palette: PaletteConfig = field(default_factory=lambda: PaletteConfig(sample_pixels=200_000, max_iter=20))
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class StudyJobConfig(StageData):
    """A scaling study: a ladder of sizes, each through the paper's procedure (lr sweep -> refit -> features ->
    probe sweep -> refit -> test), the rungs concurrently through Ray, then L(N) and L(C) fitted with bootstrap
    intervals and a forecast check of the largest rung, all logged to the study's MLflow run."""

    name: str = _help("study name (the submitter names it; never a timestamp): its files in <storage_path>/<name>/; "
                      "re-submitting the same name resumes it", default="study")
    storage_path: PathStr = _help("folder for the study (shared storage on a cluster)", default="runs")
    ladder: str = _help("comma-separated rungs: named sizes (debug, tiny, small, S, M, L, XL) or shapes "
                        "<layers>x<width>[x<heads>], each optionally @<steps>", default="debug,tiny,small")
    steps: int = _help("optimizer steps of each rung's model (a rung's @<steps> wins); >= 1", default=20)
    flops: float = _help("instead of steps: training FLOPs per rung (the model's FLOPs per token x tokens), the "
                         "steps of each rung derived from it; 0: use steps", default=0.0)
    seed: int = _help("seed of the initial weights, the data order and the augmentations", default=0)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, global_batch=16, warmup_steps=5))
    lr_space: str = _help("the learning-rate sweep of every rung (a tune_spaces/ name or file with an ordered lr "
                          "list); '': no sweep, every rung at optim.lr (its comparisons are then confounded)",
                          default="sweep_lr")
    trial_fraction: float = _help("a sweep trial runs this fraction of the rung's schedule; in (0, 1]",
                                  default=0.1)
    sweep_holdout: float = _help("share of the training split a sweep's trials are validated on; in (0, 1)",
                                 default=0.1)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=lambda: DeepSpeedConfig(
        preset="cpu", zero_stage=2, precision="fp32"))
    preset_per_size: bool = _help("each rung's DeepSpeed settings from its size's recipe (cluster/deepspeed/S.json "
                                  "for S, ...), as pretraining alone takes them, instead of --deepspeed.*; a shape "
                                  "rung takes the debug recipe's", default=False)
    max_concurrent_rungs: int = _help(
        "rungs at once; 0: as many as the cluster's CPUs and GPUs hold when the study starts, a rung counted at its "
        "trial's workers + its own task + its trial's process + 1 CPU for its Ray Data tasks", default=0)
    cpus_per_rung: float = _help("CPUs reserved for a rung's own task (it mostly waits on its stages); > 0",
                                 default=0.1)
    cpus_per_trial: float = _help("CPUs reserved for a sweep trial's own process; > 0", default=0.1)
    holdout: float = _help("share of the training images held out for the probe's validation", default=0.2)
    probe_protocol: Literal["lbfgs", "sgd"] = _help("the probe's protocol: lbfgs (the paper's CIFAR/STL one) or sgd "
                                                    "(its ImageNet one)", default="lbfgs")
    probe_space: str = _help("probe search space (a tune_spaces/ name or file); default probe_<protocol>",
                             default="")
    pixels: bool = _help("also probe the raw pixels (a baseline per rung)", default=True)
    random_init: bool = _help("also extract and probe each rung's random-init twin", default=False)
    val_images: int = _help("validation images per evaluation of pretraining (0: the whole test split)",
                            default=200)
    pretokenize: int = _help("0: every run decodes its training images; N >= 1: the training split is tokenized "
                             "once into N augmented passes (pass p: epoch p's crops and flips) that every rung's "
                             "runs read (epoch e: pass e mod N): N decodes of the split for the whole study",
                             default=0)
    n_boot: int = _help("bootstrap resamples of the scaling-law fits; >= 100", default=1000)
    tracking: StoreConfig = field(default_factory=StoreConfig)

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("/") or ".." in self.name.split("/") or "," in self.name \
                or "=" in self.name:
            raise ValueError(f"name must be a relative folder name without ',' or '=', got {self.name!r}")
        rungs = self.rungs()
        if not rungs:
            raise ValueError("ladder: give at least one rung")
        labels = [r.label for r in rungs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"ladder: a rung is given twice: {labels}")
        if self.steps < 1 or self.flops < 0 or self.n_boot < 100 or self.pretokenize < 0:
            raise ValueError("steps must be >= 1, flops >= 0, n_boot >= 100 and pretokenize >= 0")
        if not 0.0 < self.trial_fraction <= 1.0 or not 0.0 < self.sweep_holdout < 1.0:
            raise ValueError("trial_fraction must be in (0, 1] and sweep_holdout in (0, 1)")
        if self.max_concurrent_rungs < 0:
            raise ValueError("max_concurrent_rungs must be >= 0 (0: as many as the cluster holds)")
        if not (self.cpus_per_rung > 0 and self.cpus_per_trial > 0):
            raise ValueError("cpus_per_rung and cpus_per_trial must be > 0")
        if (self.optim.global_batch or 0) % self.scaling.workers:
            raise ValueError(f"optim.global_batch ({self.optim.global_batch}) must be a multiple of "
                             f"scaling.workers ({self.scaling.workers})")
        for r in rungs:  # (a sweep's trials scale the warm-up with their steps: the same share of a shorter run)
            if not 0 <= (self.optim.warmup_steps or 0) < self.rung_steps(r):
                raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be in [0, steps) of every "
                                 f"rung; rung {r.label} has {self.rung_steps(r)}")

    def rungs(self) -> list[Rung]:
        return [Rung.parse(t) for t in self.ladder.split(",") if t.strip()]

    def model(self, r: Rung) -> ModelConfig:
        return ModelConfig(size=r.size, n_layer=r.n_layer, d_model=r.d_model, n_head=r.n_head,
                           resolution=self.resolution, objective=self.objective)

    def rung_steps(self, r: Rung) -> int:
        """The rung's optimizer steps: its own @<steps>, else from the FLOPs budget, else the study's steps."""
        if r.steps is not None:
            return r.steps
        if self.flops:
            m = self.model(r)
            per_step = m.train_flops_per_token() * (self.optim.global_batch or 0) * m.n_ctx
            return max(1, round(self.flops / per_step))
        return self.steps


def _tags(cfg: StudyJobConfig, label: str, study_run_id: str, source: str = "") -> str:
    """A rung's runs' tags; ``source``: the study's entry point, MLflow's Source column (a rung's stages run in a
    Ray task, whose own script is Ray's worker)."""
    return f"{TAG_STUDY}={cfg.name},{TAG_RUNG}={label},{TAG_STUDY_RUN_ID}={study_run_id}" + (
        f",mlflow.source.name={source}" if source and "," not in source and "=" not in source else "")


def stage_configs(cfg: StudyJobConfig, palette_path: str = "", study_run_id: str = "", source: str = "") -> dict:
    """Every stage's own typed config, composed from the study's (paths absolute: Tune trials run in their own
    working directories): ``palette``, per rung ``pretrain/<rung>`` (or ``sweep/<rung>``), ``extract/<rung>``,
    ``probe/<rung>`` (and ``*_random/<rung>``), and ``compare``."""
    from igpt.data.fit_palette_job import FitPaletteJobConfig
    from igpt.eval.extract_job import ExtractJobConfig
    from igpt.eval.probe_job import ProbeJobConfig
    from igpt.train.pretrain_job import PretrainJobConfig
    from igpt.train.sweep_lr_job import SweepLRJobConfig

    root = study_root(cfg)
    store = dict(tracking_uri=cfg.tracking.tracking_uri or _default_uri(root), experiment=cfg.tracking.experiment)
    train, test = cfg.data.split("train"), cfg.data.split("test")
    eval_transform = TransformConfig(recipe=cfg.recipe, resolution=cfg.resolution, seed=cfg.seed)
    study_tags = f"{TAG_STUDY}={cfg.name}" + (f",{TAG_STUDY_RUN_ID}={study_run_id}" if study_run_id else "")
    out = {"palette": FitPaletteJobConfig(
        name="palette", storage_path=str(root), data=train, transform=eval_transform, palette=cfg.palette,
        tracking=TrackingConfig(**store, tags=study_tags))}
    trained_on = train
    if cfg.pretokenize:  # the rungs train on its token split; features and validation stay on the images
        out["tokens"], trained_on = _tokens_stage(cfg, root, train, palette_path, TrackingConfig(**store,
                                                                                                 tags=study_tags))
    for r in cfg.rungs():
        tags = _tags(cfg, r.label, study_run_id or "-", source)
        steps = cfg.rung_steps(r)
        # CPU workers: the whole per-worker batch in one pass; GPU workers: what `igpt plan` fits (None)
        micro = cfg.deepspeed.micro_batch or (None if cfg.scaling.use_gpu else
                                              (cfg.optim.global_batch or 0) // cfg.scaling.workers or None)
        ds = DeepSpeedConfig(micro_batch=micro) if cfg.preset_per_size else replace(cfg.deepspeed, micro_batch=micro)
        pre = PretrainJobConfig(
            name=r.label, storage_path=str(root / "train"), palette_path=palette_path or "-", train=trained_on,
            val=test,
            val_images=cfg.val_images, transform=replace(PretrainJobConfig().transform, recipe=cfg.recipe,
                                                         resolution=cfg.resolution, seed=cfg.seed),
            model=cfg.model(r), optim=cfg.optim, deepspeed=ds,
            scaling=cfg.scaling, steps=steps, checkpoint=CheckpointConfig(every_steps=steps), completions=4,
            tracking=ModelTrackingConfig(**store, tags=tags))
        if cfg.lr_space:
            out[f"sweep/{r.label}"] = SweepLRJobConfig(
                name=r.label, storage_path=str(root / "sweep"), space=cfg.lr_space, holdout=cfg.sweep_holdout,
                cpus_per_trial=cfg.cpus_per_trial, trial_fraction=cfg.trial_fraction, pretrain=pre)
        else:
            out[f"pretrain/{r.label}"] = pre
        checkpoint = str(root / ("sweep" if cfg.lr_space else "train") / r.label / ("refit" if cfg.lr_space else ""))
        for suffix, random in (("", False), ("_random", True)) if cfg.random_init else (("", False),):
            name = r.label + ("-random-init" if random else "")
            out[f"extract{suffix}/{r.label}"] = ExtractJobConfig(
                name=name, storage_path=str(root / "features"), checkpoint=checkpoint.rstrip("/"), train=train,
                test=test, holdout=cfg.holdout, transform=eval_transform, random_init=random, seed=cfg.seed,
                use_gpu=cfg.scaling.use_gpu, pixels=cfg.pixels and not random,
                tracking=TrackingConfig(**store, tags=tags))
            out[f"probe{suffix}/{r.label}"] = ProbeJobConfig(
                name=name, storage_path=str(root / "probe"), features=str(root / "features" / name),
                protocol=cfg.probe_protocol, space=cfg.probe_space, seed=cfg.seed, pixels=cfg.pixels and not random,
                tracking=ModelTrackingConfig(**store, tags=tags))
    out["compare"] = CompareJobConfig(name="compare", storage_path=str(root), tag=f"{TAG_STUDY}={cfg.name}",
                                      tracking=TrackingConfig(**store))
    return out


def _tokens_stage(cfg: StudyJobConfig, root: Loc, train: DatasetSpec, palette_path: str, tracking):
    """The quantize job that tokenizes the training split once for every rung, and the token split it writes."""
    from igpt.data.quantize_job import QuantizeJobConfig

    job = QuantizeJobConfig(name="tokens", storage_path=str(root), palette_path=palette_path or "-", data=train,
                            transform=TransformConfig(recipe=cfg.recipe, resolution=cfg.resolution, augment=True,
                                                      seed=cfg.seed), passes=cfg.pretokenize, tracking=tracking)
    return job, DatasetSpec(str(root / "tokens"), "tokens", train.split)


def study_root(cfg) -> Loc:
    """The study's folder, ``<storage_path>/<name>``: a mount or ``s3://``/``gs://`` (its rungs' runs, features
    and probes under it, its records, its report)."""
    return Loc(cli.absolute_path(cfg.storage_path)) / cfg.name


def _default_uri(root: Loc) -> str:
    from igpt.track.tracking import default_tracking_uri

    return default_tracking_uri(str(root))


# ------------------------------------------------------------------------------------------------ one rung
def run_rung(cfg_dict: dict, label: str, palette_path: str, study_run_id: str, source: str = "") -> dict:
    """The paper's procedure for one rung, in its own Ray task: sweep + refit (or one run at the given rate) ->
    features -> probe; writes and returns ``rungs/<rung>/summary.json`` (a finished rung is not run again)."""
    from mlflow.tracking import MlflowClient

    from igpt.eval import extract_job as extract
    from igpt.eval import probe_job as probe
    from igpt.raysetup import init_ray
    from igpt.train import sweep_lr_job as sweep_lr

    init_ray()  # joins the study's runtime; our Ray Data options and the stop handler in this process
    cfg = cli.from_dict(StudyJobConfig, cfg_dict)
    rung = next(r for r in cfg.rungs() if r.label == label)
    stages = stage_configs(cfg, palette_path, study_run_id, source)
    root = study_root(cfg)
    done = root / "rungs" / label / "summary.json"
    t0, timings = time.time(), {}
    if cfg.lr_space:
        t = time.perf_counter()
        sw = sweep_lr.run(stages[f"sweep/{label}"])
        timings[f"sweep/{label}"] = time.perf_counter() - t
        out, lr, sweep = sw["refit"], sw["best_lr"], {k: sw.get(k) for k in (
            "trials", "stop_reason", "stop_detail", "best_lr", "edge_warning", "parent_run_id")}
        uri = stages[f"sweep/{label}"].pretrain.tracking.tracking_uri
    else:
        t = time.perf_counter()
        pcfg = stages[f"pretrain/{label}"]
        out, lr, sweep = sweep_lr.pretrain_once(pcfg, diverged_ok=False), cfg.optim.lr, None
        timings[f"pretrain/{label}"] = time.perf_counter() - t
        uri = pcfg.tracking.tracking_uri
    pre = MlflowClient(uri).get_run(out["run_id"])
    steps, batch = int(pre.data.params["steps.total"]), int(pre.data.params["optim.global_batch"])
    summary = {"label": label, "n_layer": rung.n_layer, "d_model": rung.d_model, "n_head": rung.n_head,
               "non_embedding_params": cfg.model(rung).non_embedding_params(),
               "params": int(pre.data.params.get("model.params", 0)), "steps": steps, "global_batch": batch,
               "lr": lr, "lr_swept": bool(cfg.lr_space), "sweep": sweep, "pretrain_run_id": out["run_id"],
               "run_dir": out["run_dir"], "val_loss": out["val_loss"],
               # C of the laws: the model's FLOPs per token x the tokens its model trained on (compare's formula)
               "compute_flops": train_compute(rung.n_layer, rung.d_model, cfg.resolution, steps, batch,
                                              cfg.model(rung).n_colors)[1]}
    for suffix in ("", "_random") if cfg.random_init else ("",):
        t = time.perf_counter()
        extract.run(stages[f"extract{suffix}/{label}"])
        timings[f"extract{suffix}/{label}"] = time.perf_counter() - t
        t = time.perf_counter()
        pr = probe.run(stages[f"probe{suffix}/{label}"])
        timings[f"probe{suffix}/{label}"] = time.perf_counter() - t
        if suffix:
            summary.update(random_init_probe_run_id=pr["run_id"], random_init_test_accuracy=pr["test_accuracy"])
        else:
            summary.update(probe_run_id=pr["run_id"], probe_test_accuracy=pr["test_accuracy"],
                           best_layer=pr["best"]["layer"], features=stages[f"probe/{label}"].features,
                           test_predictions=pr["test_predictions"],
                           pixels_test_accuracy=pr.get("pixels", {}).get("test_accuracy"))
    summary.update(window=[t0, time.time()], timings={k: round(v, 1) for k, v in timings.items()})
    done.write_text(json.dumps(summary, indent=2, default=float))  # whole or absent: a resumed study trusts it
    return summary


# ------------------------------------------------------------------------------------------------ the driver
def rung_cpus(cfg: StudyJobConfig) -> float:
    """What one rung holds while it trains: its task, its trial's process, the trial's workers, and a whole CPU
    for the Ray Data tasks that feed them (they ask for theirs only once the workers hold their own)."""
    s = cfg.scaling
    return cfg.cpus_per_rung + cfg.cpus_per_trial + s.workers * s.cpus_per_worker + 1


def ray_cpus(cfg: StudyJobConfig, rungs: int) -> int:
    """Logical CPUs for a local runtime: every rung at once (on 2 cores this over-subscribes on purpose: the rungs
    then share the cores, as on a cluster they would share nodes)."""
    from igpt.raysetup import local_cpus

    return local_cpus(rung_cpus(cfg), rungs, spare=0)


def concurrent_rungs(cfg: StudyJobConfig, resources: dict) -> tuple[int, str]:
    """How many rungs run at once, and why. Ray queues what does not fit, but a rung queued this way can take the
    CPUs its own Ray Data tasks (or another rung's) would need after the workers have theirs: every training
    waits on data that never gets a CPU (seen with 3 rungs on a 3-CPU head). So rungs are let in only as far as
    the cluster holds them whole, counted when the study starts (an autoscaler's nodes to come are not)."""
    if cfg.max_concurrent_rungs:
        return cfg.max_concurrent_rungs, "--max_concurrent_rungs"
    cpus = resources.get("CPU", 0.0)
    n = int(cpus // rung_cpus(cfg))
    why = f"the cluster's {cpus:g} CPUs / {rung_cpus(cfg):g} per rung"
    if cfg.scaling.use_gpu:
        by_gpu = int(resources.get("GPU", 0.0) // cfg.scaling.workers)
        why += f", its {resources.get('GPU', 0.0):g} GPUs / {cfg.scaling.workers} per rung"
        n = min(n, by_gpu)
    return max(1, n), why


def run(cfg: StudyJobConfig) -> dict:
    from igpt.data.palette import Palette
    from igpt.raysetup import init_ray
    from igpt.track import compare
    from igpt.track.tracking import JobRun

    t0 = time.perf_counter()
    root = study_root(cfg)
    for spec in (cfg.data.split("train"), cfg.data.split("test")):
        sources.check(spec)  # a wrong --data.path or split: one error line, before Ray starts
    if cfg.palette.path:
        Palette.load(cfg.palette.path)
    base = stage_configs(cfg)  # a bad stage config fails now, before anything runs
    root.mkdir()
    rungs = cfg.rungs()
    finished = {r.label: json.loads(p.read_text()) for r in rungs
                if (p := root / "rungs" / r.label / "summary.json").exists()}
    init_ray(num_cpus=ray_cpus(cfg, max(1, len(rungs) - len(finished))))
    track = TrackingConfig(tracking_uri=base["palette"].tracking.tracking_uri, experiment=cfg.tracking.experiment)
    params = {"ladder": cfg.ladder, "rungs": len(rungs), "lr_swept": bool(cfg.lr_space),
              # one JSON param each (a rung's label may hold '@', which MLflow refuses in a key)
              "rung_steps": json.dumps({r.label: cfg.rung_steps(r) for r in rungs}),
              "rung_non_embedding_params": json.dumps({r.label: cfg.model(r).non_embedding_params() for r in rungs})}
    timings: dict[str, float] = {}
    with JobRun.open(track, str(root), cfg.name, "study", cli.to_dict(cfg), params=params, tags={TAG_STUDY: cfg.name},
                     id_file=root / "mlflow_run_id") as job:
        if finished:
            print(f"resuming study {cfg.name}: rungs {', '.join(finished)} finished, read back from their records")
        palette_path = cfg.palette.path or _palette(cfg, root, job, timings)
        if cfg.pretokenize:
            _tokens(cfg, root, job, palette_path, timings)
        finished.update(_run_rungs(cfg, [r.label for r in rungs if r.label not in finished], palette_path, job))
        for label in (r.label for r in rungs):
            timings.update(finished.get(label, {}).get("timings", {}))
        t = time.perf_counter()
        comp = compare.run(base["compare"])
        timings["compare"] = time.perf_counter() - t
        report = _report(cfg, rungs, finished, root, job)
    summary = {"name": cfg.name, "rungs": finished, "tracking_uri": track.tracking_uri,
               "experiment": cfg.tracking.experiment, "run_id": job.run_id, "compare": comp, "report": report,
               "timings": {k: round(v, 1) for k, v in timings.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print((root / "report" / "report.md").read_text())
    print("\nstage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"everything is in {root}; MLflow experiment '{cfg.tracking.experiment}' at {track.tracking_uri}")
    if track.tracking_uri.startswith("sqlite:"):
        print(f"look at it with:  mlflow ui --backend-store-uri {track.tracking_uri} --host 127.0.0.1")
    return summary


def _palette(cfg: StudyJobConfig, root: Loc, job, timings: dict) -> str:
    """The study's palette: read back from its record, or fitted once for every rung."""
    from igpt.data import fit_palette_job as fit_palette

    t = time.perf_counter()
    kept = root / "palette" / "summary.json"
    path = json.loads(kept.read_text())["palette"] if kept.exists() else fit_palette.run(
        stage_configs(cfg, "", job.run_id)["palette"])["palette"]
    timings["palette"] = time.perf_counter() - t
    return path


def _tokens(cfg: StudyJobConfig, root: Loc, job, palette_path: str, timings: dict) -> None:
    """The training split tokenized once (``--pretokenize`` passes), or read back when a resumed study has it."""
    from igpt.data import quantize_job as quantize
    from igpt.data.palette import Palette

    kept = root / "tokens" / f"{cfg.data.split('train').split}.summary.json"
    meta = json.loads(kept.read_text()) if kept.exists() else {}
    if meta.get("palette_digest") == Palette.load(palette_path).digest and meta.get("passes") == cfg.pretokenize:
        return
    t = time.perf_counter()
    quantize.run(stage_configs(cfg, palette_path, job.run_id)["tokens"])
    timings["tokens"] = time.perf_counter() - t


def _run_rungs(cfg: StudyJobConfig, todo: list[str], palette_path: str, job) -> dict:
    """The rungs not finished yet, each a Ray task, as many at once as the cluster holds whole; their summaries by
    label. A stop cancels them first (the study's run then ends every run under it KILLED); a failed rung fails
    the study, the finished ones kept for the re-submission."""
    import ray

    task = ray.remote(run_rung)
    cfg_dict, source = cli.to_dict(cli.absolute_paths(cfg)), _source()

    def launch(label: str):
        return task.options(num_cpus=cfg.cpus_per_rung, name=f"rung-{label}", max_retries=0).remote(
            cfg_dict, label, palette_path, job.run_id, source)

    limit, why = concurrent_rungs(cfg, ray.cluster_resources())
    print(f"study {cfg.name}: {len(todo)} rung(s) to run, {min(limit, len(todo))} at once ({why}); MLflow run "
          f"{job.run_id}", flush=True)
    job.set_tag(TAG_STUDY_CONCURRENT_RUNGS, f"{limit} ({why})")
    inflight: dict = {}
    try:
        results, errors = job.wait(_gather, launch, todo, limit, inflight)
    except BaseException:  # a stop (ray job stop): the rungs go first, then the study's run ends every run KILLED
        _cancel(inflight)
        raise
    if errors:
        raise RuntimeError(f"study {cfg.name}: rung(s) {', '.join(errors)} failed (first: "
                           f"{next(iter(errors.values()))}); the finished rungs are kept: fix the cause and "
                           f"re-submit --name {cfg.name} to run only the others")
    return results


def _source() -> str:
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags({}).get("mlflow.source.name", "")


def _cancel(refs: dict) -> None:
    """End the rungs still running, at once. A rung's process does not get the job's SIGTERM: left alone it went on
    starting probe trials, whose MLflow runs appeared after the study had ended everything KILLED. Killing it
    (``force``) stops that; the actors it owns (its trials, their workers) go with it."""
    import ray

    for ref in list(refs):
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(list(refs), num_returns=len(refs), timeout=15)
    print(f"stopped {len(refs)} running rung(s): {', '.join(refs.values())}", file=sys.stderr, flush=True)


def _gather(launch, todo: list[str], limit: int, refs: dict) -> tuple[dict, dict]:
    """Run the rungs ``limit`` at a time, in ladder order, and collect each one's result as it comes (one failing
    does not cancel the others: their work is kept). ``refs``: the rungs in flight (ref -> label), shared with the
    caller, which cancels them on a stop."""
    import ray

    from igpt.track.tracking import STOP_REQUESTED

    results, errors, queue = {}, {}, list(todo)
    while queue or refs:
        while queue and len(refs) < limit and not STOP_REQUESTED.is_set():
            label = queue.pop(0)
            refs[launch(label)] = label
            print(f"rung {label} started", flush=True)
        if not refs:  # stopped before the next could start
            break
        ready, _ = ray.wait(list(refs), num_returns=1)
        label = refs.pop(ready[0])
        try:
            results[label] = ray.get(ready[0])
            print(f"rung {label} finished: val loss {results[label]['val_loss']:.4f}", flush=True)
        except Exception as e:  # the rung's error, with its traceback in the task's log
            errors[label] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
            print(f"rung {label} failed: {errors[label]}", file=sys.stderr, flush=True)
    return results, errors


def _report(cfg: StudyJobConfig, rungs: list[Rung], finished: dict, root: Loc, job) -> dict:
    """The study's report on its MLflow run: files, and the fitted numbers as metrics and tags."""
    from igpt.track import study_report

    rows = []
    for r in rungs:
        s = finished[r.label]
        edge = (s.get("sweep") or {}).get("edge_warning")
        rows.append(study_report.Rung(
            label=r.label, non_embedding_params=s["non_embedding_params"], compute_flops=s["compute_flops"],
            val_loss=s["val_loss"], lr=s["lr"], lr_swept=s["lr_swept"],
            probe_test_accuracy=s.get("probe_test_accuracy"), best_layer=s.get("best_layer"), n_layer=s["n_layer"],
            pixels_test_accuracy=s.get("pixels_test_accuracy"),
            random_init_test_accuracy=s.get("random_init_test_accuracy"), edge_warning=edge and edge["detail"],
            features=s.get("features"), predictions=s.get("test_predictions")))
    title = (f"Study {cfg.name}: {cfg.objective.upper()} at IR {cfg.resolution}, {len(rows)} rungs "
             f"({'rate swept per rung' if cfg.lr_space else f'one rate {cfg.optim.lr:g} for all'})")
    with tempfile.TemporaryDirectory() as tmp:  # built locally, then put where the study lives
        stage = Path(tmp)
        out = study_report.build(rows, stage, title=title, n_boot=cfg.n_boot, seed=cfg.seed)
        job.log_artifacts(str(stage), "report")
        job.set_tag("mlflow.note.content", (stage / "report.md").read_text()[:5000])
        (root / "report").put_files(stage)
        (root / "report" / "plots").put_files(stage / "plots")
    for var, fit in out["fits"].items():
        job.set_tag(f"fit.{var}", study_report.fit_line(var, None, fit["reason"]) if not fit["fitted"]
                  else f"{fit['form']}: alpha {fit['alpha']:.4f} [{fit['alpha_95'][0]:.4f}, {fit['alpha_95'][1]:.4f}]"
                  f", L_inf {fit['l_inf_text']}")
        if fit["fitted"]:
            job.log_metric(f"fit/{var}/alpha", fit["alpha"])
            job.log_metric(f"fit/{var}/alpha_lo", fit["alpha_95"][0])
            job.log_metric(f"fit/{var}/alpha_hi", fit["alpha_95"][1])
    for var, fc in out["forecast"].items():
        if fc["made"]:
            job.log_metric(f"forecast/{var}/inside", float(fc["inside"]))
            job.set_tag(f"forecast.{var}", f"predicted {fc['predicted']:.4f} "
                      f"[{fc['interval_95'][0]:.4f}, {fc['interval_95'][1]:.4f}], measured {fc['measured']:.4f}")
    job.set_tag(TAG_STUDY_VERDICT_SCALE, out["verdict_scale"])
    return out
