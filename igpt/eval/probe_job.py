"""Linear probes: a Ray Tune sweep of layer x learning rate (or regularisation) on train/val, refit on train+val.

    python -m pipelines.probe --name s-cifar --features runs/features/s-cifar --protocol lbfgs
    python -m pipelines.probe ... --protocol sgd --space tune_spaces/probe_sgd.json
    python -m pipelines.probe ... --low_data 40,250,4000 --low_data_seeds 5
    ray job submit --working-dir . -- python -m pipelines.probe ... --tracking.tracking_uri http://mlflow:5000

Every trial reads one layer of an extracted feature set (igpt/eval/extract_job.py) and reports its validation
accuracy; the best (layer, hyper-parameter) is refit on train+val and evaluated once on test. Layers are 0 .. L
of an L-block model, L being the final norm's output (the fine-tuning head's input); depth is layer / L. With
``pixels``, the same sweep of the regularisation runs on the raw pixels as a baseline. MLflow: this job's run is the
parent; Ray's ``MLflowLoggerCallback`` makes one child run per trial; the parent gets the best setting, the test
accuracy, a table of every trial and a plot of validation accuracy against layer. Conditions that make the numbers
mean less than they seem (held-out classes absent from train, every trial tied, test keys among train/val keys) are
printed as ``warning: ...`` on stderr and tagged ``igpt.warning.<kind>`` on the parent run.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from igpt import cli, tune_space
from igpt.config import ModelTrackingConfig
from igpt.errors import UserError
from igpt.eval import features, probe
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.raysetup import experiment_name, init_ray, named_trainable
from igpt.storage import Loc
from igpt.track.tags import (
    TAG_CHECKPOINT,
    TAG_FEATURES_RUN_ID,
    TAG_JOB,
    TAG_OBJECTIVE,
    TAG_PARENT,
    TAG_RANDOM_INIT,
    TAG_SWEEP,
    TAG_WARNING,
)
from igpt.track.tracking import JobRun, interruptible, lineage_tags
from igpt.track.trial_logger import TrialRunLogger


@dataclass
class ProbeJobConfig:
    """Linear probes on extracted features: a Ray Tune sweep (layer x lr or regularisation) on train/val, the best
    refit on train+val and evaluated once on test; optionally the low-data CIFAR-10 protocol."""

    name: str = _help("probe run name (also its folder under storage_path)", default="probe")
    storage_path: PathStr = _help("folder for the sweep's files (shared storage on a cluster)", default="runs/probe")
    features: PathStr = _help("a feature set folder written by pipelines.extract (required)", default="")
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
    tracking: ModelTrackingConfig = field(default_factory=ModelTrackingConfig)

    def __post_init__(self) -> None:
        if self.max_iter < 1 or self.epochs < 1 or self.batch_size < 1 or self.low_data_seeds < 1:
            raise ValueError("max_iter, epochs, batch_size and low_data_seeds must be >= 1")
        for n in filter(None, self.low_data.split(",")):
            if not n.strip().isdigit() or int(n) < 1:
                raise ValueError(f"low_data: expected label counts like 40,250,4000, got {self.low_data!r}")


def fit(cfg: ProbeJobConfig, x, y, params: dict) -> probe.LinearProbe:
    if cfg.protocol == "lbfgs":
        return probe.fit_lbfgs(x, y, C=params["C"], max_iter=cfg.max_iter)
    return probe.fit_sgd(x, y, lr=params["lr"], epochs=params.get("epochs", cfg.epochs),
                         batch_size=params.get("batch_size", cfg.batch_size), seed=cfg.seed)


def trial(config: dict, cfg_dict: dict) -> None:
    """One Tune trial: fit on train, score on val."""
    from ray import tune

    cfg = cli.from_dict(ProbeJobConfig, cfg_dict)
    layer = config["layer"]
    x, y, _ = features.load(cfg.features, "train", layer)
    xv, yv, _ = features.load(cfg.features, "val", layer)
    try:
        p = fit(cfg, x, y, config)
    except FloatingPointError:  # a diverged SGD probe is a bad setting, not a failed sweep
        tune.report({"val_accuracy": 0.0, "train_accuracy": 0.0, "diverged": 1})
        return
    tune.report({"val_accuracy": p.accuracy(xv, yv), "train_accuracy": p.accuracy(x, y), "diverged": 0})


def sweep(cfg: ProbeJobConfig, space: dict, name: str, uri: str, experiment: str, parent_id: str):
    """Run one Tune sweep; returns (best config, DataFrame of all trials)."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(named_trainable(trial, f"{cfg.name}_{name}"),
                                                 cfg_dict=cli.to_dict(cfg)), {"CPU": cfg.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max"),
        run_config=tune.RunConfig(
            name=experiment_name(name, (Loc(cfg.storage_path) / cfg.name).uri),
            storage_path=(Loc(cfg.storage_path) / cfg.name / "tune").uri, verbose=0,
            callbacks=[TrialRunLogger(tracking_uri=uri, experiment_name=experiment,
                                            tags={TAG_PARENT: parent_id, TAG_JOB: "probe_trial",
                                                  TAG_SWEEP: name})]),
    )
    grid = interruptible(tuner.fit)  # a stop (ray job stop) interrupts the wait at once
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} probe trial(s) failed; first: {errors[0]}")
    best = grid.get_best_result()
    return {k: best.config[k] for k in space}, grid.get_dataframe()


