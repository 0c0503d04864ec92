"""The README's main job: the whole pipeline on the embedded CIFAR-10 sample, through the same entry points a
cluster run uses, on a local Ray runtime and a local MLflow store.

    python -m pipelines.main                            # debug model, ./runs/quickstart, a few minutes on 2 cores
    python -m pipelines.main --sizes debug,tiny         # two sizes, compared
    python -m pipelines.main --help                     # every flag, generated from igpt.config.MainJobConfig

Stages: fit the palette (Ray Data) -> pretrain each size (Ray Train + DeepSpeed ZeRO-2, the images tokenized on the
fly) -> extract every layer's features (Ray Data actors) -> probe sweep over layer x regularisation (Ray Tune) with
a refit on train+val and one test evaluation -> compare the runs (MLflow search). It prints where to look.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from igpt import cli, sources
from igpt.config import (
    CompareJobConfig,
    ExtractJobConfig,
    FitPaletteJobConfig,
    MainJobConfig,
    PretrainJobConfig,
    ProbeJobConfig,
)
from igpt.palette import Palette
from igpt.tracking import default_tracking_uri


def _flags(d: dict, prefix: str = "") -> list[str]:
    """A nested dict -> the CLI flags that set it (so every stage is configured exactly as a user would)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flags(v, f"{prefix}{k}.")
        elif isinstance(v, bool):
            out.append(f"--{prefix}{k}" if v else f"--no-{prefix}{k}")
        elif v is not None:
            out += [f"--{prefix}{k}", str(v)]
    return out


def stage_configs(cfg: MainJobConfig, palette_path: str = "") -> dict:
    """Every stage's typed config, built from the main job's flags (paths absolute: some stages run Tune trials,
    each in its own working directory)."""
    root = Path(cli.absolute_path(cfg.output_dir)) / cfg.name
    uri = cfg.tracking.tracking_uri or default_tracking_uri(root)
    track = {"tracking": {"tracking_uri": uri, "experiment": cfg.tracking.experiment}}
    res = cfg.model.resolution
    d = cfg.data
    train = {"path": d.path, "key_prefix": d.train_prefix, "max_images": d.max_images}
    test = {"path": d.path, "key_prefix": d.test_prefix, "split": "test"}
    t = cfg.train
    out = {"palette": cli.parse(FitPaletteJobConfig, _flags({
        "name": "palette", "output_dir": str(root), "data": train, "transform": {"resolution": res},
        "palette": {"sample_pixels": cfg.palette.sample_pixels, "max_iter": cfg.palette.max_iter,
                    "seed": cfg.palette.seed}, "n_colors": cfg.model.n_colors, **track}))}
    for size in (s.strip() for s in cfg.sizes.split(",")):
        run_dir = root / "train" / size
        out[f"pretrain/{size}"] = cli.parse(PretrainJobConfig, _flags({
            "name": size, "storage_path": str(root / "train"), "palette_path": palette_path or "-",
            "train": train, "val": {**test, "max_images": 0}, "val_images": 200,
            "transform": {"resolution": res, "seed": t.seed},
            "model": {"size": size, "resolution": res, "objective": cfg.model.objective},
            "optim": {"lr": t.lr, "beta1": t.beta1, "beta2": t.beta2, "weight_decay": t.weight_decay,
                      "global_batch": t.batch_size, "warmup_steps": t.warmup_steps},
            "deepspeed": {"preset": "cpu", "zero_stage": 2, "precision": "fp32",
                          "micro_batch": t.batch_size // cfg.workers},
            "scaling": {"workers": cfg.workers}, "steps": t.steps, "checkpoint": {"every_steps": t.steps},
            "completions": 4, **track}))
        out[f"extract/{size}"] = cli.parse(ExtractJobConfig, _flags({
            "name": size, "output_dir": str(root / "features"), "checkpoint": str(run_dir), "train": train,
            "test": test, "holdout": cfg.holdout, "transform": {"resolution": res}, **track}))
        out[f"probe/{size}"] = cli.parse(ProbeJobConfig, _flags({
            "name": size, "output_dir": str(root / "probe"), "features": str(root / "features" / size),
            "space": cfg.probe_space, **track}))
    out["compare"] = cli.parse(CompareJobConfig, _flags({
        "name": "compare", "output_dir": str(root), "tag": f"igpt.main={cfg.name}", **track}))
    return out


def run(cfg: MainJobConfig) -> dict:
    import mlflow

    from igpt import compare
    from igpt.raysetup import init_ray
    from pipelines import extract, fit_palette, pretrain, probe

    t0 = time.perf_counter()
    root = Path(cfg.output_dir) / cfg.name
    sources.check(stage_configs(cfg)["palette"].data)  # a wrong --data.path: one error line, before Ray starts
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
    for size in (s.strip() for s in cfg.sizes.split(",")):
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
    main(sys.argv[1:])
