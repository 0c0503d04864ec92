"""The README's main job, run as a user runs it, against a real local MLflow store."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_trains_and_records_the_run_in_mlflow(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "pipelines.main", "--output_dir", str(out), "--name", "t1",
           "--palette.max_iter", "5", "--palette.sample_pixels", "100000", "--train.steps", "30",
           "--train.batch_size", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "look at it with:  mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    summary = json.loads((out / "t1" / "summary.json").read_text())
    assert summary["skipped"] == 0
    assert summary["last_loss"] < summary["first_loss"] - 0.3  # it learns something in 30 steps

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "t1"
    assert run.data.params["model.size"] == "debug" and run.data.params["train.steps"] == "30"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in hist] == list(range(30))
    for key in ("train/bits_per_dim", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"):
        assert key in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "palette", "checkpoint"} <= arts
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="palette",
                                                     tracking_uri=summary["tracking_uri"], dst_path=str(tmp_path)))
    import numpy as np

    assert np.load(local / "palette.npy").shape == (512, 3)
