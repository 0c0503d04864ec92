"""The README's main job: the whole pipeline on the embedded CIFAR-10 sample, through the same entry points a
cluster run uses, on a local Ray runtime and a local MLflow store.

    python -m pipelines.main                            # debug model, ./runs/quickstart, a few minutes on 2 cores
    python -m pipelines.main --sizes debug,tiny         # two sizes, compared
    python -m pipelines.main --help                     # every flag, generated from MainJobConfig (below)

Stages: fit the palette (Ray Data) -> pretrain each size (Ray Train + DeepSpeed ZeRO-2, the images tokenized on the
fly) -> extract every layer's features (Ray Data actors) -> probe sweep over layer x regularisation (Ray Tune) with
a refit on train+val and one test evaluation -> compare the runs (MLflow search). It prints where to look.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from igpt import cli
from igpt.cli import field_help as _help
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
from igpt.data.palette import Palette
from igpt.data.sources import DatasetSpec
from igpt.model import MODEL_SIZES, ModelConfig
from igpt.track.compare import CompareJobConfig
from igpt.track.tracking import default_tracking_uri
from pipelines.extract import ExtractJobConfig
from pipelines.fit_palette import FitPaletteJobConfig
from pipelines.pretrain import PretrainJobConfig
from pipelines.probe import ProbeJobConfig


@dataclass
class DataConfig:
    """The dataset of every stage, in any layout the jobs read: its training split (the palette, pretraining, and
    the probe's train and held-out validation) and its test split (pretraining's validation loss, the probe's test).
    The shipped sample is one Parquet file holding both splits, told apart by key prefix."""

    path: str = _help(
        "file, folder or URI of the dataset; default: the CIFAR-10 sample shipped inside the package (Parquet, "
        "1,000 train + 200 test images)", default=DEFAULT_DATA)
    format: sources.Format = _help("its layout, as every job's --*.format: parquet | imagefolder | webdataset | "
                                   "cifar10 | cifar100 | stl10", default="parquet")
    train_split: str = _help("the training split", default="train")
    test_split: str = _help("the test split (an ImageNet folder: val, with labels_file)", default="test")
    labels_file: str = _help("imagefolder: labels of a flat split folder (ImageNet's LOC_val_solution.csv)",
                             default="")
    max_images: int = _help("use at most this many training images (0: all; Parquet: the first in file order)",
                            default=0)
    train_prefix: str | None = _help("parquet: keys of training images start with this; default train/ (the "
                                     "sample's); other layouts choose a split by train_split", default=None)
    test_prefix: str | None = _help("parquet: keys of test images start with this; default test/", default=None)

    def __post_init__(self) -> None:
        if "://" not in self.path and not Path(self.path).exists():
            raise FileNotFoundError(f"data.path does not exist: {self.path}")
        if self.max_images < 0:
            raise ValueError("data.max_images must be >= 0")
        if self.format != "parquet" and (self.train_prefix or self.test_prefix):
            raise ValueError(f"data.train_prefix and data.test_prefix select Parquet rows by key; a {self.format} "
                             "dataset's splits are chosen by data.train_split and data.test_split")

    def split(self, which: Literal["train", "test"]) -> DatasetSpec:
        parquet = self.format == "parquet"
        given = self.train_prefix if which == "train" else self.test_prefix
        return DatasetSpec(path=self.path, format=self.format, split=getattr(self, f"{which}_split"),
                           key_prefix=(f"{which}/" if given is None else given) if parquet else "",
                           labels_file=self.labels_file, max_images=self.max_images if which == "train" else 0)


@dataclass
class MainJobConfig:
    """The README's main job, the whole pipeline on the embedded sample: fit the palette -> pretrain (Ray Train +
    DeepSpeed, tokenizing on the fly) -> extract features -> probe sweep (Ray Tune) with refit -> compare, all
    logged to MLflow. Every flag sets something in a stage's own config (``stage_configs``)."""

    name: str = _help("run name (the submitter names runs; never a timestamp); runs live in <output_dir>/<name>/",
                      default="quickstart")
    output_dir: str = _help("folder for the run's files (palette, checkpoints, features, MLflow store)",
                            default="runs")
    sizes: str = _help("comma-separated model sizes to pretrain and compare (names of the size table)",
                       default="debug")
    objective: Literal["ar", "bert"] = _help("pretraining objective of every size", default="ar")
    resolution: int = _help("input resolution of every stage (palette, pretraining, features); 1..64", default=32)
    recipe: Literal["cifar", "imagenet", "none"] = _help(
        "the paper's transforms of every stage: cifar (small images: pad-crop-flip when training) or imagenet "
        "(photographs: random resized crops when training, a centre crop otherwise), box-filtered to the resolution",
        default="cifar")
    palette: PaletteConfig = field(default_factory=lambda: PaletteConfig(sample_pixels=200_000, max_iter=20))
    data: DataConfig = field(default_factory=DataConfig)
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


