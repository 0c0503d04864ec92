"""Typed configuration. Every command-line flag is generated from these dataclasses (see ``igpt.cli``).

A field's ``help`` states what it means and the invariant ``__post_init__`` enforces, so a bad value fails at
start-up with a message naming the field, before any work is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from igpt.sources import DatasetSpec


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


# One named table of model sizes. The paper's four (Chen et al. 2020, Table 1 / appendix) and small ones that
# train on a CPU in tests. XL's heads are our choice (the paper does not state them): 24 heads give a head
# dimension of 128, the size flash-attention kernels are tuned for (S: 64, M: 128, L: 96), and it is the head
# dimension of GPT-3 6.7B. Head count does not change the parameter count.
# The input resolution a size trains at is part of its recipe (cluster/recipes.json, igpt.recipes).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "debug": dict(n_layer=2, d_model=64, n_head=2),
    "tiny": dict(n_layer=4, d_model=128, n_head=4),
    "small": dict(n_layer=8, d_model=256, n_head=8),
    "S": dict(n_layer=24, d_model=512, n_head=8),
    "M": dict(n_layer=36, d_model=1024, n_head=8),
    "L": dict(n_layer=48, d_model=1536, n_head=16),
    "XL": dict(n_layer=60, d_model=3072, n_head=24),
}

# The paper's parameter counts (millions), which tests check our sizes against.
PAPER_PARAMS_M = {"S": 76, "M": 455, "L": 1362, "XL": 6801}


@dataclass
class ModelConfig:
    DERIVED = ("n_layer", "d_model", "n_head", "resolution")  # filled from the size table when not given

    size: str = _help(f"named size from MODEL_SIZES: one of {', '.join(MODEL_SIZES)}", default="debug")
    n_layer: int | None = _help("blocks; default from the size table; >= 1", default=None)
    d_model: int | None = _help("width; default from the size table; divisible by n_head", default=None)
    n_head: int | None = _help("attention heads; default from the size table; >= 1", default=None)
    resolution: int | None = _help(
        "input resolution IR (images are IR x IR, context IR^2); default from the size's recipe "
        "(cluster/recipes.json: 32 for S/M/L, 64 for XL); the paper uses 32, 48 or 64; 1..64",
        default=None,
    )
    n_colors: int = _help("palette size (vocabulary without SOS); 2..65535", default=512)
    objective: Literal["ar", "bert"] = _help("pretraining objective: autoregressive or BERT", default="ar")
    bert_mask_prob: float = _help("BERT: probability each position is masked; in (0, 1)", default=0.15)
    activation_checkpointing: bool = _help("recompute each block's activations in backward", default=False)

    def __post_init__(self) -> None:
        if self.size not in MODEL_SIZES:
            raise ValueError(f"model.size: unknown size {self.size!r}; choose one of {sorted(MODEL_SIZES)}")
        for k, v in MODEL_SIZES[self.size].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.resolution is None:
            from igpt.recipes import recipe

            self.resolution = recipe(self.size).resolution
        if self.n_layer < 1 or self.n_head < 1 or self.d_model < 1:
            raise ValueError("model: n_layer, n_head and d_model must be >= 1")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if not 1 <= self.resolution <= 64:
            raise ValueError(f"model.resolution must be in 1..64, got {self.resolution}")
        if not 2 <= self.n_colors <= 65535:
            raise ValueError(f"model.n_colors must be in 2..65535, got {self.n_colors}")
        if self.objective not in ("ar", "bert"):
            raise ValueError(f"model.objective must be 'ar' or 'bert', got {self.objective!r}")
        if not 0.0 < self.bert_mask_prob < 1.0:
            raise ValueError(f"model.bert_mask_prob must be in (0, 1), got {self.bert_mask_prob}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        return cls(size=name, **overrides)

    @property
    def n_ctx(self) -> int:
        return self.resolution**2

    @property
    def vocab_size(self) -> int:
        return self.n_colors + 1

    @property
    def sos_id(self) -> int:
        return self.n_colors

    def param_count(self) -> int:
        """Closed form, equal to ``IGPT(cfg).num_params()`` (tested)."""
        d = self.d_model
        per_block = 12 * d * d + 2 * d  # q, k, v, proj (4 d^2) + MLP (8 d^2) + two norm gains
        return self.n_layer * per_block + (self.vocab_size + self.n_ctx + self.n_colors) * d + d

    def train_flops_per_token(self) -> float:
        """Model FLOPs per trained token (forward + backward = 3x forward; attention included, causal not halved)."""
        d, n = self.d_model, self.n_layer
        return 3 * (2 * 12 * n * d * d + 2 * 2 * n * self.n_ctx * d + 2 * d * self.n_colors)


@dataclass
class PaletteConfig:
    path: str | None = _help("load this palette (.npy, (K, 3) float32 in [-1, 1]) instead of fitting one", default=None)
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
class DataConfig:
    path: str = _help(
        "Parquet file or folder with columns key, image (encoded bytes), label; default: the CIFAR-10 sample "
        "shipped inside the package (1,000 train + 200 test images)",
        default=DEFAULT_DATA,
    )
    max_images: int = _help("use at most this many training images (0: all)", default=0)
    train_prefix: str = _help("keys of training images start with this", default="train/")
    test_prefix: str = _help("keys of test images start with this", default="test/")

    def __post_init__(self) -> None:
        if not Path(self.path).exists():
            raise FileNotFoundError(f"data.path does not exist: {self.path}")
        if self.max_images < 0:
            raise ValueError("data.max_images must be >= 0")


@dataclass
class TrainConfig:
    steps: int = _help("optimizer steps; >= 1", default=20)
    batch_size: int = _help("images per step; >= 1", default=16)
    lr: float = _help("peak learning rate; > 0", default=3e-3)
    beta1: float = _help("Adam beta1 (paper: 0.9); in [0, 1)", default=0.9)
    beta2: float = _help("Adam beta2 (paper: 0.95); in [0, 1)", default=0.95)
    weight_decay: float = _help("decoupled weight decay (paper: none); >= 0", default=0.0)
    warmup_steps: int = _help("linear warm-up steps, then cosine decay to 0; 0 <= warmup <= steps", default=5)
    seed: int = _help("seed of init, data order and masks", default=0)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be a positive number, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("train.beta1 and train.beta2 must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError("train.weight_decay must be >= 0")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("train.warmup_steps must be in [0, train.steps]")


@dataclass
class TrackingConfig:
    tracking_uri: str | None = _help(
        "MLflow tracking URI (http://host:port, sqlite:///abs/path.db); default: sqlite store in the output folder",
        default=None,
    )
    experiment: str = _help("MLflow experiment name", default="igpt")
    run_name: str | None = _help("MLflow run name; default: the job's name", default=None)
    parent_run_id: str | None = _help("MLflow run id this job's run is nested under (tag mlflow.parentRunId); "
                                      "set by sweeps for their trials", default=None)


@dataclass
class MainJobConfig:
    """The README's main job, the whole pipeline on the embedded sample: fit the palette -> pretrain (Ray Train +
    DeepSpeed, tokenizing on the fly) -> extract features -> probe sweep (Ray Tune) with refit -> compare, all
    logged to MLflow."""

    name: str = _help("run name (the submitter names runs; never a timestamp); runs live in <output_dir>/<name>/",
                      default="quickstart")
    output_dir: str = _help("folder for the run's files (palette, checkpoints, features, MLflow store)",
                            default="runs")
    sizes: str = _help("comma-separated model sizes to pretrain and compare (names of the size table)",
                       default="debug")
    model: ModelConfig = field(default_factory=lambda: ModelConfig(resolution=32))
    palette: PaletteConfig = field(default_factory=lambda: PaletteConfig(sample_pixels=200_000, max_iter=20))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    workers: int = _help("Ray Train workers (DeepSpeed ZeRO-2 data parallel, CPU gloo here); >= 1", default=2)
    holdout: float = _help("share of the training images held out for validation (probe selection)", default=0.2)
    probe_space: str = _help("probe search space (a tune_spaces/ name or file)", default="probe_lbfgs")
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sizes.split(",") if s.strip() not in MODEL_SIZES]
        if unknown or not self.sizes.strip():
            raise ValueError(f"sizes: unknown {unknown}; known: {', '.join(MODEL_SIZES)}")
        if self.workers < 1 or self.train.batch_size % self.workers:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be a multiple of workers "
                             f"({self.workers})")


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
    draft: bool = _help("decode large JPEGs at reduced DCT scale when the crop stays >= 4x IR wide (mean abs change <= 1.5 levels)", default=True)

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

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"limits.max_error_rate must be in [0, 1], got {self.max_error_rate}")


@dataclass
class FitPaletteJobConfig:
    """Sample pixels across a dataset with Ray Data and fit the k-means palette."""

    name: str = _help("run name (also the output folder under output_dir)", default="palette")
    output_dir: str = _help("folder for outputs (the palette, its table, swatch, report)", default="runs")
    data: DatasetSpec = field(default_factory=DatasetSpec)
    transform: TransformConfig = field(default_factory=TransformConfig)
    palette: PaletteConfig = field(default_factory=PaletteConfig)
    n_colors: int = _help("palette size; 2..65535", default=512)
    limits: IngestLimits = field(default_factory=IngestLimits)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class QuantizeJobConfig:
    """Write token shards (Parquet: key, label, tokens uint16[IR^2]) of one split."""

    name: str = _help("run name (also the output folder under output_dir)", default="tokens")
    output_dir: str = _help("folder for outputs: <output_dir>/<name>/<split>/tokens-NNNNN.parquet", default="runs")
    palette_path: str = _help("palette .npy from fit_palette (required)", default="")
    data: DatasetSpec = field(default_factory=DatasetSpec)
    transform: TransformConfig = field(default_factory=TransformConfig)
    rows_per_shard: int = _help("rows per output Parquet file; >= 1", default=10_000)
    limits: IngestLimits = field(default_factory=IngestLimits)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")


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
    micro_batch: int | None = _help("images per GPU per forward/backward (default: the size's recipe, else the "
                                    "preset's); the global batch is reached by gradient accumulation and must be "
                                    "a multiple of micro_batch x workers", default=None)

    def __post_init__(self) -> None:
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0..3, got {self.zero_stage}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError("deepspeed.micro_batch must be >= 1")
        if self.preset:
            preset_path(self.preset)  # fails now if it does not exist


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

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker < 0:
            raise ValueError("scaling.workers must be >= 1 and scaling.cpus_per_worker >= 0")


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


@dataclass
class PretrainJobConfig:
    """Pretrain iGPT with Ray Train + DeepSpeed on the augmented, tokenized stream of a dataset."""

    name: str = _help("run name: the run lives in <storage_path>/<name>; re-submitting the same name resumes it",
                      default="pretrain")
    storage_path: str = _help("where runs keep checkpoints and state (shared storage on a cluster)",
                              default="runs/train")
    palette_path: str = _help("palette .npy from fit_palette (required)", default="")
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
    deterministic: bool = _help(
        "replayable data order: Ray Data keeps record order and deals blocks to workers in a fixed way, so a "
        "resumed or repeated run sees exactly the same batches (costs a little throughput)", default=True)
    completions: int = _help("validation images completed from their top half in each epoch's picture",
                             default=8)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if (self.steps is not None and self.steps < 1) or self.eval_every < 0 or self.val_images < 0:
            raise ValueError("steps must be >= 1; eval_every and val_images >= 0")
        if not 0.0 < self.schedule_fraction <= 1.0:
            raise ValueError(f"schedule_fraction must be in (0, 1], got {self.schedule_fraction}")


@dataclass
class FinetuneJobConfig:
    """Fine-tune a pretrained iGPT as a classifier (the paper's recipe: the last layer's output average-pooled over
    the sequence, a linear head, loss L_CLF + L_GEN), sweeping the learning rate with Ray Tune on a held-out share
    of the training split with early stopping on validation accuracy, then refitting the best learning rate on
    train + held-out for the best trial's number of epochs and evaluating once on the test split."""

    name: str = _help("job name: it lives in <storage_path>/<name>/ (lr_<lr>/ per trial, refit/, tune/)",
                      default="finetune")
    storage_path: str = _help("where the job keeps its runs (shared storage on a cluster); the default MLflow "
                              "store is <storage_path>/mlflow.db", default="runs/finetune")
    checkpoint: str = _help("a pretraining run folder (its newest complete checkpoint), a step_* folder or a "
                            "weights.pt (required)", default="")
    palette_path: str = _help("optional: the run's palette .npy with its cached lookup table (must equal the "
                              "checkpoint's palette); without it the table is built once and kept in the job folder",
                              default="")
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


