"""Against real servers on 127.0.0.1: a Ray head started with ``ray start --head`` and an ``mlflow server``
(SQLite backend, local artifact root). Jobs go in with ``ray job submit`` exactly as on a cluster; results are read
back over HTTP. Both servers are stopped by their process ids at the end (``ray stop`` would also stop every other
Ray runtime on this machine)."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from igpt.storage import Loc
from igpt.train.checkpoints import MARKER

from .conftest import free_port
from .test_pretrain import final_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # a Ray head, an MLflow server, a study (submitted twice) and the stage jobs


def listening(port: int) -> set[str]:
    """The local addresses something listens on at ``port`` (from ``ss``)."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.split()[3].endswith(f":{port}")}


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def servers():
    # a health check may take 30 s (Ray's default 10 s): on a loaded 2-core box the GCS marked a live worker node
    # dead before a lost-node test could place a worker there; a node that is killed refuses at once all the same
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu",
               RAY_health_check_timeout_ms="30000")
    env.pop("RAY_ADDRESS", None)
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, mlf = free_port(), free_port(), free_port()
    # every port of its own: Ray's defaults (the agent's 52365, ...) collide with any other Ray on this machine
    ports = [a for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                            "--runtime-env-agent-port", "--ray-client-server-port") for a in (flag, str(free_port()))]
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "3", "--port", str(gcs),
                    "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    *ports, "--temp-dir", str(temp), "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=180)
    store = temp / "mlflow"
    store.mkdir()
    mlflow_proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlf), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    dashboard, tracking = f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlf}"
    import numpy as np

    from igpt.data.palette import Palette

    Palette.fit(np.random.default_rng(0).integers(0, 256, (20000, 3), dtype=np.uint8), max_iter=3).save(
        temp / "palette.npy")  # for the single-stage jobs below
    try:
        wait_http(f"{dashboard}/api/version")
        wait_http(f"{tracking}/health")
        yield {"dashboard": dashboard, "tracking": tracking, "env": env, "dash_port": dash, "mlflow_port": mlf,
               "temp": temp, "gcs": gcs}
    finally:
        os.killpg(mlflow_proc.pid, signal.SIGTERM)
        try:
            mlflow_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # its workers can be slow to drain on a loaded machine
            os.killpg(mlflow_proc.pid, signal.SIGKILL)
            mlflow_proc.wait(timeout=30)
        # the head's processes: every process started under its own temp dir
        def head_pids() -> list[int]:
            out = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout
            return [int(p) for p in out.split()]

        # SIGTERM first, then SIGKILL to whatever is left (workers the raylet spawned while dying too), each time
        # waiting (polling) until the head's processes are gone or 10 s have passed
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
            for pid in head_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 10
            while head_pids() and time.time() < deadline:
                time.sleep(0.2)
        assert not head_pids()


