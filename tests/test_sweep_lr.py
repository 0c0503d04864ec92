"""The pretraining learning-rate sweep: the ordered searcher on its own (fast), then a real sweep (Ray Tune trials,
each a real Ray Train + DeepSpeed pretraining run on the CPU, logging to a real MLflow SQLite store)."""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from ray.tune.search import Searcher

from igpt import cli
from igpt.storage import Loc
from igpt.train.checkpoints import checkpoint_dirs
from pipelines import sweep_lr
from pipelines.sweep_lr import OrderedSearcher, SweepLRJobConfig, decide

from .conftest import SAMPLE

INF = math.inf


def complete(s: OrderedSearcher, trial_id: str, loss=None, error=False):
    s.on_trial_complete(trial_id, None if loss is None else {"val_loss": loss}, error=error)


def drive(values, losses):
    """Run the searcher as Tune does (one suggestion per free slot) with these final losses per value; returns the
    values it suggested, in order, and its stop."""
    s = OrderedSearcher(values)
    tried = []
    for n in range(len(values) + 2):
        cfg = s.suggest(f"t{n}")
        if cfg == Searcher.FINISHED:
            return tried, s.stop
        assert cfg == {"lr": values[len(tried)], "index": len(tried)}
        assert s.suggest(f"t{n}-extra") is None  # one trial at a time: the next value waits for this result
        tried.append(cfg["lr"])
        complete(s, f"t{n}", losses[cfg["index"]])
    raise AssertionError("the searcher never finished")


@pytest.mark.parametrize("losses, n_tried, reason", [
    ([3.0, 2.5, 2.7, 1.0, 0.5], 3, "rose"),  # 2.7 > 2.5: stop; the last two rates are never run
    ([3.0, 2.5, 2.0, 1.5, 1.0], 5, "exhausted"),  # always falling: every rate
    ([3.0, 3.0, 2.9, 3.1, 1.0], 4, "rose"),  # equal is not a rise
    ([INF, INF, 2.5, 2.4, 2.6], 5, "rose"),  # diverged at first: lower rates are tried until one trains
    ([2.5, INF, 1.0, 0.5, 0.1], 2, "rose"),  # diverged after a finite loss: a rise
    ([2.5, float("nan"), 1.0, 0.5, 0.1], 2, "rose"),  # a nan final loss counts as diverged
    ([INF] * 5, 5, "exhausted"),
])
def test_rates_are_tried_in_order_until_the_loss_rises(losses, n_tried, reason):
    values = [0.1, 0.03, 0.01, 0.003, 0.001]
    tried, stop = drive(values, losses)
    assert tried == values[:n_tried]
    assert stop["reason"] == reason and stop["index"] == n_tried - 1


def test_a_failed_trial_stops_the_sweep():
    s = OrderedSearcher([0.1, 0.01, 0.001])
    assert s.suggest("a") == {"lr": 0.1, "index": 0}
    complete(s, "a", 2.0)
    assert s.suggest("b") == {"lr": 0.01, "index": 1}
    complete(s, "b", error=True)
    assert s.stop["reason"] == "failed" and s.stop["index"] == 1
    assert s.suggest("c") == Searcher.FINISHED


def test_unknown_trials_and_a_result_without_the_metric():
    s = OrderedSearcher([0.1, 0.01])
    complete(s, "nobody", 1.0)  # not a trial of this searcher: ignored
    assert s.losses == [] and s.stop is None
    assert s.suggest("a") == {"lr": 0.1, "index": 0}
    s.on_trial_complete("a", {"loss": 1.0})  # no val_loss: as a failure
    assert s.stop["reason"] == "failed"