@dataclass
class SweepLRJobConfig:
    """The paper's learning-rate procedure for pretraining, as a Ray Tune sweep: pretrain with each lr of an ordered
    list in turn on the training split less a held-out share, stop at the first trial whose final validation loss
    is higher than the previous trial's, then refit the best lr on train + held-out."""

    name: str = _help("sweep name: its runs live in <storage_path>/<name>/ (lr_<lr>/, refit/, tune/); "
                      "re-submitting the same name resumes the sweep", default="sweep_lr")
    storage_path: str = _help("where the sweep and its pretraining runs keep checkpoints and state (shared storage "
                              "on a cluster); the default MLflow store is <storage_path>/mlflow.db",
                              default="runs/sweep")
    space: str = _help("search space: a tune_spaces/ name or a JSON file with an 'ordered' lr list", default="sweep_lr")
    holdout: float = _help("share of the training split (pretrain.train) held out, by a hash of the key, as every "
                           "trial's validation set (trials train on the rest); in (0, 1)", default=0.1)
    refit: bool = _help("pretrain the best lr again on train + held-out (part=all) as <name>/refit, validated on "
                        "pretrain.val (default: the test split)", default=True)
    max_failures: int = _help("retries of a failed trial, each resuming its pretraining run from its newest "
                              "complete checkpoint (-1: unlimited); a diverged trial is not retried", default=2)
    cpus_per_trial: float = _help("CPUs reserved for each trial's own process (its Ray Train workers reserve "
                                  "pretrain.scaling's); > 0", default=0.1)
    trial_fraction: float = _help(
        "each trial runs this fraction of the pretraining schedule (steps and warm-up scaled alike, so it still "
        "warms up and decays to 0); the refit runs the whole schedule; in (0, 1]", default=0.1)
    pretrain: PretrainJobConfig = field(default_factory=PretrainJobConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"cpus_per_trial must be > 0 (Ray Tune rejects 0), got {self.cpus_per_trial}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1, got {self.max_failures}")
        if not 0.0 < self.trial_fraction <= 1.0:
            raise ValueError(f"trial_fraction must be in (0, 1], got {self.trial_fraction}")
        if not self.name or self.name.startswith("/") or ".." in self.name.split("/"):
            raise ValueError(f"name must be a relative folder name, got {self.name!r}")


