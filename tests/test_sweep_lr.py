"""The pretraining learning-rate sweep: the ordered searcher on its own (fast), then a real sweep (Ray Tune trials,
each a real Ray Train + DeepSpeed pretraining run on the CPU, logging to a real MLflow SQLite store)."""

import json
import math
import pickle
from pathlib import Path

import pytest
from ray.tune.search import Searcher

from igpt import cli
from igpt.storage import Loc
from igpt.train import sweep_lr_job as sweep_lr
from igpt.train.checkpoints import checkpoint_dirs
from igpt.train.sweep_lr_job import OrderedSearcher, SweepLRJobConfig, decide

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
            # 16x16 and one worker: each attempt's cost is its start-up; what is checked is the same
            "--pretrain.model.resolution", "16", "--pretrain.transform.resolution", "16",
            # 1 worker x 0.8 + the trial's 0.2 leave one whole CPU of the 2 for Ray Data
            "--pretrain.scaling.workers", "1", "--pretrain.scaling.cpus_per_worker", "0.8", *extra]
    return cli.parse(SweepLRJobConfig, argv)


# A sweep that stops when the loss rises (a diverging rate), refits the best and is read back on re-submission:
# the study's sweeps in tests/test_servers.py (each rung's), and the restore and replay in the test below.


@pytest.mark.slow  # ~3 min: one trial killed thrice (the sweep failed, re-submitted, retried), restored, replayed
def test_a_failed_trial_is_retried_from_its_checkpoint_and_a_failed_sweep_resumes(tmp_path, palette_path, ray_local,
                                                                                  monkeypatch, s3):
    """The sweep kept on S3 (moto on 127.0.0.1: Tune's experiment, the trials' pretraining runs). A worker dies at
    step 4 (fault injection) and Ray Train does not retry (checkpoint.max_failures 0).
    1. No Tune retries: the trial fails, so does the sweep; Tune's experiment is set aside.
    2. Re-submitted with one Tune retry: the trial resumes from its step-2 checkpoint, dies at step 4 again (the
       fault re-armed), Tune retries it, it resumes from step 2 again and finishes.
    3. Re-submitted once finished: restored from Tune's experiment, nothing run or logged again.
    4. Re-submitted with Tune's experiment set aside: the finished trial replayed from its record."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"_comment": "test", "job": "sweep_lr", "params": {"lr": {"ordered": [0.005]}}}))
    monkeypatch.setenv("IGPT_FAULTS", json.dumps({"fail_at_step": 4, "fail_rank": 0}))  # test faults, not flags
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
    cfg = sweep_job(tmp_path, palette_path, space, "--max_failures", "1", *faults)
    summary = sweep_lr.run(cfg)
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

    # re-submitting the finished sweep restores it from Tune's experiment: nothing runs again, nothing is logged
    # twice, the same MLflow runs
    def logged() -> tuple[list, list]:
        return (sorted(m.step for m in client.get_metric_history(summary["trials"][0]["run_id"], "train/loss")),
                sorted(m.step for m in client.get_metric_history(parent_id, "sweep/lr")))

    again = sweep_lr.run(cfg)
    assert again["parent_run_id"] == parent_id and again["trials"] == summary["trials"]
    assert logged() == ([1, 2, 3, 4, 5], [0])
    # a new Tune experiment for the same sweep (as after a failed one) replays the finished pretraining run from
    # its record: the same result, nothing trained or logged again
    (sweep_dir / sweep_lr.tune_name(sweep_dir)).move_to(sweep_dir / "tune.set-aside")
    third = sweep_lr.run(cfg)
    assert [(t["lr"], t["val_loss"], t["run_id"]) for t in third["trials"]] == \
        [(t["lr"], t["val_loss"], t["run_id"]) for t in summary["trials"]]
    assert third["stop_reason"] == "exhausted" and logged() == ([1, 2, 3, 4, 5], [0])
