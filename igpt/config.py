"""Typed configuration. Every command-line flag is generated from these dataclasses (see ``igpt.cli``).

A field's ``help`` states what it means and the invariant ``__post_init__`` enforces, so a bad value fails at
start-up with a message naming the field, before any work is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from igpt.data.images import DEFAULT_MAX_PIXELS, PIL_HARD_LIMIT
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.model.config import MODEL_SIZES, PAPER_PARAMS_M, ModelConfig  # noqa: F401 (the config tree's model)


@dataclass
class PaletteConfig:
    path: PathStr | None = _help("load this palette (.npy, (K, 3) float32 in [-1, 1]) instead of fitting one",
                                 default=None)
    sample_pixels: int = _help("pixels sampled for k-means; >= n_colors", default=1_000_000)
    max_iter: int = _help("k-means iterations (Lloyd); >= 1", default=100)
    seed: int = _help("k-means and sampling seed", default=0)

    def __post_init__(self) -> None:
        if self.sample_pixels < 1 or self.max_iter < 1:
            raise ValueError("palette.sample_pixels and palette.max_iter must be >= 1")
        if self.path is not None and not Path(self.path).exists():
            raise FileNotFoundError(f"palette.path does not exist: {self.path}")


DEFAULT_DATA = str(Path(__file__).parent / "data" / "cifar10_sample.parquet")


@dataclass
class StoreConfig:
    """Where runs are recorded: the MLflow store and experiment."""

    tracking_uri: str | None = _help(
        "MLflow tracking URI (http://host:port, sqlite:///abs/path.db); default: sqlite store in the output folder",
        default=None,
    )
    experiment: str = _help("MLflow experiment name", default="igpt")


@dataclass
class TrackingConfig(StoreConfig):
    """A job's run: the store and experiment, the run's name and the run it is nested under."""

    run_name: str | None = _help("MLflow run name; default: a pretraining run's is the job's --name, any other "
                                 "stage's <name>/<stage> (e.g. s-cifar/probe)", default=None)
    parent_run_id: str | None = _help("MLflow run id this job's run is nested under (tag mlflow.parentRunId); "
                                      "set by sweeps for their trials", default=None)
    tags: str = _help("more tags on the job's run: key=value, several separated by commas (a study tags its "
                      "rungs' runs igpt.study, igpt.rung, igpt.study_run_id)", default="")

    def __post_init__(self) -> None:
        self.tag_dict()  # a malformed --tracking.tags fails when the config is made, not when the run opens

    def tag_dict(self) -> dict[str, str]:
        out = {}
        for item in filter(None, (t.strip() for t in self.tags.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"tracking.tags: expected key=value (several separated by commas), got {item!r}")
            out[key.strip()] = value.strip()
        return out


@dataclass
class ModelTrackingConfig(TrackingConfig):
    """The run of a job that makes a model (pretraining, the probe): also where that model goes in MLflow."""

    log_model: bool = _help("log the job's model as an MLflow model (pretraining: the final weights, PyTorch "
                            "flavour, loaded into the driver's memory to log: 4 bytes per parameter, 27 GB for XL, "
                            "so turn it off where the driver's node cannot hold them; probe: the refit classifier, "
                            "scikit-learn flavour)", default=True)
    register: str | None = _help("also register the logged model in the Model Registry under this name (a new "
                                 "version per run); needs log_model", default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.register is not None and not self.log_model:
            raise ValueError("tracking.register needs tracking.log_model (a model must be logged to register it)")
        if self.register is not None and not self.register.strip():
            raise ValueError("tracking.register: give a model name, or leave it unset")


@dataclass
class TransformConfig:
    recipe: Literal["imagenet", "cifar", "none"] = _help(
        "imagenet: shorter side U[256,384] + random 224 crop (train) / centre crop (eval), box-filtered to IR; "
        "cifar: reflect-pad 4 + random crop + flip (train) / none (eval); none: box-resize to IR only",
        default="cifar",
    )
    resolution: int | None = _help("input resolution IR: images come out IR x IR; 1..64; default: the model's "
                                   "(pretrain, finetune, extract), else 32", default=None)
    augment: bool = _help("train-time randomness (random crops and flips); off for eval splits", default=False)
    seed: int = _help("seed of every per-record random choice", default=0)
    epoch: int = _help("epoch number mixed into the per-record seed (new crops every epoch)", default=0)
    draft: bool = _help("decode large JPEGs at reduced DCT scale when the crop stays >= 4x IR wide "
                        "(mean abs change <= 1.5 levels)", default=True)

    @property
    def ir(self) -> int:
        """The resolution of a job with no model to take it from (fit_palette, quantize)."""
        return self.resolution or 32

    def check_model(self, model_resolution: int) -> None:
        if self.resolution not in (None, model_resolution):
            raise ValueError(f"transform.resolution ({self.resolution}) must equal the model's resolution "
                             f"({model_resolution}); leave it unset to take the model's")

    def __post_init__(self) -> None:
        if self.resolution is not None and not 1 <= self.resolution <= 64:
            raise ValueError(f"transform.resolution must be in 1..64, got {self.resolution}")
        if self.recipe not in ("imagenet", "cifar", "none"):
            raise ValueError(f"transform.recipe must be imagenet, cifar or none, got {self.recipe!r}")


@dataclass
class IngestLimits:
    max_error_rate: float = _help("stop when more than this fraction of records is skipped; in [0, 1]", default=0.01)
    min_records: int = _help("judge the error rate only after this many records (and at the end)", default=1000)
    max_pixels: int = _help("skip (and list) encoded images with more pixels than this, before decoding them; "
                            f"default PIL's {DEFAULT_MAX_PIXELS:,}, at most {PIL_HARD_LIMIT:,} (PIL refuses more as "
                            "a decompression bomb)", default=DEFAULT_MAX_PIXELS)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"limits.max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if not 1 <= self.max_pixels <= PIL_HARD_LIMIT:
            raise ValueError(f"limits.max_pixels must be in [1, {PIL_HARD_LIMIT}], got {self.max_pixels}")


CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed runs the model. Unset fields come from the preset, then from DeepSpeed's defaults."""

    preset: str | None = _help("a preset in cluster/deepspeed/ (S, M, L, XL, cpu) or a path to one; '' for none; "
                               "default: pretraining takes the size's recipe's, fine-tuning none", default=None)
    zero_stage: int | None = _help("ZeRO stage 0..3", default=None)
    precision: Literal["fp32", "bf16", "fp16"] | None = _help("training precision", default=None)
    offload_optimizer: bool | None = _help("optimizer state on the host (ZeRO >= 1; compiles cpu_adam)", default=None)
    offload_params: bool | None = _help("parameters on the host (ZeRO 3 only)", default=None)
    micro_batch: int | None = _help("images per GPU per forward/backward (default: on GPU workers the largest "
                                    "that `igpt plan` fits in the GPU's memory; on CPU workers the size's recipe, "
                                    "else the preset's); the global batch is reached by gradient accumulation and "
                                    "must be a multiple of micro_batch x workers", default=None)

    def __post_init__(self) -> None:
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0..3, got {self.zero_stage}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError("deepspeed.micro_batch must be >= 1")
        if self.preset:
            found = preset_path(self.preset)  # fails now if it does not exist
            if self.preset.endswith(".json"):  # a file of the user's: absolute, for Tune trials in other folders
                self.preset = str(found.resolve())


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".json" and p.exists():
        return p
    p = CLUSTER_DIR / "deepspeed" / f"{name}.json"
    if not p.exists():
        known = sorted(x.stem for x in (CLUSTER_DIR / "deepspeed").glob("*.json"))
        raise FileNotFoundError(f"DeepSpeed preset {name!r} not found; known presets: {known}")
    return p