def refit_and_test(cfg: ProbeJobConfig, params: dict) -> tuple[dict, probe.LinearProbe, np.ndarray]:
    """The best setting fit on train+val, evaluated once on test: (figures, the probe, the test features)."""
    layer = params["layer"]
    xs, ys = zip(*(features.load(cfg.features, s, layer)[:2] for s in ("train", "val")), strict=False)
    x, y = np.concatenate(xs), np.concatenate(ys)
    xt, yt, _ = features.load(cfg.features, "test", layer)
    p = fit(cfg, x, y, params)
    return {"test_accuracy": p.accuracy(xt, yt), "trainval_accuracy": p.accuracy(x, y), "test_images": len(yt)}, p, xt


def low_data_trial(config: dict, cfg_dict: dict, layer, C: float) -> None:
    """Low-data protocol: a balanced labelled subset of train+val, L-BFGS at the swept layer; the strength is
    chosen by cross-validation inside the subset (no validation set exists at 40 labels), scored on test."""
    from ray import tune
    from sklearn.linear_model import LogisticRegressionCV

    cfg = cli.from_dict(ProbeJobConfig, cfg_dict)
    xs, ys = zip(*(features.load(cfg.features, s, layer)[:2] for s in ("train", "val")), strict=False)
    x, y = np.concatenate(xs), np.concatenate(ys)
    idx = probe.balanced_subset(y, config["labels"], config["seed"])
    per_class = config["labels"] // len(np.unique(y))
    st = probe.Standardizer.fit(x[idx])
    xr, yr = probe._rows(st(x[idx]), y[idx])
    cv = LogisticRegressionCV(Cs=[C / 100, C / 10, C, C * 10], cv=min(5, per_class), max_iter=cfg.max_iter)
    cv.fit(xr, yr)
    xt, yt, _ = features.load(cfg.features, "test", layer)
    p = probe.fit_lbfgs(x[idx], y[idx], C=float(np.atleast_1d(cv.C_)[0]), max_iter=cfg.max_iter)
    tune.report({"test_accuracy": p.accuracy(xt, yt), "C": float(np.atleast_1d(cv.C_)[0])})