@dataclass
class ExtractJobConfig:
    """From a checkpoint, every layer's average-pooled features of every image, once per split (train, val, test)."""

    name: str = _help("feature set name: written to <output_dir>/<name>/<split>/", default="features")
    output_dir: str = _help("folder for feature sets (shared storage on a cluster)", default="runs/features")
    checkpoint: str = _help("a pretraining run folder (its newest complete checkpoint), a step_* folder or a "
                            "weights.pt (required)", default="")
    random_init: bool = _help("the checkpoint's architecture with fresh initial weights instead: the random-init "
                              "twin a probe is compared with", default=False)
    seed: int = _help("initialisation seed of the random-init twin", default=0)
    train: DatasetSpec = field(default_factory=DatasetSpec)
    test: DatasetSpec = field(default_factory=lambda: DatasetSpec(split="test"))
    holdout: float = _help("share of the training split held out as val (by a hash of the key); in (0, 1)",
                           default=0.1)
    transform: TransformConfig = field(default_factory=TransformConfig)
    batch_size: int = _help("images per forward pass", default=64)
    concurrency: int = _help("model replicas (Ray Data actors) computing features at once", default=1)
    cpus_per_actor: float = _help("CPUs reserved per replica (its torch threads)", default=1.0)
    use_gpu: bool = _help("one GPU per replica", default=False)
    pixels: bool = _help("also store the images' pixels (palette colours, scaled to [0, 1]) for the "
                         "raw-pixel baseline", default=True)
    log_features_max_mb: int = _help("log the feature shards to MLflow when they total at most this many MB "
                                     "(else only their manifest and location)", default=64)
    limits: IngestLimits = field(default_factory=IngestLimits)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("batch_size and concurrency must be >= 1")