def test_searcher_state_survives_save_and_restore_mid_trial(tmp_path):
    values = [0.1, 0.03, 0.01, 0.003]
    s = OrderedSearcher(values)
    s.suggest("a")
    complete(s, "a", 3.0)
    assert s.suggest("b") == {"lr": 0.03, "index": 1}  # live when the sweep dies
    s.save_to_dir(str(tmp_path), session_str="x")  # what Tune does with the experiment state
    again = OrderedSearcher(values)
    again.restore_from_dir(str(tmp_path))  # what Tuner.restore does
    assert again.live == {"b": 1} and again.losses == [3.0] and again.stop is None
    assert again.suggest("c") is None  # still waiting for the resumed trial
    complete(again, "b", 2.0)  # Tune resumes the interrupted trial under its own id
    assert again.suggest("c") == {"lr": 0.01, "index": 2}
    complete(again, "c", 2.2)
    assert again.stop["reason"] == "rose" and again.suggest("d") == Searcher.FINISHED
    # a finished sweep restores finished
    again.save(str(tmp_path / "done.pkl"))
    third = OrderedSearcher(values)
    third.restore(str(tmp_path / "done.pkl"))
    assert third.suggest("e") == Searcher.FINISHED and third.losses == [3.0, 2.0, 2.2]
    # another space under the same sweep is refused, not silently mixed
    with pytest.raises(ValueError, match="another sweep name"):
        OrderedSearcher([0.5, 0.1]).restore(str(tmp_path / "done.pkl"))
    assert pickle.loads(pickle.dumps(third)).get_state() == third.get_state()  # Tune pickles it in tuner.pkl


def test_decide_and_best():
    assert decide([1, 2, 3], [5.0]) is None
    assert decide([1, 2, 3], [5.0, 6.0])["reason"] == "rose"
    assert decide([1, 2], [5.0, 4.0])["reason"] == "exhausted"
    assert sweep_lr.best_index([INF, 2.0, 2.0, 3.0]) == 1
    assert sweep_lr.best_index([INF, INF]) is None


def test_refit_retries_a_failure_then_gives_up_but_never_retries_a_divergence(tmp_path, capsys):
    """Real pretrain.run calls that fail fast (the palette file is missing: before any Ray work)."""
    argv = ["--name", "s", "--storage_path", str(tmp_path), "--max_failures", "2",
            "--pretrain.palette_path", str(tmp_path / "missing.npy"), "--pretrain.train.path", str(SAMPLE)]
    cfg = cli.absolute_paths(cli.parse(SweepLRJobConfig, argv))
    with pytest.raises(FileNotFoundError):
        sweep_lr.refit(cfg, 0.01, None)
    err = capsys.readouterr().err
    assert err.count("failed (MissingInput") == 2 and "retry 2 resumes" in err  # 3 attempts in all
    marker = tmp_path / "s" / "refit" / "nonfinite_loss"
    marker.parent.mkdir(parents=True)
    marker.write_text("loss nan at step 3\n")
    (marker.parent / "mlflow_run_id").write_text("x")
    with pytest.raises(FloatingPointError, match="diverged: loss nan at step 3"):
        sweep_lr.refit(cfg, 0.01, None)
    assert "retry" not in capsys.readouterr().err


def test_space_and_job_config(tmp_path):
    assert sweep_lr.load_values("sweep_lr") == [0.01, 0.003, 0.001, 0.0003, 0.0001]
    bad = tmp_path / "grid.json"
    bad.write_text(json.dumps({"job": "sweep_lr", "params": {"lr": {"grid_search": [0.1, 0.01]}}}))
    with pytest.raises(ValueError, match="ordered"):
        sweep_lr.load_values(str(bad))
    cfg = cli.parse(SweepLRJobConfig, ["--name", "s", "--storage_path", "rel/runs", "--holdout", "0.2",
                                       "--pretrain.train.path", str(SAMPLE), "--pretrain.train.key_prefix", "train/",
                                       "--pretrain.val.path", str(SAMPLE), "--pretrain.val.key_prefix", "test/",
                                       "--pretrain.model.size", "debug", "--pretrain.optim.lr", "0.5"])
    cfg = cli.absolute_paths(cfg)
    assert Path(cfg.storage_path).is_absolute()  # trials run in Tune's own working directory
    t = sweep_lr.pretrain_config(cfg, 0.003, "parent")
    assert t.name == "s/lr_0.003" and t.optim.lr == 0.003 and t.tracking.parent_run_id == "parent"
    assert (t.train.part, t.train.holdout, t.val.part, t.val.holdout) == ("rest", 0.2, "holdout", 0.2)
    assert t.val.key_prefix == "train/" and t.val.split == t.train.split  # the held-out share of the train split
    assert t.model.size == "debug" and t.storage_path == cfg.storage_path
    r = sweep_lr.pretrain_config(cfg, 0.003, "parent", refit=True)
    assert r.name == "s/refit" and r.train.part == "all" and r.val.key_prefix == "test/"
    for argv in (["--holdout", "0"], ["--cpus_per_trial", "0"], ["--name", "../x"]):
        with pytest.raises(SystemExit):
            cli.parse(SweepLRJobConfig, argv)