def plot_by_layer(df, path: Path, pixels: float | None, n_layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_layer = df.groupby("config/layer")["val_accuracy"].max()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(by_layer.index, by_layer.values, "o-", label="best over the sweep")
    if pixels is not None:
        ax.axhline(pixels, color="grey", ls="--", label="raw pixels")
    ax.set_xlabel(f"layer (0: embeddings, {n_layer}: final norm output)")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_blocks(man: dict, where: str) -> int:
    """The block count L of a feature set's model; its layers are 0..L. A set extracted before layer L (the final
    norm's output) existed has no ``n_layer`` in its manifest: refused, rather than a sweep of a missing layer."""
    if "n_layer" not in man:
        raise UserError(f"{where} has no layer L (the final norm's output; its manifest has no n_layer): "
                         f"extract it again with pipelines.extract")
    return int(man["n_layer"])


def warn(job, kind: str, message: str | None, found: dict[str, str]) -> None:
    """A condition that makes the numbers mean less than they seem: ``warning: ...`` on stderr and the tag
    ``igpt.warning.<kind>`` on the job's (parent) MLflow run, so it shows beside the results it qualifies."""
    if message is None:
        return
    print(f"warning: {message}", file=sys.stderr)
    job.set_tag(f"{TAG_WARNING}{kind}", message[:5000])
    found[kind] = message


def check_splits(cfg: ProbeJobConfig, job, found: dict[str, str]) -> None:
    """Labels and keys of the three splits (no features read): classes the training split lacks, test leakage."""
    (ytr, ktr), (yva, kva), (yte, kte) = (features.labels_and_keys(cfg.features, s) for s in features.SPLITS)
    warn(job, "classes_missing_from_train", probe.unseen_classes(ytr, {"val": yva, "test": yte}), found)
    warn(job, "test_keys_in_train_val", probe.leaked_keys(kte, np.concatenate([ktr, kva])), found)


def log_layer_sweep(job, out: Path, df, best: dict, n_layer: int, result: dict) -> None:
    """The layer sweep's table, per-layer accuracy and best setting into ``result`` and the parent run. Depth of
    layer l is l / L: feature l is taken after l blocks (layer 0 the embeddings, layer L the final output)."""
    by_layer = df.groupby("config/layer")["val_accuracy"].max()
    result["val_accuracy_by_layer"] = {int(k): float(v) for k, v in by_layer.items()}
    result["best_val_accuracy"] = float(by_layer.max())
    result["trials"] = len(df)
    df.to_csv(out / "trials.csv", index=False)
    job.log_artifact(out / "trials.csv")
    for l, acc in result["val_accuracy_by_layer"].items():
        job.log_metric("val/accuracy_by_layer", acc, step=l)
    job.log_params({f"best.{k}": v for k, v in best.items()})
    job.log_metrics({"test/accuracy": result["test_accuracy"], "val/best_accuracy": result["best_val_accuracy"],
                     "best_layer": best["layer"], "best_layer_relative": best["layer"] / n_layer})


def run(cfg: ProbeJobConfig) -> dict:
    cfg = cli.absolute_paths(cfg)  # Tune runs each trial in its own working directory
    man = features.manifest(cfg.features)
    n_layer = model_blocks(man, cfg.features)
    space_file = tune_space.load(cfg.space or f"probe_{cfg.protocol}", job=f"probe_{cfg.protocol}")
    space = tune_space.to_tune(space_file["params"], n_layer=n_layer)  # layers 0..L, the final output included
    out = Loc(cfg.storage_path) / cfg.name  # a local folder, or s3://… / gs://…
    staging = Path(tempfile.mkdtemp(prefix="igpt-probe-"))  # files are written here, then put whole into `out`
    init_ray()
    experiment, found = cfg.tracking.experiment, {}
    with JobRun.open(cfg.tracking, cfg.storage_path, cfg.name, "probe", cli.to_dict(cfg)) as job:
        uri, parent = job.uri, job.run_id
        job.log_dict(space_file, "search_space.json")
        job.log_dict(man, "features_manifest.json")
        job.set_tags({TAG_CHECKPOINT: man["checkpoint"], TAG_RANDOM_INIT: str(man["random_init"]),
                      TAG_OBJECTIVE: man["objective"], TAG_FEATURES_RUN_ID: man["run_id"],
                      **lineage_tags(man.get("model"), man.get("pretrain_run_id"), job.client)})
        check_splits(cfg, job, found)
        best, df = sweep(cfg, space, "layers", uri, experiment, parent)
        warn(job, "trials_tied", probe.tied_trials(df["val_accuracy"]), found)
        figures, refit, xt = refit_and_test(cfg, best)
        result = {"best": best, **figures}
        # each test image right or wrong: two probes scored on the same images get a paired test (McNemar)
        yt, kt = features.labels_and_keys(cfg.features, "test")
        np.savez(staging / "test_predictions.npz", keys=kt, correct=refit.predict(xt) == yt)
        job.log_artifact(staging / "test_predictions.npz")
        result["test_predictions"] = str(out / "test_predictions.npz")
        log_layer_sweep(job, staging, df, best, n_layer, result)
        if cfg.tracking.log_model:  # the classifier the test accuracy is of, with the layer it reads
            from igpt.track.models import log_probe

            result["model_uri"] = log_probe(job, refit, best["layer"], xt[:5, 0], cfg.tracking.register,
                                            protocol=cfg.protocol, features=cfg.features,
                                            features_run_id=man["run_id"]).model_uri
        pixels_val = None
        if cfg.pixels and man.get("pixels"):
            result["pixels"] = pixels_baseline(cfg, space, job, (staging, out), (yt, kt), found)
            pixels_val = result["pixels"]["val_accuracy"]
        plot_by_layer(df, staging / "val_accuracy_by_layer.png", pixels_val, n_layer)
        job.log_artifact(staging / "val_accuracy_by_layer.png", "plots")
        if cfg.low_data:
            result["low_data"] = low_data(cfg, best, job)
        result["warnings"] = found
        (staging / "result.json").write_text(json.dumps(result, indent=2, default=float))
        job.log_artifact(staging / "result.json")
        out.put_files(staging)  # predictions, the trials table, the plot, the result
        shutil.rmtree(staging)
        result.update(run_id=parent, tracking_uri=uri)
    print(f"best {best} val {result['best_val_accuracy']:.4f} -> test {result['test_accuracy']:.4f}"
          + (f"; raw pixels test {result['pixels']['test_accuracy']:.4f}" if "pixels" in result else ""))
    return result


def pixels_baseline(cfg: ProbeJobConfig, space: dict, job, dirs: tuple, test: tuple, found: dict) -> dict:
    """The same sweep, refit and test on the raw pixels (the paper's baseline), its per-image test results beside
    the features' (a paired test reads both). ``job``: the probe's JobRun (its trials go under it); ``dirs``: (the
    local staging folder, the job's folder it goes to); ``test``: the test split's (labels, keys)."""
    pbest, pdf = sweep(cfg, {**space, "layer": "pixels"}, "pixels", job.uri, cfg.tracking.experiment, job.run_id)
    warn(job, "pixels_trials_tied", probe.tied_trials(pdf["val_accuracy"]), found)
    pres, prefit, pxt = refit_and_test(cfg, pbest)
    val = float(pdf["val_accuracy"].max())
    (yt, kt), (staging, out) = test, dirs
    np.savez(staging / "pixels_test_predictions.npz", keys=kt, correct=prefit.predict(pxt) == yt)
    job.log_artifact(staging / "pixels_test_predictions.npz")
    job.log_metrics({"baseline/pixels_test_accuracy": pres["test_accuracy"], "baseline/pixels_val_accuracy": val})
    return {"best": pbest, "val_accuracy": val, **pres, "test_predictions": str(out / "pixels_test_predictions.npz")}


def low_data(cfg: ProbeJobConfig, best: dict, job) -> dict:
    from ray import tune

    counts = [int(n) for n in cfg.low_data.split(",") if n.strip()]
    C = best.get("C", 1.0)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(named_trainable(low_data_trial, f"{cfg.name}_{C}"),
                                                 cfg_dict=cli.to_dict(cfg), layer=best["layer"], C=C),
                            {"CPU": cfg.cpus_per_trial}),
        param_space={"labels": tune.grid_search(counts),
                     "seed": tune.grid_search([cfg.seed + i for i in range(cfg.low_data_seeds)])},
        tune_config=tune.TuneConfig(metric="test_accuracy", mode="max"),
        run_config=tune.RunConfig(
            name=experiment_name("low_data", (Loc(cfg.storage_path) / cfg.name).uri),
            storage_path=(Loc(cfg.storage_path) / cfg.name / "tune").uri, verbose=0,
            callbacks=[TrialRunLogger(tracking_uri=job.uri, experiment_name=cfg.tracking.experiment,
                                      tags={TAG_PARENT: job.run_id, TAG_JOB: "probe_low_data"})]),
    )
    grid = interruptible(tuner.fit)  # a stop (ray job stop) interrupts the wait at once
    if any(r.error for r in grid):
        raise RuntimeError(f"low-data trial failed: {next(r.error for r in grid if r.error)}")
    df = grid.get_dataframe()
    out = {}
    for n, g in df.groupby("config/labels"):
        acc = g["test_accuracy"].to_numpy()
        out[int(n)] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                       "seeds": len(acc)}
        job.log_metrics({f"low_data/{int(n)}_mean": out[int(n)]["mean"],
                         f"low_data/{int(n)}_std": out[int(n)]["std"]})
    return out