def submit(servers, *argv, wait=True, job_id=None, env_vars=None):
    """``ray job submit`` as the README's cluster section does it: this checkout as the working directory, and the
    environment of cluster/runtime_env.yaml (its stop grace among it), plus ``env_vars`` (test faults)."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", servers["dashboard"], "--working-dir", str(ROOT)]
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["env_vars"]
    cmd += ["--runtime-env-json", json.dumps({"env_vars": {**env, **(env_vars or {})}})]
    if job_id:
        cmd += ["--submission-id", job_id]
    if not wait:
        cmd.append("--no-wait")
    for _ in range(30):  # the head answers HTTP before its job agent is up: Ray says to try again later
        p = subprocess.run([*cmd, "--", "python", *argv], env=servers["env"], capture_output=True, text=True,
                           timeout=1200, cwd=ROOT)
        if "No available agent to submit job" not in p.stderr:
            return p
        time.sleep(5)
    return p


def job_status(servers, job_id) -> str:
    with urllib.request.urlopen(f"{servers['dashboard']}/api/jobs/{job_id}") as r:
        return json.load(r)["status"]


def test_servers_bind_to_loopback_only(servers):
    assert listening(servers["dash_port"]) == {"127.0.0.1"}
    assert listening(servers["mlflow_port"]) == {"127.0.0.1"}


# 3 distinct N; two run at once, the third waits for a free slot: it is cut off by the stop after the first ends
STUDY_LADDER = ("debug@8", "1x64@8", "tiny@8")


# 0.003 trains; 1e12 diverges (its first update makes the step-3 forward overflow float32: the loss is nan, the
# trial stops, its val loss is inf), so the loss rose and the sweep stops: 0.001 never runs. (A rate like 1e8 does
# not diverge: DeepSpeed skips the steps whose gradient norm overflows and the loss stays finite.)
STUDY_LRS = [0.003, 1e12, 0.001]


def _study_root(servers, s3) -> Loc:
    """The study's folder: on the S3 test server (every stage's outputs there, the cluster's workers reading and
    writing them over S3 as on a cloud cluster with only a bucket)."""
    return Loc(f"{s3}/{servers['temp'].name}/runs") / "ladder"


def _study_argv(servers, root: Loc) -> list[str]:
    """A 3-rung study on the shipped sample, each rung's rate swept (half-length trials until the loss rises)."""
    lrs = servers["temp"] / "study_lrs.json"
    lrs.write_text(json.dumps({"_comment": "test", "job": "sweep_lr", "params": {"lr": {"ordered": STUDY_LRS}}}))
    space = servers["temp"] / "study_probe.json"
    space.write_text(json.dumps({"_comment": "test", "job": "probe_lbfgs",
                                 "params": {"layer": {"grid_search": "all"}, "C": {"grid_search": [1.0]}}}))
    return ["-m", "pipelines.study", "--name", root.name, "--storage_path", str(root.parent),
            # 16x16: a quarter of 32x32's tokens, and every stage's start-up is the same
            "--ladder", ",".join(STUDY_LADDER), "--resolution", "16", "--lr_space", str(lrs), "--trial_fraction", "0.5",
            "--optim.global_batch", "8", "--optim.warmup_steps", "1", "--scaling.workers", "1",
            # 0.05 + 0.05 + 0.2 + 1 for Ray Data = 1.3 CPUs a rung: two at once on the 3-CPU head
            "--scaling.cpus_per_worker", "0.2", "--cpus_per_rung", "0.05", "--cpus_per_trial", "0.05",
            "--val_images", "16", "--palette.max_iter", "5", "--palette.sample_pixels", "50000",
            "--probe_space", str(space), "--no-pixels", "--n_boot", "200",
            # the training split decoded once, in 2 augmented passes, for every rung's trials and refit
            "--pretokenize", "2",
            "--tracking.tracking_uri", servers["tracking"], "--tracking.experiment", "served"]


def _study_runs(client, exp_id: str, study_run_id: str) -> list:
    """Every run of a study: its rungs' stage runs (tag igpt.study_run_id) and every run under them."""
    tree = client.search_runs([exp_id], f"tags.`igpt.study_run_id` = '{study_run_id}'", max_results=1000)
    frontier = [r.info.run_id for r in tree]
    while frontier:
        found = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{frontier.pop()}'", max_results=1000)
        frontier += [r.info.run_id for r in found if r.info.run_id not in {t.info.run_id for t in tree}]
        tree += [r for r in found if r.info.run_id not in {t.info.run_id for t in tree}]
    return tree


@pytest.fixture(scope="module")
def study_job(servers, s3):
    """The 3-rung study submitted, stopped once its first rung has finished, then re-submitted under its name: what
    each step left, for the tests below (its refit run folders and feature sets feed the stop tests too)."""
    root = _study_root(servers, s3)
    out = {"root": root, "first": submit(servers, *_study_argv(servers, root), wait=False, job_id="igpt-study-1")}
    if out["first"].returncode:
        return out
    deadline = time.time() + 1800
    while not any((root / "rungs" / r / "summary.json").exists() for r in STUDY_LADDER):
        if time.time() > deadline or job_status(servers, "igpt-study-1") not in ("PENDING", "RUNNING"):
            out["error"] = _logs(servers, "igpt-study-1")
            return out
        time.sleep(2)
    # the CLI waits for the stop; on a loaded box that took over 120 s: a generous bound, and its outcome recorded
    # (an exception here would leave the study running and hide what went wrong behind a fixture error)
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", servers["dashboard"], "igpt-study-1"],
                          env=servers["env"], capture_output=True, text=True, timeout=600)
    out["stop_cli"] = (stop.returncode, stop.stderr[-1000:])
    deadline = time.time() + 300
    while job_status(servers, "igpt-study-1") not in ("STOPPED", "FAILED", "SUCCEEDED") and time.time() < deadline:
        time.sleep(1)
    client = MlflowClient(servers["tracking"])
    out.update(stopped=job_status(servers, "igpt-study-1"), client=client,
               exp=client.get_experiment_by_name("served").experiment_id,
               study_id=(root / "mlflow_run_id").read_text().strip(),
               done={r: json.loads((root / "rungs" / r / "summary.json").read_text()) for r in STUDY_LADDER
                     if (root / "rungs" / r / "summary.json").exists()})
    out["study_after_stop"] = client.get_run(out["study_id"])
    out["tree_after_stop"] = _study_runs(client, out["exp"], out["study_id"])
    out["second"] = submit(servers, *_study_argv(servers, root), job_id="igpt-study-2")
    return out