@dataclass
class ProbeJobConfig:
    """Linear probes on extracted features: a Ray Tune sweep (layer x lr or regularisation) on train/val, the best
    refit on train+val and evaluated once on test; optionally the low-data CIFAR-10 protocol."""

    name: str = _help("probe run name (also its folder under output_dir)", default="probe")
    output_dir: str = _help("folder for the sweep's files (shared storage on a cluster)", default="runs/probe")
    features: str = _help("a feature set folder written by pipelines.extract (required)", default="")
    protocol: Literal["lbfgs", "sgd"] = _help(
        "lbfgs: L2 logistic regression by L-BFGS (the paper's CIFAR/STL protocol); sgd: SGD, momentum 0.9, "
        "cosine decay, high learning rates (the ImageNet protocol)", default="lbfgs")
    space: str = _help("search space: a tune_spaces/ name or a JSON file; default probe_<protocol>", default="")
    max_iter: int = _help("lbfgs: iteration limit", default=1000)
    epochs: int = _help("sgd: epochs", default=30)
    batch_size: int = _help("sgd: batch size", default=256)
    pixels: bool = _help("also probe the raw-pixel baseline (needs a feature set written with pixels)",
                         default=True)
    low_data: str = _help("low-data protocol: comma-separated label counts per run, balanced over classes "
                          "(e.g. 40,250,4000); empty: skip", default="")
    low_data_seeds: int = _help("low-data: seeds (subsets) per label count", default=3)
    cpus_per_trial: float = _help("CPUs per Tune trial", default=1.0)
    seed: int = _help("seed of the SGD protocol and the low-data subsets", default=0)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.max_iter < 1 or self.epochs < 1 or self.batch_size < 1 or self.low_data_seeds < 1:
            raise ValueError("max_iter, epochs, batch_size and low_data_seeds must be >= 1")
        for n in filter(None, self.low_data.split(",")):
            if not n.strip().isdigit() or int(n) < 1:
                raise ValueError(f"low_data: expected label counts like 40,250,4000, got {self.low_data!r}")


