"""The README's main job, run as a user runs it: the whole pipeline on the embedded sample, real Ray, real
DeepSpeed, real MLflow (a local SQLite store), in a subprocess."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_runs_the_whole_pipeline_and_records_every_stage(tmp_path):
    out = tmp_path / "runs"
    # a relative --storage_path, as the README's command uses: the probe's Tune trials run in their own working
    # directories, so the job must hand them absolute paths
    rel = os.path.relpath(out, ROOT)
    space = tmp_path / "probe.json"  # every layer, one C: 3 trials and 1 on raw pixels (the default has 12)
    space.write_text(json.dumps({"_comment": "test", "job": "probe_lbfgs",
                                 "params": {"layer": {"grid_search": "all"}, "C": {"grid_search": [1.0]}}}))
    # at 16x16 (a quarter of the default's tokens: every stage the same, each faster); CI runs the default too
    cmd = [sys.executable, "-m", "pipelines.main", "--storage_path", rel, "--name", "t1", "--resolution", "16",
           "--steps", "12", "--palette.max_iter", "5", "--palette.sample_pixels", "50000", "--probe_space", str(space)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "look at it with:  mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    summary = json.loads((out / "t1" / "summary.json").read_text())
    debug = summary["sizes"]["debug"]
    assert 0.0 < debug["probe_test_accuracy"] <= 1.0 and debug["best_layer"] in (0, 1, 2)  # 0..L, L = 2
    assert debug["pixels_test_accuracy"] is not None
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name(summary["experiment"])
    runs = client.search_runs([exp.experiment_id], "tags.`igpt.job` != ''", max_results=500)
    jobs = {}
    for r in runs:
        if "mlflow.parentRunId" not in r.data.tags:
            jobs.setdefault(r.data.tags["igpt.job"], []).append(r)
    assert {"fit_palette", "pretrain", "extract", "probe", "compare"} <= set(jobs)
    assert all(r.info.status == "FINISHED" for rs in jobs.values() for r in rs)
    pre = client.get_run(debug["pretrain_run_id"])
    assert len(client.get_metric_history(pre.info.run_id, "train/loss")) == 12
    probe = client.get_run(debug["probe_run_id"])
    assert probe.data.tags["igpt.pretrain_run_id"] == pre.info.run_id
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{probe.info.run_id}'")
    assert len(children) >= 4  # layer x C trials (+ raw pixels)
    # a trial's metrics are its own: none of Tune's bookkeeping (pid, timestamp, done, iteration counters)
    assert all("val_accuracy" in c.data.metrics and not {"pid", "timestamp", "done", "training_iteration",
                                                         "time_this_iter_s"} & set(c.data.metrics) for c in children)
    # what a researcher filters on in the UI, through the same search API: the experiment opens on its runs
    # (not the GenAI view), and one tag finds every stage's run of a size, or of one pretraining run
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    of_size = client.search_runs([exp.experiment_id], "tags.`igpt.size` = 'debug' AND tags.`igpt.resolution` = '16'")
    assert {"pretrain", "extract", "probe"} <= {r.data.tags["igpt.job"] for r in of_size}
    assert all(r.data.tags["igpt.objective"] == "ar" for r in of_size)
    assert {r.data.tags["igpt.params"] for r in of_size} == {pre.data.params["model.params"]}  # one exact count
    lineage = client.search_runs([exp.experiment_id], f"tags.`igpt.pretrain_run` = '{pre.info.run_name}'")
    assert {"extract", "probe"} <= {r.data.tags["igpt.job"] for r in lineage}
    # run names that say the stage, and MLflow's Source and Created-by columns filled
    assert {r.data.tags["igpt.job"]: r.info.run_name for r in lineage if "mlflow.parentRunId" not in r.data.tags} \
        == {"extract": "debug/extract", "probe": "debug/probe"} and pre.info.run_name == "debug"
    assert pre.data.tags["mlflow.user"] and pre.data.tags["mlflow.source.name"].endswith("main.py")
    # the models in MLflow, loaded back by their flavours: the final weights give the checkpoint's logits, the
    # probe's classifier gives the test accuracy the job reported, on the features it reads
    import mlflow
    import numpy as np
    import torch

    from igpt.eval import features
    from igpt.train.checkpoints import load_model

    mlflow.set_tracking_uri(summary["tracking_uri"])
    (pre_model,), (probe_model,) = pre.outputs.model_outputs, probe.outputs.model_outputs
    weights = mlflow.pytorch.load_model(f"models:/{pre_model.model_id}")
    ours = load_model(out / "t1" / "train" / "debug")
    x = ours.ar_inputs(torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.equal(weights(x), ours(x)) and ours.head.weight.abs().sum() > 0
    classifier = mlflow.sklearn.load_model(f"models:/{probe_model.model_id}")
    layer = int(mlflow.get_logged_model(probe_model.model_id).params["layer"])
    xt, yt, _ = features.load(str(out / "t1" / "features" / "debug"), "test", layer)
    assert layer == debug["best_layer"]
    assert float(np.mean(classifier.predict(xt[:, 0]) == yt)) == debug["probe_test_accuracy"]
    table = (out / "t1" / "compare" / "table.csv").read_text()
    assert "debug" in table and len(table.strip().splitlines()) == 2  # header + this pipeline's one run
    assert re.search(r"stage timings: palette \d+ s, pretrain/debug \d+ s, .*compare \d+ s", proc.stdout), \
        proc.stdout[-2000:]
