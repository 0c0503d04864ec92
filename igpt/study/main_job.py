"""The README's main job: the whole pipeline on the embedded CIFAR-10 sample, through the same entry points a
cluster run uses, on a local Ray runtime and a local MLflow store.

    python -m pipelines.main                            # debug model, ./runs/quickstart, a few minutes on 2 cores
    python -m pipelines.main --sizes debug,tiny         # two sizes, compared
    python -m pipelines.main --help                     # every flag, generated from MainJobConfig (below)

A study (``pipelines.study``) of its sizes at one learning rate (``--optim.lr``, not swept: the report says the size
comparison is confounded), its sizes at the same time as Ray tasks. Stages: fit the palette (Ray Data) -> pretrain
each size (Ray Train + DeepSpeed ZeRO-2, the images tokenized on the fly) -> extract every layer's features (Ray
Data actors) -> probe sweep over layer x regularisation (Ray Tune) with a refit on train+val and one test
evaluation -> compare the runs (MLflow search) and the study's report (laws fitted where the sizes allow).
It prints where to look.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from igpt.config import DeepSpeedConfig, OptimConfig, ScalingConfig, StoreConfig
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.model import MODEL_SIZES
from igpt.study import study_job as study
from igpt.study.study_job import StageData, StudyJobConfig


@dataclass
class MainJobConfig(StageData):
    """The README's main job, the whole pipeline on the embedded sample: fit the palette -> pretrain (Ray Train +
    DeepSpeed, tokenizing on the fly) -> extract features -> probe sweep (Ray Tune) with refit -> compare, all
    logged to MLflow. Every flag sets something in a stage's own config (``stage_configs``)."""

    name: str = _help("run name (the submitter names runs; never a timestamp); runs live in <storage_path>/<name>/",
                      default="quickstart")
    storage_path: PathStr = _help("folder for the run's files (palette, checkpoints, features, MLflow store)",
                            default="runs")
    sizes: str = _help("comma-separated model sizes to pretrain and compare (names of the size table)",
                       default="debug")
    steps: int = _help("pretraining optimizer steps of each size; >= 1", default=20)
    seed: int = _help("seed of the initial weights, the data order and the augmentations", default=0)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, global_batch=16, warmup_steps=5))
    workers: int = _help("Ray Train workers (DeepSpeed ZeRO-2 data parallel, CPU gloo here); >= 1", default=2)
    holdout: float = _help("share of the training images held out for validation (probe selection)", default=0.2)
    probe_space: str = _help("probe search space (a tune_spaces/ name or file)", default="probe_lbfgs")
    tracking: StoreConfig = field(default_factory=StoreConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sizes.split(",") if s.strip() not in MODEL_SIZES]
        if unknown or not self.sizes.strip():
            raise ValueError(f"sizes: unknown {unknown}; known: {', '.join(MODEL_SIZES)}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.workers < 1 or (self.optim.global_batch or 0) % self.workers:
            raise ValueError(f"optim.global_batch ({self.optim.global_batch}) must be a multiple of workers "
                             f"({self.workers})")
        if not 0 <= (self.optim.warmup_steps or 0) < self.steps:
            raise ValueError(f"optim.warmup_steps must be in [0, steps) (steps is {self.steps})")

    def size_list(self) -> list[str]:
        return [s.strip() for s in self.sizes.split(",")]


def study_config(cfg: MainJobConfig) -> StudyJobConfig:
    """The main job is a study of its sizes at one rate (``optim.lr``, not swept: the study's report says so), on
    the stages' CPU settings: one orchestrator for the README's command, the reproduction and a cluster study."""
    return StudyJobConfig(
        name=cfg.name, storage_path=cfg.storage_path, ladder=cfg.sizes, objective=cfg.objective,
        resolution=cfg.resolution, recipe=cfg.recipe, palette=cfg.palette, data=cfg.data, steps=cfg.steps,
        seed=cfg.seed, optim=cfg.optim, lr_space="", scaling=ScalingConfig(workers=cfg.workers),
        deepspeed=DeepSpeedConfig(preset="cpu", zero_stage=2, precision="fp32"), holdout=cfg.holdout,
        probe_space=cfg.probe_space, tracking=cfg.tracking)


def stage_configs(cfg: MainJobConfig, palette_path: str = "") -> dict:
    """Every stage's own typed config (``igpt.study.study_job.stage_configs`` of :func:`study_config`)."""
    return study.stage_configs(study_config(cfg), palette_path)


def run(cfg: MainJobConfig) -> dict:
    summary = study.run(study_config(cfg))
    summary["sizes"] = summary["rungs"]  # the README's name for them
    (study.study_root(cfg) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