@dataclass
class CompareJobConfig:
    """Compare pretraining runs recorded in MLflow (igpt.compare): one row per pretraining run (size, objective,
    IR, parameters, steps, training compute, final validation loss, best probe layer and accuracy, the random-init
    twin's accuracy, fine-tuning accuracy, MLflow status), printed and written as CSV and Markdown with plots
    (of FINISHED runs unless include_unfinished), and logged as an MLflow run with tag igpt.job=compare."""

    name: str = _help("compare run name (MLflow) and folder: <output_dir>/<name>/ gets table.csv, table.md and "
                      "plots/", default="compare")
    output_dir: str = _help("folder for the tables and plots; the default MLflow store is <output_dir>/mlflow.db",
                            default="runs")
    # '%%': the help text goes through argparse's %-formatting
    name_like: str = _help("only pretraining runs whose name matches this SQL LIKE pattern ('%%' any characters, "
                           "'_' one), e.g. 'debug%%'; empty: all", default="")
    tag: str = _help("only pretraining runs with these tags: key=value, several separated by commas (all must "
                     "hold); empty: no tag filter", default="")
    filter: str = _help("a further MLflow search filter on the pretraining runs, ANDed with the others, e.g. "
                        "\"params.`model.objective` = 'ar'\"; empty: none", default="")
    include_unfinished: bool = _help("also plot pretraining runs whose MLflow status is not FINISHED (failed, "
                                     "killed, still running); the table lists every run with its status",
                                     default=False)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for item in (t.strip() for t in self.tag.split(",")):
            if item and ("=" not in item or not item.split("=", 1)[0].strip()):
                raise ValueError(f"tag: expected key=value (several separated by commas), got {item!r}")
        if not self.name or self.name.startswith("/") or ".." in self.name.split("/"):
            raise ValueError(f"name must be a relative folder name, got {self.name!r}")