def stage_configs(cfg: MainJobConfig, palette_path: str = "") -> dict:
    """Every stage's own typed config, composed from the main job's (paths absolute: some stages run Tune trials,
    each in its own working directory). No flag round-trip: what the main job holds is what the stages get."""
    root = Path(cli.absolute_path(cfg.output_dir)) / cfg.name
    track = TrackingConfig(tracking_uri=cfg.tracking.tracking_uri or default_tracking_uri(root),
                           experiment=cfg.tracking.experiment)
    models = ModelTrackingConfig(**asdict(track))  # pretraining and the probe log their models
    train, test = cfg.data.split("train"), cfg.data.split("test")
    eval_transform = TransformConfig(recipe=cfg.recipe, resolution=cfg.resolution, seed=cfg.seed)
    out = {"palette": FitPaletteJobConfig(name="palette", output_dir=str(root), data=train,
                                          transform=eval_transform, palette=cfg.palette, tracking=track)}
    for size in cfg.size_list():
        out[f"pretrain/{size}"] = PretrainJobConfig(
            name=size, storage_path=str(root / "train"), palette_path=palette_path or "-", train=train, val=test,
            val_images=200, transform=replace(PretrainJobConfig().transform, recipe=cfg.recipe,
                                              resolution=cfg.resolution, seed=cfg.seed),
            model=ModelConfig(size=size, resolution=cfg.resolution, objective=cfg.objective), optim=cfg.optim,
            deepspeed=DeepSpeedConfig(preset="cpu", zero_stage=2, precision="fp32",
                                      micro_batch=cfg.optim.global_batch // cfg.workers),
            scaling=ScalingConfig(workers=cfg.workers), steps=cfg.steps,
            checkpoint=CheckpointConfig(every_steps=cfg.steps), completions=4, tracking=models)
        # the pretraining run is named by its size; the runs made from it say their stage (igpt.track.tracking's
        # default_run_name): debug, debug/extract, debug/probe
        out[f"extract/{size}"] = ExtractJobConfig(
            name=size, output_dir=str(root / "features"), checkpoint=str(root / "train" / size), train=train,
            test=test, holdout=cfg.holdout, transform=eval_transform, tracking=track)
        out[f"probe/{size}"] = ProbeJobConfig(
            name=size, output_dir=str(root / "probe"), features=str(root / "features" / size),
            space=cfg.probe_space, seed=cfg.seed, tracking=models)
    out["compare"] = CompareJobConfig(name="compare", output_dir=str(root), tag=f"igpt.main={cfg.name}",
                                      tracking=track)
    return out


def run(cfg: MainJobConfig) -> dict:
    import mlflow

    from igpt.raysetup import init_ray
    from igpt.track import compare
    from pipelines import extract, fit_palette, pretrain, probe

    t0 = time.perf_counter()
    root = Path(cfg.output_dir) / cfg.name
    for spec in (cfg.data.split("train"), cfg.data.split("test")):
        sources.check(spec)  # a wrong --data.path or split: one error line, before Ray starts
    if cfg.palette.path:
        Palette.load(cfg.palette.path)
    root.mkdir(parents=True, exist_ok=True)
    init_ray()
    timings, summary = {}, {"sizes": {}}
    if cfg.palette.path:
        palette_path = cfg.palette.path
    else:
        t = time.perf_counter()
        palette_path = fit_palette.run(stage_configs(cfg)["palette"])["palette"]
        timings["palette"] = time.perf_counter() - t
    stages = stage_configs(cfg, palette_path)
    uri = stages["palette"].tracking.tracking_uri
    for size in cfg.size_list():
        t = time.perf_counter()
        pre = pretrain.run(stages[f"pretrain/{size}"])
        # the compare stage finds this pipeline's runs by this tag
        mlflow.tracking.MlflowClient(uri).set_tag(pre["run_id"], "igpt.main", cfg.name)
        timings[f"pretrain/{size}"] = time.perf_counter() - t
        t = time.perf_counter()
        extract.run(stages[f"extract/{size}"])
        timings[f"extract/{size}"] = time.perf_counter() - t
        t = time.perf_counter()
        pr = probe.run(stages[f"probe/{size}"])
        timings[f"probe/{size}"] = time.perf_counter() - t
        summary["sizes"][size] = {"pretrain_run_id": pre["run_id"], "probe_run_id": pr["run_id"],
                                  "probe_test_accuracy": pr["test_accuracy"], "best_layer": pr["best"]["layer"],
                                  "pixels_test_accuracy": pr.get("pixels", {}).get("test_accuracy"),
                                  "run_dir": pre["run_dir"]}
    t = time.perf_counter()
    comp = compare.run(stages["compare"])
    timings["compare"] = time.perf_counter() - t
    summary.update(tracking_uri=uri, experiment=cfg.tracking.experiment, compare=comp,
                   timings={k: round(v, 1) for k, v in timings.items()},
                   seconds=round(time.perf_counter() - t0, 1))
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\nstage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"everything is in {root}; MLflow experiment '{cfg.tracking.experiment}' at {uri}")
    if uri.startswith("sqlite:"):
        print(f"look at it with:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return summary


def main(argv: list[str] | None = None) -> None:
    cli.main(run, MainJobConfig, argv, prog="python -m pipelines.main")


if __name__ == "__main__":
    # run as the importable module, not as __main__: what Ray ships to workers and Tune trials (functions, the
    # config class) is then pickled by reference and resolves there, type hints included
    import importlib

    importlib.import_module("pipelines.main").main(sys.argv[1:])