@dataclass
class OptimConfig:
    """The paper's recipe by default: Adam(0.9, 0.95), no weight decay, warm-up one epoch, cosine to 0. The batch
    and the run's length come from the size's recipe (cluster/recipes.json) unless given."""

    lr: float = _help("peak learning rate; > 0", default=1e-3)
    beta1: float = _help("Adam beta1; in [0, 1)", default=0.9)
    beta2: float = _help("Adam beta2; in [0, 1)", default=0.95)
    eps: float = _help("Adam epsilon; > 0", default=1e-8)
    weight_decay: float = _help("decoupled weight decay (paper: 0); >= 0", default=0.0)
    global_batch: int | None = _help("images per optimizer step over all workers; default: the size's recipe "
                                     "(paper: 128; 64 for XL); >= 1", default=None)
    warmup_steps: int | None = _help("linear warm-up in optimizer steps; default: one epoch of the records actually "
                                     "in the training split (the paper's); must be shorter than the run; >= 0",
                                     default=None)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr must be a positive number, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("optim.beta1 and optim.beta2 must be in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0 or (self.warmup_steps or 0) < 0:
            raise ValueError("optim.eps must be > 0; optim.weight_decay and optim.warmup_steps >= 0")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError("optim.global_batch must be >= 1")


@dataclass
class ScalingConfig:
    workers: int = _help("Ray Train workers (one per GPU on a cluster); >= 1", default=2)
    use_gpu: bool = _help("one GPU per worker, NCCL; otherwise CPU with gloo", default=False)
    cpus_per_worker: float = _help("CPUs reserved per worker; leave some for Ray Data on small nodes", default=0.5)
    placement: str = _help("PACK (workers on as few nodes as fit: fastest all-reduce) | SPREAD (one per node "
                           "where possible: a lost node takes fewer workers; Ray's placement-group strategies)",
                           default="PACK")
    worker_mem_gib: float | None = _help("memory one worker may fill with model states and activations: its GPU's; "
                                         "on CPU workers its share of the node's RAM (default: measured on the "
                                         "cluster); what the pre-flight `igpt plan` check compares against; > 0",
                                         default=None)
    ignore_plan: bool = _help("start even when `igpt plan` says the configuration will not fit in worker_mem_gib "
                              "(its estimate is conservative; for the brave)", default=False)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker < 0:
            raise ValueError("scaling.workers must be >= 1 and scaling.cpus_per_worker >= 0")
        if self.worker_mem_gib is not None and not self.worker_mem_gib > 0:
            raise ValueError(f"scaling.worker_mem_gib must be > 0, got {self.worker_mem_gib}")
        if self.placement not in ("PACK", "SPREAD"):
            raise ValueError(f"scaling.placement must be PACK or SPREAD, not {self.placement!r}")


@dataclass
class CheckpointConfig:
    every_steps: int = _help("checkpoint every this many optimizer steps (and at the end); >= 1", default=100)
    keep: int = _help("checkpoints kept (the newest); >= 2, so a torn newest one leaves a complete one", default=2)
    max_failures: int = _help("worker failures Ray Train recovers from (restart from the newest complete "
                              "checkpoint); -1: unlimited", default=3)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError("checkpoint.every_steps must be >= 1")
        if self.keep < 2:
            raise ValueError("checkpoint.keep must be >= 2")