# ---------------------------------------------------------------------------------------------- a real sweep
@pytest.fixture(scope="module")
def palette_path(tmp_path_factory, cifar_images):
    from igpt.data.palette import Palette

    path = tmp_path_factory.mktemp("palette") / "palette.npy"
    Palette.fit(cifar_images[:100].reshape(-1, 3), max_iter=5).save(path)
    return path


def sweep_job(tmp_path, palette_path, space: Path, *extra: str, name="s") -> SweepLRJobConfig:
    # the packaged sample: 1,000 train/ images (~800 trained on, ~200 held out) and 200 test/ images
    argv = ["--name", name, "--storage_path", str(tmp_path / "runs"), "--space", str(space), "--holdout", "0.2",
            "--cpus_per_trial", "0.2", "--max_failures", "1", "--pretrain.checkpoint.max_failures", "0",
            "--pretrain.palette_path", str(palette_path),
            "--pretrain.train.path", str(SAMPLE), "--pretrain.train.key_prefix", "train/",
            "--pretrain.val.path", str(SAMPLE), "--pretrain.val.key_prefix", "test/",
            "--pretrain.val_images", "32", "--pretrain.completions", "0", "--pretrain.model.size", "debug",
            "--pretrain.deepspeed.preset", "cpu", "--pretrain.deepspeed.precision", "fp32",
            "--pretrain.deepspeed.micro_batch", "8", "--pretrain.optim.global_batch", "16",
            "--pretrain.optim.warmup_steps", "1", "--pretrain.steps", "5", "--trial_fraction", "1",
            # 2 workers x 0.4 + the trial's 0.2 leave one whole CPU of the 2 for Ray Data
            "--pretrain.scaling.workers", "2", "--pretrain.scaling.cpus_per_worker", "0.4", *extra]
    return cli.parse(SweepLRJobConfig, argv)


