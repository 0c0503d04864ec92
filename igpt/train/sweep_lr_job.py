"""The pretraining learning-rate sweep (``python -m pipelines.sweep_lr``), the paper's procedure on Ray Tune: the
rates of an ordered list tried one at a time, each a full pretraining run at ``--trial_fraction`` of its schedule,
stopped at the first rise of the final validation loss; the best refitted on train + held-out. The manual
(procedure, diverged trials, faults and resume, the grid's edge, MLflow, layout) is the README's "The
learning-rate sweep"; the searcher below holds the rule, so Tune's saved state restores it mid-sweep.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field, replace

from ray.tune.search import Searcher

from igpt import cli, tune_space
from igpt.data import sources
from igpt.errors import UserError
from igpt.fields import PathStr
from igpt.fields import field_help as _help
from igpt.raysetup import local_cpus, named_trainable
from igpt.storage import Loc
from igpt.track.tags import (
    TAG_SWEEP,
    TAG_SWEEP_BEST_LR,
    TAG_SWEEP_EDGE_WARNING,
    TAG_SWEEP_INDEX,
    TAG_SWEEP_NEXT_RATES,
    TAG_SWEEP_REFIT_RUN_ID,
    TAG_SWEEP_ROLE,
    TAG_SWEEP_STOP_DETAIL,
    TAG_SWEEP_STOP_REASON,
)
from igpt.train.faults import Faults
from igpt.train.pretrain_job import PretrainJobConfig


@dataclass
class SweepLRJobConfig:
    """The paper's learning-rate procedure for pretraining, as a Ray Tune sweep: pretrain with each lr of an ordered
    list in turn on the training split less a held-out share, stop at the first trial whose final validation loss
    is higher than the previous trial's, then refit the best lr on train + held-out."""

    name: str = _help("sweep name: its runs live in <storage_path>/<name>/ (lr_<lr>/, refit/, tune/); "
                      "re-submitting the same name resumes the sweep", default="sweep_lr")
    storage_path: PathStr = _help("where the sweep and its pretraining runs keep checkpoints and state (shared storage "
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


METRIC = "val_loss"


# ------------------------------------------------------------------------------------------------ the procedure
def decide(values: list[float], losses: list[float]) -> dict | None:
    """Whether the sweep stops after the trials with these final losses (index order, inf for diverged): at the
    first loss higher than the one before it ("rose"), or when every value has been tried ("exhausted")."""
    i = len(losses) - 1
    if i >= 1 and losses[i] > losses[i - 1]:
        return {"reason": "rose", "index": i,
                "detail": f"val loss {losses[i]:.6g} at lr={values[i]:g} > {losses[i - 1]:.6g} at lr={values[i - 1]:g}"}
    if len(losses) >= len(values):
        return {"reason": "exhausted", "index": i, "detail": f"all {len(values)} values tried"}
    return None


def edge_warning(values: list[float], losses: list[float], stop_reason: str) -> dict | None:
    """A best rate at an end of the grid: the grid's largest tried and best (the optimum may be higher), or its
    smallest, tried because the list ran out while the loss was still falling (it may be lower). Returns
    ``{"edge", "detail", "next"}`` with the next two rates to try (the grid's own spacing, continued), or None."""
    best = best_index(losses)
    grid = sorted(set(values), reverse=True)  # the grid's ends by value: an ordered list need not be sorted
    if best is None or len(grid) < 2:
        return None
    top, low = grid[0] / grid[1] if grid[1] else 3.0, grid[-2] / grid[-1] if grid[-1] else 3.0
    if values[best] == grid[0]:
        nxt = [grid[0] * top, grid[0] * top**2]
        return {"edge": "largest", "next": nxt, "detail": f"the best lr {grid[0]:g} is the grid's largest: the "
                f"optimum may lie above it; try {nxt[0]:g}, {nxt[1]:g} (prepend them to the space's ordered list)"}
    if values[best] == grid[-1] and stop_reason == "exhausted":
        nxt = [grid[-1] / low, grid[-1] / low**2]
        return {"edge": "smallest", "next": nxt, "detail": f"the best lr {grid[-1]:g} is the grid's smallest and "
                f"the loss was still falling: the optimum may lie below it; try {nxt[0]:g}, {nxt[1]:g} (append "
                "them to the space's ordered list)"}
    return None


def best_index(losses: list[float]) -> int | None:
    """The trial with the lowest finite final loss (the earlier one on a tie); None when all diverged."""
    finite = [(v, i) for i, v in enumerate(losses) if math.isfinite(v)]
    return min(finite)[1] if finite else None


class OrderedSearcher(Searcher):
    """Suggests ``{param: values[i], "index": i}`` for i = 0, 1, ... one trial at a time (the next value depends on
    this one's result), and ``FINISHED`` once :func:`decide` stops the sweep or a trial fails.

    Its whole state (values, live trial, losses so far, stop) is saved with Ray Tune's experiment and restored by
    ``Tuner.restore``; a trial that was live when the sweep died is resumed by Tune under the same trial id."""

    def __init__(self, values: list[float], param: str = "lr", metric: str = METRIC, mode: str = "min"):
        if mode != "min":
            raise ValueError("the ordered procedure minimises a loss (mode='min')")
        if not values:
            raise UserError("no values to try")
        super().__init__(metric=metric, mode=mode)
        self.values = [float(v) for v in values]
        self.param = param
        self.live: dict[str, int] = {}  # trial id -> index
        self.losses: list[float] = []  # final losses of trials 0..k-1
        self.stop: dict | None = None

    # --- Tune's interface
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return (metric in (None, self._metric)) and (mode in (None, self._mode))

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return True  # handled here: always one at a time

    def suggest(self, trial_id: str):
        if self.stop is not None:
            return Searcher.FINISHED
        if self.live:
            return None  # wait for the live trial's result
        i = len(self.losses)
        self.live[trial_id] = i
        return {self.param: self.values[i], "index": i}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i = self.live.pop(trial_id, None)
        if i is None or self.stop is not None:
            return
        if error or not result or self._metric not in result:
            self.stop = {"reason": "failed", "index": i,
                         "detail": f"trial {i} ({self.param}={self.values[i]:g}) failed after its retries"}
            return
        loss = float(result[self._metric])
        self.losses.append(loss if math.isfinite(loss) else math.inf)
        self.stop = decide(self.values, self.losses)

    # --- persistence (Tuner.restore)
    def get_state(self) -> dict:
        return {"values": self.values, "param": self.param, "metric": self._metric, "mode": self._mode,
                "live": dict(self.live), "losses": list(self.losses), "stop": self.stop}

    def set_state(self, state: dict) -> None:
        if state["values"] != self.values or state["param"] != self.param:
            raise UserError(f"saved sweep tried {state['param']}={state['values']}, this one "
                             f"{self.param}={self.values}: use another sweep name for another space")
        self.live, self.losses, self.stop = dict(state["live"]), list(state["losses"]), state["stop"]
        self._metric, self._mode = state["metric"], state["mode"]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.set_state(pickle.load(fh))


# ------------------------------------------------------------------------------------------------ one trial
def run_name(cfg: SweepLRJobConfig, lr: float | None) -> str:
    return f"{cfg.name}/refit" if lr is None else f"{cfg.name}/lr_{lr:g}"


def pretrain_config(cfg: SweepLRJobConfig, lr: float, parent_run_id: str | None, refit: bool = False
                    ) -> PretrainJobConfig:
    """A trial's pretraining job (train on part=rest, validate on part=holdout of the training split), or the
    refit's (train on part=all, validate on pretrain.val)."""
    d = cli.to_dict(cfg.pretrain)
    d["name"] = run_name(cfg, None if refit else lr)
    d["storage_path"] = cfg.storage_path
    d["optim"]["lr"] = lr
    role = f"{TAG_SWEEP_ROLE}={'refit' if refit else 'trial'}"  # at creation: compare tells a trial from a result
    d["tracking"].update(run_name=None, parent_run_id=parent_run_id,
                         tags=",".join(filter(None, [d["tracking"].get("tags", ""), role])))
    if not refit:  # a trial's weights are a step of the search, not a result: only the refit's model is logged
        d["tracking"].update(log_model=False, register=None)
    d["schedule_fraction"] = 1.0 if refit else cfg.trial_fraction
    rest, holdout, every = cfg.pretrain.train.held_out_split(cfg.holdout)
    d["train"] = cli.to_dict(every if refit else rest)
    if not refit:  # a token split's held-out records are validated on their source's images, un-augmented
        d["val"] = cli.to_dict(sources.image_source(holdout))
    return cli.from_dict(PretrainJobConfig, d)


def final_val_loss(client, run_id: str, total_steps: int) -> float:
    """The validation loss pretraining logged at its last step (it always evaluates there)."""
    hist = [m for m in client.get_metric_history(run_id, "val/loss") if m.step == total_steps]
    if not hist:
        raise RuntimeError(f"MLflow run {run_id} has no val/loss at its final step {total_steps}")
    return float(hist[-1].value)


def pretrain_once(pcfg: PretrainJobConfig, diverged_ok: bool) -> dict:
    """Run (or resume) a pretraining run to its end; a finished one (its summary.json) is not run again. Returns
    ``{"run_id", "val_loss", "diverged", "resumed", "run_dir"}``; a diverged run raises unless ``diverged_ok``."""
    from mlflow.tracking import MlflowClient

    from igpt.train import pretrain_job as pretrain
    from igpt.train.train_loop import NONFINITE

    run_dir = Loc(pcfg.storage_path) / pcfg.name
    marker, done = run_dir / NONFINITE, run_dir / "summary.json"
    summary = None
    if not marker.exists():  # a diverged run diverges again: not retried
        if done.exists():
            summary = json.loads(done.read_text())
        else:
            try:
                summary = pretrain.run(pcfg)
            except Exception:
                if not marker.exists():
                    raise  # a failure: Tune retries the trial, which resumes from the newest checkpoint
    if summary is None:
        if not diverged_ok:
            raise FloatingPointError(f"{pcfg.name} diverged: {marker.read_text().strip()}")
        return {"run_id": (run_dir / "mlflow_run_id").read_text().strip(), "val_loss": math.inf, "diverged": True,
                "resumed": False, "run_dir": str(run_dir), "detail": marker.read_text().strip()}
    loss = final_val_loss(MlflowClient(summary["tracking_uri"]), summary["run_id"], summary["total_steps"])
    if not math.isfinite(loss) and not diverged_ok:
        raise FloatingPointError(f"{pcfg.name}: final validation loss is {loss}")
    return {"run_id": summary["run_id"], "val_loss": loss if math.isfinite(loss) else math.inf,
            "diverged": not math.isfinite(loss), "resumed": bool(summary.get("resumed")), "run_dir": str(run_dir)}


def log_trial(uri: str, parent_run_id: str, index: int, lr: float, out: dict) -> None:
    """The trial's point on the parent run (once, even when a resumed trial reports again)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    client.set_tag(out["run_id"], TAG_SWEEP, parent_run_id)
    client.set_tag(out["run_id"], TAG_SWEEP_INDEX, str(index))
    if any(m.step == index for m in client.get_metric_history(parent_run_id, "sweep/lr")):
        return
    ms = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[
        Metric("sweep/val_loss", out["val_loss"], ms, index), Metric("sweep/lr", lr, ms, index),
        Metric("sweep/diverged", float(out["diverged"]), ms, index)])


def trial(config: dict, cfg_dict: dict, parent_run_id: str, tracking_uri: str, faults: dict | None = None) -> None:
    """Ray Tune function trainable: one full pretraining run at ``config["lr"]``; reports its final val loss.
    ``faults``: the sweep driver's test faults (igpt.train.faults), handed to the trial's pretraining driver."""
    from ray import tune

    from igpt.train import faults as fault_env

    if faults:
        os.environ[fault_env.ENV] = json.dumps(faults)
    cfg = cli.from_dict(SweepLRJobConfig, cfg_dict)
    lr, index = float(config["lr"]), int(config["index"])
    out = pretrain_once(pretrain_config(cfg, lr, parent_run_id), diverged_ok=True)
    log_trial(tracking_uri, parent_run_id, index, lr, out)
    tune.report({METRIC: out["val_loss"], "lr": lr, "index": index, "diverged": out["diverged"],
                 "resumed": out["resumed"], "run_id": out["run_id"]})


# ------------------------------------------------------------------------------------------------ the driver
def load_values(space: str) -> list[float]:
    data = tune_space.load(space, job="sweep_lr")
    spec = data["params"]["lr"]
    if "ordered" not in spec:
        raise tune_space.SpaceError(f"{space}: sweep_lr tries an 'ordered' lr list, got {next(iter(spec))}")
    return [float(v) for v in tune_space.to_tune(data["params"])["lr"]]


def _parent_run(cfg: SweepLRJobConfig, values: list[float], sweep_dir: Loc):
    """The sweep's MLflow run (a re-submission continues it); the store and experiment are created here, before
    any trial touches them (SQLite schema race)."""
    from igpt.track.tracking import JobRun

    params = {"space": cfg.space, "order": json.dumps(values), "holdout": cfg.holdout, "refit": cfg.refit,
              "max_failures": cfg.max_failures, "name": cfg.name}
    job = JobRun.open(replace(cfg.pretrain.tracking, run_name=None), cfg.storage_path, cfg.name, "sweep_lr",
                      cli.to_dict(cfg), params=params, id_file=sweep_dir / "mlflow_run_id")
    if not job.resumed:
        job.log_dict(tune_space.load(cfg.space, job="sweep_lr"), "space.json")
    return job


def _ray_cpus(cfg: SweepLRJobConfig) -> int:
    """Logical CPUs for a local runtime: a trial, its workers, and a whole CPU left for Ray Data's tasks."""
    s = cfg.pretrain.scaling
    return local_cpus(s.workers * s.cpus_per_worker + cfg.cpus_per_trial)


def _check_cpus(cfg: SweepLRJobConfig) -> None:
    import ray

    s = cfg.pretrain.scaling
    need = s.workers * s.cpus_per_worker + cfg.cpus_per_trial + 1
    have = ray.cluster_resources().get("CPU", 0)
    if have < need:  # a warning, not an error: an autoscaling cluster may grow
        print(f"warning: the cluster has {have:g} CPUs; a trial needs {s.workers} x {s.cpus_per_worker:g} for its "
              f"workers + {cfg.cpus_per_trial:g} for itself + 1 for Ray Data's tasks = {need:g}, else Ray Data "
              f"waits forever (lower --pretrain.scaling.cpus_per_worker or --cpus_per_trial)", file=sys.stderr)


def run(cfg: SweepLRJobConfig) -> dict:
    from igpt.raysetup import init_ray

    cfg = cli.absolute_paths(cfg)  # Tune runs each trial in its own working directory
    values = load_values(cfg.space)
    if not cfg.pretrain.palette_path:
        raise UserError("pretrain.palette_path is required (fit one with pipelines.fit_palette)")
    pretrain_config(cfg, values[0], None)  # a bad pretraining config fails now, not in a trial
    pretrain_config(cfg, values[0], None, refit=True)
    sweep_dir = Loc(cfg.storage_path) / cfg.name  # a local folder, or s3://… / gs://…
    with _parent_run(cfg, values, sweep_dir) as job:
        init_ray(num_cpus=_ray_cpus(cfg))
        _check_cpus(cfg)
        summary = _outcome(job.wait(_tuner(cfg, job, values, sweep_dir).fit), values)
        summary.update(name=cfg.name, parent_run_id=job.run_id, tracking_uri=job.uri, sweep_dir=str(sweep_dir),
                       refit=None)
        _record_outcome(cfg, job, summary, sweep_dir)
        if cfg.refit:
            out = refit(cfg, summary["best_lr"], job.run_id)
            job.client.set_tag(out["run_id"], TAG_SWEEP, job.run_id)
            job.client.set_tag(out["run_id"], TAG_SWEEP_ROLE, "refit")
            job.set_tag(TAG_SWEEP_REFIT_RUN_ID, out["run_id"])
            job.log_metric("refit/val_loss", out["val_loss"])
            summary["refit"] = out
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    trials = ", ".join(f"lr={t['lr']:g}: {t['val_loss']:.4f}" for t in summary["trials"])
    print(f"sweep {cfg.name}: {trials}; stopped ({summary['stop_reason']}: {summary['stop_detail']}); best lr "
          f"{summary['best_lr']:g}" + (f"; refit {summary['refit']['run_id']} val loss "
                                        f"{summary['refit']['val_loss']:.4f}" if summary["refit"] else "")
          + f"; MLflow run {job.run_id} at {job.uri}")
    return summary


def tune_name(sweep_dir: Loc) -> str:
    """The folder of the sweep's Tune experiment in ``sweep_dir``: ``tune-<hash of the sweep's folder>``, a name
    no other sweep shares (``igpt.raysetup.experiment_name``: two sweeps named alike that start in the same second
    mixed their state)."""
    from igpt.raysetup import experiment_name

    return experiment_name("tune", sweep_dir.uri)


def _tuner(cfg: SweepLRJobConfig, job, values: list[float], sweep_dir: Loc):
    """Tune's experiment of this sweep: restored when a killed sweep left one, else a new one."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(named_trainable(trial, cfg.name), cfg_dict=cli.to_dict(cfg), parent_run_id=job.run_id,
                             tracking_uri=job.uri, faults=Faults.from_env().as_dict()),
        {"CPU": cfg.cpus_per_trial})
    tune_dir = (sweep_dir / tune_name(sweep_dir)).uri  # Tune reads and writes local folders and object storage
    if tune.Tuner.can_restore(tune_dir):
        print(f"resuming the sweep from {tune_dir}")
        return tune.Tuner.restore(tune_dir, trainable)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=OrderedSearcher(values), num_samples=len(values),
                                    max_concurrent_trials=1),
        run_config=tune.RunConfig(name=tune_name(sweep_dir), storage_path=sweep_dir.uri, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))


def _record_outcome(cfg: SweepLRJobConfig, job, summary: dict, sweep_dir: Loc) -> None:
    """Why the sweep stopped and its best rate, on its MLflow run; a failed sweep or one whose every trial
    diverged ends here with what to do."""
    job.set_tag(TAG_SWEEP_STOP_REASON, summary["stop_reason"])
    job.set_tag(TAG_SWEEP_STOP_DETAIL, summary["stop_detail"])
    edge = edge_warning(load_values(cfg.space), [t["val_loss"] for t in summary["trials"]], summary["stop_reason"])
    summary["edge_warning"] = edge
    if edge is not None:  # a warning, not an error: the rate is still the best of those tried
        print(f"warning: sweep {cfg.name}: {edge['detail']}", file=sys.stderr)
        job.set_tag(TAG_SWEEP_EDGE_WARNING, edge["detail"])
        job.set_tag(TAG_SWEEP_NEXT_RATES, ",".join(f"{v:g}" for v in edge["next"]))
    if summary["best_lr"] is not None:
        job.set_tag(TAG_SWEEP_BEST_LR, f"{summary['best_lr']:g}")
        job.log_metric("sweep/best_lr", summary["best_lr"])
    if summary["stop_reason"] == "failed":
        # set aside, so that a re-submission starts a new Tune experiment: its trials replay the finished
        # pretraining runs from their records (nothing is trained again) and resume the failed one
        failed = [c for c in sweep_dir.children() if c.name.startswith("tune.failed-")]
        kept = sweep_dir / f"tune.failed-{len(failed) + 1}"
        (sweep_dir / tune_name(sweep_dir)).move_to(kept)
        raise RuntimeError(f"sweep {cfg.name}: {summary['stop_detail']}; Tune's experiment moved to {kept}; "
                           f"re-submit to retry (the failed trial resumes from its newest checkpoint)")
    if summary["stop_reason"] == "all_diverged":
        raise RuntimeError(f"sweep {cfg.name}: every trial diverged; try lower learning rates")


def refit(cfg: SweepLRJobConfig, lr: float, parent_run_id: str) -> dict:
    """The best rate on train + held-out, retried like a trial (each retry resumes the run); a divergence is final."""
    pcfg = pretrain_config(cfg, lr, parent_run_id, refit=True)
    attempt = 0
    while True:
        attempt += 1
        try:
            return pretrain_once(pcfg, diverged_ok=False)
        except FloatingPointError:
            raise
        except Exception as e:
            if 0 <= cfg.max_failures < attempt:
                raise
            print(f"refit {pcfg.name} failed ({type(e).__name__}: {e}); retry {attempt} resumes it from its newest "
                  f"complete checkpoint", file=sys.stderr)


def _outcome(grid, values: list[float]) -> dict:
    """The trials in order and why the sweep ended, from Tune's results; the same rule the searcher applied."""
    trials, failed = [], []
    for r in grid:
        if r.config is None or "index" not in r.config:
            continue
        if r.error is not None or METRIC not in (r.metrics or {}):
            failed.append((int(r.config["index"]), r.error))
            continue
        m = r.metrics
        trials.append({"index": int(m["index"]), "lr": float(m["lr"]), "val_loss": float(m[METRIC]),
                       "diverged": bool(m["diverged"]), "resumed": bool(m["resumed"]), "run_id": m["run_id"]})
    trials.sort(key=lambda t: t["index"])
    losses = [t["val_loss"] for t in trials]
    if [t["index"] for t in trials] != list(range(len(trials))):
        raise RuntimeError(f"the sweep's trials are not the first {len(trials)} values in order: {trials}")
    if failed:
        i, err = min(failed, key=lambda f: f[0])
        last = (str(err).strip().splitlines() or [""])[-1][:300]
        stop = {"reason": "failed", "index": i,
                "detail": f"trial {i} (lr={values[i]:g}) failed after its retries ({type(err).__name__}: {last})"}
    else:
        stop = next((s for k in range(1, len(losses) + 1) if (s := decide(values, losses[:k]))), None)
        if stop is None or stop["index"] != len(losses) - 1:
            raise RuntimeError(f"the sweep ended without a stop at its last trial: {trials}, {stop}")
    best = best_index(losses)
    if best is None and stop["reason"] != "failed":
        stop = {"reason": "all_diverged", "index": stop["index"], "detail": "every trial diverged"}
    return {"trials": trials, "stop_reason": stop["reason"], "stop_detail": stop["detail"],
            "best_lr": trials[best]["lr"] if best is not None else None}
