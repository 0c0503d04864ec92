"""The MLflow records every job shares (igpt.track.tracking), on a real local store."""

import json
from dataclasses import replace

import pytest
from mlflow.tracking import MlflowClient

from igpt.config import TrackingConfig
from igpt.data.sources import DatasetSpec
from igpt.track.tracking import JobRun, lineage_tags, log_splits


def test_a_failed_run_carries_its_reason_and_a_run_its_lineage_and_splits(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = {"size": "S", "objective": "bert", "resolution": 48, "n_layer": 24}
    run = JobRun.open(TrackingConfig(tracking_uri=uri), tmp_path, "r1", "pretrain", {"model": model})
    with pytest.raises(ValueError, match="boom"), run:
        train = DatasetSpec("s3://bucket/imagenet", "imagefolder", "train", holdout=0.01, part="rest")
        log_splits(run.client, run.run_id, {"train": (train, 1_268_355),
                                            "val": (DatasetSpec(str(tmp_path), split="test"), 10_000)})
        raise ValueError("boom: the loader hit a wall")
    client = MlflowClient(uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FAILED" and r.data.tags["igpt.error"] == "ValueError: boom: the loader hit a wall"
    assert r.data.tags["mlflow.note.content"].startswith("**FAILED**: ValueError: boom")
    assert "Traceback (most recent call last)" in r.data.tags["igpt.traceback"]
    # the model's lineage as tags, from the config; MLflow's own context tags (Created-by, Source)
    assert (r.data.tags["igpt.size"], r.data.tags["igpt.objective"], r.data.tags["igpt.resolution"]) == \
        ("S", "bert", "48")
    from igpt.model.config import ModelConfig

    assert r.data.tags["igpt.params"] == str(ModelConfig("S", resolution=48, objective="bert").param_count())
    assert r.data.tags["mlflow.user"] and r.data.tags["mlflow.source.name"]
    exp = client.get_experiment(r.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the splits as dataset inputs: source, a digest of the selection, the record count, the context
    got = {d.tags[0].value: d.dataset for d in r.inputs.dataset_inputs}
    assert got["training"].name == "train: train/rest" and json.loads(got["training"].profile) == \
        {"num_rows": 1_268_355}
    assert json.loads(got["training"].source)["uri"] == "s3://bucket/imagenet"
    assert got["training"].source_type == "s3" and got["validation"].source_type == "local"
    assert got["training"].digest != got["validation"].digest
    # one tag finds the runs of one pretraining run; the name comes from the store
    assert lineage_tags(None, r.info.run_id, client) == {"igpt.pretrain_run_id": r.info.run_id,
                                                         "igpt.pretrain_run": "r1"}


def test_a_stopped_job_ends_every_running_run_under_it_at_any_depth_and_no_other(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = JobRun.open(TrackingConfig(tracking_uri=uri), tmp_path, "sweep", "sweep_lr", None)
    client, exp = run.client, run.experiment_id

    def child(parent, name):
        return client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id

    trial, done = child(run.run_id, "trial"), child(run.run_id, "done")
    grandchild = child(done, "pretrain-under-a-finished-trial")
    client.set_terminated(done, "FINISHED")
    other = client.create_run(exp, run_name="another job's").info.run_id
    run.end("KILLED")
    status = {rid: client.get_run(rid).info.status for rid in (run.run_id, trial, done, grandchild, other)}
    assert status == {run.run_id: "KILLED", trial: "KILLED", done: "FINISHED", grandchild: "KILLED",
                      other: "RUNNING"}


def test_a_trial_that_fails_after_its_job_was_stopped_stays_killed_and_one_that_fails_alone_is_failed(tmp_path):
    """The stop reaches the driver first; the trial's process learns of it only as its workers dying. Its run, already
    ended KILLED by the driver's sweep, must not be overwritten FAILED (CI saw this under load)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = TrackingConfig(tracking_uri=uri)
    job = JobRun.open(track, tmp_path, "sweep", "sweep_lr", None)
    trial = JobRun.open(replace(track, parent_run_id=job.run_id), tmp_path, "sweep/lr_1", "pretrain", None)
    grandchild = JobRun.open(replace(track, parent_run_id=trial.run_id), tmp_path, "sweep/lr_1/x", "extract", None)
    job.end("KILLED")  # the driver's SIGTERM: its run and every run under it
    trial.end("FAILED", RuntimeError("a Ray Train worker died"))  # the trial, torn down after
    grandchild.end("FAILED", RuntimeError("gone too"))
    assert {r.run_id: job.client.get_run(r.run_id).info.status for r in (job, trial, grandchild)} == \
        {job.run_id: "KILLED", trial.run_id: "KILLED", grandchild.run_id: "KILLED"}
    assert "igpt.error" not in job.client.get_run(trial.run_id).data.tags
    alone = JobRun.open(track, tmp_path, "other", "sweep_lr", None)
    failing = JobRun.open(replace(track, parent_run_id=alone.run_id), tmp_path, "other/lr_1", "pretrain", None)
    failing.end("FAILED", RuntimeError("a real failure"))
    assert job.client.get_run(failing.run_id).info.status == "FAILED"


def test_runs_of_one_model_say_their_stage_unless_named(tmp_path):
    """Extract, probe and fine-tuning runs submitted with the pretraining run's --name no longer share its name."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = TrackingConfig(tracking_uri=uri)

    def name(job, given="s-cifar", **kw):
        run = JobRun.open(replace(track, **kw), tmp_path, given, job, None)
        run.end("FINISHED")
        return run.client.get_run(run.run_id).info.run_name

    assert [name(j) for j in ("pretrain", "extract", "probe", "finetune", "fit_palette")] == \
        ["s-cifar", "s-cifar/extract", "s-cifar/probe", "s-cifar/finetune", "s-cifar/palette"]
    assert name("probe", run_name="mine") == "mine"  # the submitter's --tracking.run_name wins
    assert name("compare", given="compare") == "compare" and name("probe", given="x/probe") == "x/probe"
    assert name("extract", parent_run_id=JobRun.open(track, tmp_path, "p", "pretrain", None).run_id) == "s-cifar"