def test_a_study_runs_its_rungs_at_once_stops_killed_resumes_without_rerunning_and_fits_a_law(servers, study_job):
    """One submission, three rungs as Ray tasks on the shared head, two at once (what its 3 CPUs hold): stopped
    once its first rung has finished (everything of it ends KILLED), re-submitted under the same name (the
    finished rung is read back, not run again), and finished with the law fitted on its MLflow run. Each rung's
    sweep is the paper's: trials in order until the validation loss rises (here at a diverging rate), the best
    refitted on train + held-out; the sweep's own checks live here, on the study's sweeps, not in a sweep of
    their own."""
    assert study_job["first"].returncode == 0, study_job["first"].stderr[-2000:]
    assert "error" not in study_job, study_job.get("error")
    assert study_job["stopped"] == "STOPPED", study_job["stop_cli"]
    done, client, exp, study_id = (study_job[k] for k in ("done", "client", "exp", "study_id"))
    assert 1 <= len(done) < len(STUDY_LADDER), f"the stop came after every rung finished: {list(done)}"
    assert study_job["study_after_stop"].info.status == "KILLED"
    tree = study_job["tree_after_stop"]
    diverged = [r for r in tree if float(r.data.params.get("optim.lr", 0)) == 1e12]  # a trial's run: FAILED
    assert {r.info.status for r in diverged} <= {"FAILED", "KILLED"}
    assert tree and {r.info.status for r in tree if r not in diverged} <= {"KILLED", "FINISHED"}, \
        [(r.info.run_name, r.info.status) for r in tree]
    # rungs at the same time: the first two rungs' sweeps ran at once (both started before either ended)
    assert study_job["study_after_stop"].data.tags["study.concurrent_rungs"].startswith("2 (the cluster's 3 CPUs")
    sweeps = {r.data.tags["igpt.rung"]: r for r in tree if r.data.tags.get("igpt.job") == "sweep_lr"}
    first = [sweeps[r] for r in STUDY_LADDER[:2]]
    assert max(r.info.start_time for r in first) < min(r.info.end_time for r in first)

    p = study_job["second"]
    assert p.returncode == 0 and job_status(servers, "igpt-study-2") == "SUCCEEDED", p.stdout[-3000:]
    assert "resuming study ladder" in p.stdout
    study = client.get_run(study_id)
    assert study.info.status == "FINISHED"
    for rung, summary in done.items():  # read back, not run again: the same record, one extract run
        assert json.loads((study_job["root"] / "rungs" / rung / "summary.json").read_text()) == summary
        extracts = client.search_runs([exp], f"tags.`igpt.study_run_id` = '{study_id}' AND "
                                             f"tags.`igpt.rung` = '{rung}' AND tags.`igpt.job` = 'extract'")
        assert len(extracts) == 1
    fits = json.loads(Path(client.download_artifacts(study_id, "report/fits.json", str(servers["temp"]))).read_text())
    assert [r["label"] for r in fits["rungs"]] == ["1x64@8", "debug@8", "tiny@8"]  # by N
    assert fits["fits"]["N"]["fitted"] and fits["fits"]["N"]["form"] == "(x₀/x)^α"  # 3 rungs: no L∞
    assert "alpha" in study.data.tags["fit.N"] and "fit/N/alpha" in study.data.metrics
    assert all(r["lr_swept"] and r["lr"] == 0.003 for r in fits["rungs"])
    assert len(fits["pairs"]) == 2 and all("diff_95" in pr["loss"] and "p" in pr["probe"] for pr in fits["pairs"])

    # each rung's sweep, through the stop and the resubmission: in order until the loss rose, each trial once
    for rung in STUDY_LADDER:
        summary = json.loads((study_job["root"] / "rungs" / rung / "summary.json").read_text())
        sweep, trials = summary["sweep"], summary["sweep"]["trials"]
        assert [(t["lr"], t["diverged"]) for t in trials] == [(0.003, False), (1e12, True)], (rung, sweep)
        assert math.isfinite(trials[0]["val_loss"]) and trials[1]["val_loss"] == math.inf
        assert sweep["stop_reason"] == "rose" and sweep["best_lr"] == 0.003
        assert sweep["edge_warning"] is None  # 0.003 is interior by value: 1e12 is the grid's largest
        sweep_dir = study_job["root"] / "sweep" / rung
        assert [p.name for p in sweep_dir.children(dirs=True) if p.name.startswith("lr_")] == ["lr_0.003", "lr_1e+12"]
        assert (sweep_dir / "lr_1e+12" / "nonfinite_loss").read_text().startswith("loss nan at step")
        assert not (sweep_dir / "lr_0.003" / "nonfinite_loss").exists()
        parent = client.get_run(sweep["parent_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["igpt.job"] == "sweep_lr"
        assert json.loads(parent.data.params["order"]) == STUDY_LRS
        assert parent.data.tags["sweep.stop_reason"] == "rose" and parent.data.tags["sweep.best_lr"] == "0.003"
        hist = sorted(client.get_metric_history(parent.info.run_id, "sweep/lr"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in hist] == [(0, 0.003), (1, 1e12)]
        assert [m.value for m in sorted(client.get_metric_history(parent.info.run_id, "sweep/diverged"),
                                        key=lambda m: m.step)] == [0.0, 1.0]
        for t in trials:  # a trial's pretraining run: a child of the sweep's run at its lr, on the rest
            child = client.get_run(t["run_id"])
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert float(child.data.params["optim.lr"]) == t["lr"] and child.data.params["train.part"] == "rest"
            # trained on the study's token split, validated on the held-out records' own images
            assert (child.data.params["train.format"], child.data.params["val.format"]) == ("tokens", "parquet")
            assert child.data.params["val.part"] == "holdout"
            assert t["diverged"] or child.data.metrics["data/records_read"] > 0  # tokens read, none decoded
            assert child.info.status == ("FAILED" if t["diverged"] else "FINISHED")
            assert child.data.metrics.get("train/nonfinite_loss", 0.0) == (1.0 if t["diverged"] else 0.0)
        refit = client.get_run(parent.data.tags["sweep.refit_run_id"])
        assert refit.info.run_id == summary["pretrain_run_id"]  # the rung's model is the refit
        assert refit.data.tags["mlflow.parentRunId"] == parent.info.run_id and refit.info.status == "FINISHED"
        assert float(refit.data.params["optim.lr"]) == 0.003 and refit.data.params["train.part"] == "all"
        assert parent.data.metrics["refit/val_loss"] == pytest.approx(summary["val_loss"])
    assert {"loss_vs_N.png", "probe_vs_loss.png"} <= {
        Path(a.path).name for a in client.list_artifacts(study_id, "report/plots")}
    # one tokenization for the whole study, through the stop and the resubmission: one quantize run, 2 passes
    tokens = json.loads((study_job["root"] / "tokens" / "train.summary.json").read_text())
    assert tokens["passes"] == 2 and tokens["augment"] and tokens["tokenized"] > 0
    assert len(client.search_runs([exp], f"tags.`igpt.study_run_id` = '{study_id}' AND "
                                        "tags.`igpt.job` = 'quantize'")) == 1


def test_submitted_pipeline_succeeds_and_mlflow_has_it_over_http(servers, study_job, tmp_path):
    """What the submitted study left in MLflow, read over HTTP only: a rung's refit (the paper's procedure's model)
    with its config and palette, its probe and the probe's trials, and compare's table through the artifact proxy,
    with the refits in it and no trial."""
    assert study_job["second"].returncode == 0, study_job["second"].stdout[-3000:]
    client = MlflowClient(servers["tracking"])
    exp = client.get_experiment_by_name("served").experiment_id
    study = f"tags.`igpt.study_run_id` = '{study_job['study_id']}' AND tags.`igpt.rung` = 'debug@8'"
    refit, = client.search_runs([exp], f"{study} AND tags.`sweep.role` = 'refit'")
    assert refit.info.status == "FINISHED" and len(client.get_metric_history(refit.info.run_id, "train/loss")) == 8
    assert {"config.json", "deepspeed_config.json", "palette"} <= \
           {a.path for a in client.list_artifacts(refit.info.run_id)}
    # a rung the stop interrupted ran its probe again on resubmission: its first attempt stays KILLED beside it
    probes = client.search_runs([exp], f"{study} AND tags.`igpt.job` = 'probe'")
    assert sorted(p.info.status for p in probes) in (["FINISHED"], ["FINISHED", "KILLED"]), \
        [(p.info.run_name, p.info.status) for p in probes]
    probe, = [p for p in probes if p.info.status == "FINISHED"]
    assert "test/accuracy" in probe.data.metrics and probe.data.tags["igpt.pretrain_run_id"] == refit.info.run_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{probe.info.run_id}'")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)  # layers 0..2, one C
    compared = client.search_runs([exp], "tags.`igpt.job` = 'compare' AND attributes.run_name = 'compare'",
                                  order_by=["attributes.start_time DESC"])[0]
    table = Path(client.download_artifacts(compared.info.run_id, "table.csv", str(tmp_path))).read_text()
    assert table.count("/refit") == 3 and "/lr_" not in table


def _pretrain_argv(servers, name, *extra):
    sample = ROOT / "igpt" / "data" / "cifar10_sample.parquet"
    palette = servers["temp"] / "palette.npy"
    return ["-m", "pipelines.pretrain", "--name", name, "--storage_path", str(servers["temp"] / "runs" / "jobs"),
            "--palette_path", str(palette), "--train.path", str(sample), "--train.key_prefix", "train/",
            "--val.path", str(sample), "--val.key_prefix", "test/", "--val_images", "16", "--model.size", "debug",
            "--deepspeed.preset", "cpu", "--deepspeed.zero_stage", "2", "--deepspeed.precision", "fp32",
            "--deepspeed.micro_batch", "4", "--optim.global_batch", "8", "--scaling.workers", "1",
            "--completions", "0", "--tracking.tracking_uri", servers["tracking"],
            "--tracking.experiment", "served", *extra]


def _run_of(servers, name):
    client = MlflowClient(servers["tracking"])
    exp = client.get_experiment_by_name("served")
    if exp is None:  # not created yet: the job is still starting
        return None
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    return runs[0] if runs else None


def test_a_failing_job_ends_failed_in_ray_and_in_mlflow(servers):
    p = submit(servers, *_pretrain_argv(servers, "diverges", "--steps", "6", "--optim.warmup_steps", "1"),
               job_id="igpt-fails", env_vars={"IGPT_FAULTS": json.dumps({"nan_at_step": 2})})
    assert p.returncode != 0
    assert job_status(servers, "igpt-fails") == "FAILED"
    run = _run_of(servers, "diverges")
    assert run.info.status == "FAILED" and run.data.metrics["train/nonfinite_loss"] == 1.0
    assert "checkpoint.max_failures" in run.data.params and not any(  # test faults are not the run's params
        k.split(".")[-1] in ("fail_at_step", "fail_rank", "nan_at_step") for k in run.data.params)


def _stage_argv(servers, study_job, job: str, name: str) -> list[str]:
    """A long run of each stage (it is stopped long before it ends), on the study's outputs."""
    sample = str(ROOT / "igpt" / "data" / "cifar10_sample.parquet")
    root, track = study_job["root"], ["--tracking.tracking_uri", servers["tracking"], "--tracking.experiment", "served"]
    runs = str(servers["temp"] / "runs" / "stops")
    if job == "finetune":
        return ["-m", "pipelines.finetune", "--name", name, "--storage_path", runs, "--checkpoint",
                str(root / "sweep" / "debug@8" / "refit"), "--train.path", sample, "--train.key_prefix", "train/",
                "--test.path", sample, "--test.key_prefix", "test/", "--space", "", "--max_epochs", "1000",
                "--patience", "1000", "--transform.resolution", "16", "--deepspeed.preset", "cpu",
                "--deepspeed.precision", "fp32",
                "--deepspeed.micro_batch", "8", "--optim.global_batch", "8", "--scaling.workers", "1",
                "--scaling.cpus_per_worker", "0.5", "--cpus_per_trial", "0.2", *track]
    if job == "sweep_lr":
        space = servers["temp"] / "sweep_space.json"
        space.write_text(json.dumps({"_comment": "stop test", "job": "sweep_lr",
                                     "params": {"lr": {"ordered": [0.001, 0.002]}}}))
        return ["-m", "pipelines.sweep_lr", "--name", name, "--storage_path", runs, "--space", str(space),
                "--holdout", "0.2", "--cpus_per_trial", "0.2", "--trial_fraction", "1",
                "--pretrain.palette_path", str(servers["temp"] / "palette.npy"),
                "--pretrain.train.path", sample, "--pretrain.train.key_prefix", "train/",
                "--pretrain.val.path", sample, "--pretrain.val.key_prefix", "test/", "--pretrain.completions", "0",
                "--pretrain.model.size", "debug", "--pretrain.deepspeed.preset", "cpu",
                "--pretrain.deepspeed.precision", "fp32", "--pretrain.deepspeed.micro_batch", "8",
                "--pretrain.optim.global_batch", "8", "--pretrain.steps", "100000",
                "--pretrain.optim.warmup_steps", "10", "--pretrain.checkpoint.every_steps", "100000",
                "--pretrain.scaling.workers", "1", "--pretrain.scaling.cpus_per_worker", "0.5",
                "--pretrain.tracking.tracking_uri", servers["tracking"], "--pretrain.tracking.experiment", "served"]
    return ["-m", "pipelines.probe", "--name", name, "--storage_path", runs, "--features",
            str(root / "features" / "debug@8"), "--protocol", "sgd", "--epochs", "1000000", "--no-pixels",
            "--cpus_per_trial", "0.5", *track]


@pytest.mark.parametrize("job", ["finetune", "sweep_lr", "probe"])
def test_a_stopped_stage_ends_killed_with_every_run_under_it(servers, study_job, job):
    """``ray job stop`` while the stage waits in Ray Train or Ray Tune's ``fit``: its MLflow run ends KILLED, and
    so does every run under it (a trial's run, a trial's pretraining run), none left RUNNING. (A pretraining job's
    driver waits on Ray Train's fit under its run as fine-tuning's does: the stopped pretraining runs are the
    sweep's trials here and the study's above.)"""
    assert study_job["second"].returncode == 0, study_job["second"].stderr[-2000:]
    name, job_id = f"stop-{job}", f"igpt-stop-{job.replace('_', '-')}"
    p = submit(servers, *_stage_argv(servers, study_job, job, name), wait=False, job_id=job_id)
    assert p.returncode == 0, p.stderr[-2000:]
    client = MlflowClient(servers["tracking"])
    deadline = time.time() + 600
    while True:  # until the stage is inside its fit: a run under it exists and is running
        parent = _run_of(servers, f"{name}/{job}")  # a stage's run says its stage (default_run_name)
        under = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'") \
            if parent is not None else []
        if any(r.info.status == "RUNNING" for r in under):
            break
        assert time.time() < deadline and job_status(servers, job_id) in ("PENDING", "RUNNING"), \
            _logs(servers, job_id)
        time.sleep(2)
    assert parent.info.status == "RUNNING"
    subprocess.run([str(BIN / "ray"), "job", "stop", "--address", servers["dashboard"], job_id],
                   env=servers["env"], check=True, capture_output=True, timeout=120)
    deadline = time.time() + 120
    while job_status(servers, job_id) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline
        time.sleep(1)
    assert job_status(servers, job_id) == "STOPPED"
    assert _run_of(servers, f"{name}/{job}").info.status == "KILLED"
    tree, frontier = [], [parent.info.run_id]
    while frontier:  # every run under it, at any depth
        found = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{frontier.pop()}'")
        frontier += [r.info.run_id for r in found]
        tree += found
    assert tree and {r.info.status for r in tree} <= {"KILLED", "FINISHED"}, \
        ([(r.info.run_name, r.info.status) for r in tree], _logs(servers, job_id))
    assert any(r.info.status == "KILLED" for r in tree)


def _logs(servers, job_id) -> str:
    with urllib.request.urlopen(f"{servers['dashboard']}/api/jobs/{job_id}/logs") as r:
        return json.load(r)["logs"][-3000:]


# ------------------------------------------------------------------------------------ a second node, and losing it
def _pids_under(temp: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _train_worker_nodes(servers) -> set:
    """The nodes the live Ray Train workers are on (a lost-node test's premise: one of them on the node it kills),
    from the dashboard's state API over HTTP: well under a second, where a driver's ``ray.init`` takes seconds of
    the steps the test must kill inside."""
    query = urllib.parse.urlencode({"filter_keys": ["class_name", "state"], "filter_predicates": ["=", "="],
                                    "filter_values": ["RayTrainWorker", "ALIVE"], "limit": 100}, doseq=True)
    with urllib.request.urlopen(f"{servers['dashboard']}/api/v0/actors?{query}", timeout=30) as r:
        return {a["node_id"] for a in json.load(r)["data"]["result"]["result"]}


def _kill_the_worker_node_at(servers, worker_node, job_id: str, marker, t0: float) -> float:
    """Kill the worker node the moment ``marker`` (a complete checkpoint) is in the bucket, once the state API has
    shown the live Ray Train workers on both nodes (the premise: a worker on the node killed). The premise is
    checked while the run trains toward the marker, not after it: a loaded dashboard's answer took long enough
    for a short run to finish before the kill, and nothing was lost. Returns the seconds from t0 to the kill."""
    nodes: set = set()
    while not marker.exists():
        assert job_status(servers, job_id) in ("PENDING", "RUNNING") and time.time() - t0 < 600, \
            _logs(servers, job_id)[-3000:]
        if len(nodes) < 2:
            nodes = _train_worker_nodes(servers)
        time.sleep(0.5)
    assert len(nodes) == 2, f"the workers were not on both nodes ({nodes}): nothing to lose, the premise failed"
    killed_at = time.time() - t0
    worker_node["kill"]()
    return killed_at


def _alive_nodes(servers) -> int:
    code = (f"import ray; ray.init(address='127.0.0.1:{servers['gcs']}', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    p = subprocess.run([sys.executable, "-c", code], env=servers["env"], capture_output=True, text=True, timeout=120)
    return int(p.stdout.split()[-1]) if p.returncode == 0 and p.stdout.split() else 0


@pytest.fixture(scope="module")
def worker_node(servers):
    """A second Ray node joined to the head (``ray start --address``), with its own 2 CPUs, ports and temp dir:
    killing every process under that temp dir is losing the node (its raylet, object store and workers at once)."""
    temp = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    ports = [a for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                            "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
             for a in (flag, str(free_port()))]

    def start() -> None:
        if _alive_nodes(servers) >= 2:
            return
        subprocess.run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{servers['gcs']}", "--num-cpus", "2",
                        "--node-ip-address", "127.0.0.1", *ports, "--temp-dir", str(temp), "--disable-usage-stats"],
                       env=servers["env"], check=True, capture_output=True, timeout=180)
        deadline = time.time() + 120
        while _alive_nodes(servers) < 2:
            assert time.time() < deadline, "the second node did not join"
            time.sleep(2)

    def kill() -> None:
        for _ in range(3):  # the raylet's workers may outlive it by a moment
            for pid in _pids_under(temp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(1)

    start()
    yield {"kill": kill, "start": start, "temp": temp}
    kill()
    assert not _pids_under(temp)


def _sweep_argv(servers, storage: str, name: str) -> list[str]:
    """A one-trial learning-rate sweep (lr 0.005, 14 steps, a checkpoint every 4), kept on S3, its trial's two
    workers spread over both nodes (``--pretrain.scaling.placement SPREAD``), metrics on the MLflow server."""
    space = servers["temp"] / "lost_space.json"
    space.write_text(json.dumps({"_comment": "lost node", "job": "sweep_lr", "params": {"lr": {"ordered": [0.005]}}}))
    sample = str(ROOT / "igpt" / "data" / "cifar10_sample.parquet")
    return ["-m", "pipelines.sweep_lr", "--name", name, "--storage_path", storage, "--space", str(space),
            "--holdout", "0.2", "--cpus_per_trial", "0.2", "--trial_fraction", "1", "--no-refit", "--max_failures", "2",
            "--pretrain.palette_path", str(servers["temp"] / "palette.npy"),
            "--pretrain.train.path", sample, "--pretrain.train.key_prefix", "train/",
            "--pretrain.val.path", sample, "--pretrain.val.key_prefix", "test/", "--pretrain.completions", "0",
            "--pretrain.val_images", "16", "--pretrain.model.size", "debug", "--pretrain.model.resolution", "16",
            "--pretrain.deepspeed.preset", "cpu", "--pretrain.deepspeed.zero_stage", "2",
            "--pretrain.deepspeed.precision", "fp32", "--pretrain.deepspeed.micro_batch", "4",
            "--pretrain.optim.global_batch", "8", "--pretrain.steps", "14", "--pretrain.optim.warmup_steps", "3",
            "--pretrain.checkpoint.every_steps", "4", "--pretrain.checkpoint.max_failures", "3",
            "--pretrain.scaling.workers", "2", "--pretrain.scaling.cpus_per_worker", "0.4",
            "--pretrain.scaling.placement", "SPREAD",
            "--pretrain.tracking.tracking_uri", servers["tracking"], "--pretrain.tracking.experiment", "served"]


def test_a_sweep_trial_on_a_lost_node_resumes_from_s3_and_ends_as_an_uninterrupted_run(servers, worker_node, s3,
                                                                                      tmp_path):
    """Two nodes, a one-trial sweep submitted twice with ``ray job submit``: once untouched, once losing the worker
    node the moment its trial's step-4 checkpoint is complete in the bucket (a moto S3 server on 127.0.0.1). Ray
    Train restarts the worker group on what is left (or Tune the trial, when its own process was on the lost
    node); it resumes from the newest complete checkpoint in the bucket, the sweep finishes, and the trial ends
    with the losses and parameters, to the bit, of the run that lost nothing; MLflow has every step once. (One
    test for the lost node, of the sweep: a trial is a pretraining run inside a Tune trial, so the pretraining
    run's resume is checked with it.)"""
    storage = f"{s3}/two-nodes"
    clean = submit(servers, *_sweep_argv(servers, storage, "sweep-clean"), job_id="igpt-sweep-clean")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]

    lost = submit(servers, *_sweep_argv(servers, storage, "sweep-lost"), job_id="igpt-sweep-lost", wait=False)
    assert lost.returncode == 0, lost.stderr
    marker, t0 = Loc(storage) / "sweep-lost" / "lr_0.005" / "step_00000004" / MARKER, time.time()
    killed_at = _kill_the_worker_node_at(servers, worker_node, "igpt-sweep-lost", marker, t0)
    while job_status(servers, "igpt-sweep-lost") in ("PENDING", "RUNNING"):
        assert time.time() - t0 < 1200, "the sweep did not end after the node was lost"
        time.sleep(2)
    assert job_status(servers, "igpt-sweep-lost") == "SUCCEEDED", _logs(servers, "igpt-sweep-lost")[-3000:]

    client = MlflowClient(servers["tracking"])
    summaries = {n: json.loads((Loc(storage) / n / "summary.json").read_text()) for n in ("sweep-clean", "sweep-lost")}
    for sm in summaries.values():
        assert sm["stop_reason"] == "exhausted" and sm["best_lr"] == 0.005
        assert client.get_run(sm["parent_run_id"]).info.status == "FINISHED"
    runs = {n: client.get_run(sm["trials"][0]["run_id"]) for n, sm in summaries.items()}
    assert runs["sweep-lost"].info.status == "FINISHED"
    hist = {n: {k: sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: (m.step, m.timestamp))
                for k in ("train/loss", "train/seconds_to_first_step", "val/loss")} for n, r in runs.items()}
    firsts = [m.step for m in hist["sweep-lost"]["train/seconds_to_first_step"]]
    # a worker was on the lost node: a second attempt started, from a complete checkpoint (step 4, or a later
    # one written before the workers noticed)
    assert len(firsts) == 2 and firsts[0] == 1 and firsts[1] in (5, 9, 13), firsts
    assert [m.step for m in hist["sweep-lost"]["train/loss"]] == list(range(1, 15))  # nothing lost or doubled
    assert [m.value for m in hist["sweep-lost"]["train/loss"]] == [m.value for m in hist["sweep-clean"]["train/loss"]]
    assert hist["sweep-lost"]["val/loss"][-1].value == hist["sweep-clean"]["val/loss"][-1].value
    assert summaries["sweep-lost"]["trials"][0]["val_loss"] == summaries["sweep-clean"]["trials"][0]["val_loss"]
    # the parameters too, bit for bit (both trials' newest checkpoints, copied down from the bucket)
    a, b = (final_params(f"{storage}/{n}/lr_0.005", tmp_path / n) for n in ("sweep-clean", "sweep-lost"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"\nworker node killed {killed_at:.0f} s after submission (step-4 checkpoint complete); resumed from "
          f"step {firsts[1] - 1}; final loss {hist['sweep-lost']['train/loss'][-1].value:.6f}, uninterrupted "
          f"{hist['sweep-clean']['train/loss'][-1].value:.6f}")