@pytest.mark.slow  # ~4 min: two pretraining trials, a refit, and three re-submissions
def test_sweep_stops_when_the_loss_rises_and_refits_the_best(tmp_path, palette_path, ray_local):
    """Order 0.005, 1e12, 0.001. 0.005 trains. 1e12 diverges: its first update makes the step-3 forward overflow
    float32, the loss is nan, pretraining stops it (no retry) and its val loss is inf: higher than 0.005's, so the
    loss rose and the sweep stops; 0.001 is never run. (A rate like 1e8 does not diverge: DeepSpeed skips the steps
    whose gradient norm overflows and the loss stays finite.) The best, 0.005, is refitted on train + held-out and
    validated on the test images."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"_comment": "test", "job": "sweep_lr",
                                 "params": {"lr": {"ordered": [0.005, 1e12, 0.001]}}}))
    # 12 steps: enough for 0.005's training loss to fall well clear of ln 512 (5 left it 0.1-0.2 below)
    cfg = sweep_job(tmp_path, palette_path, space, "--pretrain.steps", "12")
    summary = sweep_lr.run(cfg)
    trials = summary["trials"]
    print("trials:", [(t["lr"], t["val_loss"], t["diverged"]) for t in trials])
    assert [t["lr"] for t in trials] == [0.005, 1e12]  # in order; 0.001 never ran
    assert [t["diverged"] for t in trials] == [False, True]
    assert math.isfinite(trials[0]["val_loss"]) and trials[1]["val_loss"] == INF
    assert summary["stop_reason"] == "rose" and summary["best_lr"] == 0.005
    sweep_dir = tmp_path / "runs" / "s"
    assert sorted(p.name for p in sweep_dir.glob("lr_*")) == ["lr_0.005", "lr_1e+12"]
    assert (sweep_dir / "lr_1e+12" / "nonfinite_loss").read_text().startswith("loss nan at step")
    assert not (sweep_dir / "lr_0.005" / "nonfinite_loss").exists()
    assert not trials[0]["resumed"] and not summary["refit"]["resumed"]

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["igpt.job"] == "sweep_lr"
    assert json.loads(parent.data.params["order"]) == [0.005, 1e12, 0.001]
    assert parent.data.params["space"] == str(space)
    assert parent.data.tags["sweep.stop_reason"] == "rose" and parent.data.tags["sweep.best_lr"] == "0.005"
    hist = sorted(client.get_metric_history(parent.info.run_id, "sweep/lr"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(0, 0.005), (1, 1e12)]
    vals = sorted(client.get_metric_history(parent.info.run_id, "sweep/val_loss"), key=lambda m: m.step)
    assert [m.step for m in vals] == [0, 1] and vals[0].value == pytest.approx(trials[0]["val_loss"])
    assert vals[1].value > 1e300  # inf (MLflow stores it as the largest double)
    assert [m.value for m in sorted(client.get_metric_history(parent.info.run_id, "sweep/diverged"),
                                    key=lambda m: m.step)] == [0.0, 1.0]
    for t in trials:  # every trial's pretraining run is a child of the sweep's run, at its lr
        child = client.get_run(t["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name == f"s/lr_{t['lr']:g}" and float(child.data.params["optim.lr"]) == t["lr"]
        assert child.data.params["train.part"] == "rest" and child.data.params["val.part"] == "holdout"
        assert child.info.status == ("FAILED" if t["diverged"] else "FINISHED")
        if t["diverged"]:
            assert child.data.metrics["train/nonfinite_loss"] == 1.0
    ok = client.get_run(trials[0]["run_id"])
    assert ok.data.metrics["val/loss"] == pytest.approx(trials[0]["val_loss"])
    history = sorted(client.get_metric_history(ok.info.run_id, "train/loss"), key=lambda m: m.step)
    train_loss = [m.value for m in history]
    assert len(train_loss) == 12
    # 0.005 trains: from the zero-initialised head's ln 512 the training loss falls (its held-out loss after 12
    # steps was 6.12 in one run and 6.61 in another, either side of ln 512, so it is not what shows learning here)
    assert train_loss[0] == pytest.approx(math.log(512), abs=1e-3) and np.mean(train_loss[-3:]) < train_loss[0] - 0.1

    refit = client.get_run(summary["refit"]["run_id"])
    assert parent.data.tags["sweep.refit_run_id"] == refit.info.run_id
    assert refit.data.tags["mlflow.parentRunId"] == parent.info.run_id and refit.info.status == "FINISHED"
    assert refit.info.run_name == "s/refit" and float(refit.data.params["optim.lr"]) == 0.005
    assert refit.data.params["train.part"] == "all" and refit.data.params["val.key_prefix"] == "test/"
    assert parent.data.metrics["refit/val_loss"] == pytest.approx(summary["refit"]["val_loss"])
    assert math.isfinite(summary["refit"]["val_loss"])
    assert json.loads((sweep_dir / "summary.json").read_text())["best_lr"] == 0.005

    # re-submitting the finished sweep restores it from Tune's experiment: nothing runs again, nothing is
    # logged twice, the same MLflow runs
    again = sweep_lr.run(cfg)
    assert again["parent_run_id"] == summary["parent_run_id"] and again["trials"] == trials
    assert again["refit"]["run_id"] == summary["refit"]["run_id"]
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "sweep/lr")) == [0, 1]
    assert sorted(m.step for m in client.get_metric_history(ok.info.run_id, "train/loss")) == list(range(1, 13))
    assert sorted(p.name for p in sweep_dir.glob("lr_*")) == ["lr_0.005", "lr_1e+12"]

    # a new Tune experiment for the same sweep (as after a failed one) replays the finished pretraining runs from
    # their records: the same results, nothing trained or logged again
    (sweep_dir / sweep_lr.tune_name(Loc(sweep_dir))).rename(tmp_path / "old_tune")
    third = sweep_lr.run(cfg)
    assert [(t["lr"], t["val_loss"], t["run_id"]) for t in third["trials"]] == \
        [(t["lr"], t["val_loss"], t["run_id"]) for t in trials]
    assert third["stop_reason"] == "rose" and third["refit"]["run_id"] == summary["refit"]["run_id"]
    assert sorted(m.step for m in client.get_metric_history(ok.info.run_id, "train/loss")) == list(range(1, 13))
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "sweep/lr")) == [0, 1]


@pytest.mark.slow  # ~2.5 min: one trial killed three times: the sweep failed, re-submitted, retried by Tune
def test_a_failed_trial_is_retried_from_its_checkpoint_and_a_failed_sweep_resumes(tmp_path, palette_path, ray_local,
                                                                                  monkeypatch, s3):
    """The sweep kept on S3 (moto on 127.0.0.1: Tune's experiment, the trials' pretraining runs). A worker dies at
    step 4 (fault injection) and Ray Train does not retry (checkpoint.max_failures 0).
    1. No Tune retries: the trial fails, so does the sweep; Tune's experiment is set aside.
    2. Re-submitted with one Tune retry: the trial resumes from its step-2 checkpoint, dies at step 4 again (the
       fault re-armed), Tune retries it, it resumes from step 2 again and finishes."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"_comment": "test", "job": "sweep_lr", "params": {"lr": {"ordered": [0.005]}}}))
    monkeypatch.setenv("IGPT_FAULTS", json.dumps({"fail_at_step": 4}))  # test faults: never a user's flag
    faults = ["--no-refit", "--pretrain.checkpoint.every_steps", "2", "--storage_path", f"{s3}/{tmp_path.name}",
              "--pretrain.tracking.tracking_uri", f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"]
    with pytest.raises(RuntimeError, match=r"trial 0 \(lr=0.005\) failed after its retries.*re-submit"):
        sweep_lr.run(sweep_job(tmp_path, palette_path, space, "--max_failures", "0", *faults))
    sweep_dir = Loc(f"{s3}/{tmp_path.name}") / "s"
    run_dir = sweep_dir / "lr_0.005"
    assert (sweep_dir / "tune.failed-1").is_dir() and not (sweep_dir / sweep_lr.tune_name(sweep_dir)).exists()
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_00000002"]  # died at step 4, before its checkpoint
    client = MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}")
    parent_id = (sweep_dir / "mlflow_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED" and parent.data.tags["sweep.stop_reason"] == "failed"
    assert client.get_metric_history(parent_id, "sweep/lr") == []

    (run_dir / "fault_injected").unlink()  # the fault strikes again in the next attempt
    summary = sweep_lr.run(sweep_job(tmp_path, palette_path, space, "--max_failures", "1", *faults))
    assert (run_dir / "fault_injected").exists()  # it did strike
    assert summary["parent_run_id"] == parent_id and client.get_run(parent_id).info.status == "FINISHED"
    assert [(t["lr"], t["resumed"]) for t in summary["trials"]] == [(0.005, True)]
    assert summary["stop_reason"] == "exhausted" and summary["best_lr"] == 0.005 and summary["refit"] is None
    # three attempts, every step logged once
    assert sorted(m.step for m in client.get_metric_history(summary["trials"][0]["run_id"], "train/loss")) == \
        [1, 2, 3, 4, 5]
    assert client.get_run(summary["trials"][0]["run_id"]).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(parent_id, "sweep/lr")] == [0]
    assert not (sweep_dir / "refit").exists()
