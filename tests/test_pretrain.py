"""Pretraining through real Ray Train workers, each a real DeepSpeed engine (CPU, gloo), logging to real MLflow."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from igpt import cli
from igpt.errors import Conflict
from igpt.train import checkpoints
from igpt.train import pretrain_job as pretrain
from igpt.train.checkpoints import MARKER, newest_complete, read_marker
from igpt.train.pretrain_job import PretrainJobConfig

from .conftest import ROOT, SAMPLE, SHARED_CIFAR


@pytest.fixture(scope="module")
def palette_path(tmp_path_factory, cifar_images):
    from igpt.data.palette import Palette

    path = tmp_path_factory.mktemp("palette") / "palette.npy"
    Palette.fit(cifar_images[:100].reshape(-1, 3), max_iter=5).save(path)
    return path


def job_argv(tmp_path, palette_path, name, stage, max_steps, resolution=16, **extra) -> list[str]:
    """``resolution``: 16x16 unless a test checks the default's (a quarter of 32x32's tokens: what a resume, a
    lease or a failure does is the same, each step and completion faster)."""
    shared = (SHARED_CIFAR / "train-00000-of-00005.parquet").exists()
    # 1,000 training images either way (the package's sample has 1,000): 62 steps per epoch
    train = ["--train.path", str(SHARED_CIFAR), "--train.max_images", "1000"] if shared else \
        ["--train.path", str(SAMPLE), "--train.key_prefix", "train/"]
    val = ["--val.path", str(SHARED_CIFAR)] if shared else ["--val.path", str(SAMPLE), "--val.key_prefix", "test/"]
    argv = ["--name", name, "--storage_path", str(tmp_path / "runs"), "--palette_path", str(palette_path),
            *train, *val, "--val_images", "32", "--model.size", "debug", "--deepspeed.preset", "cpu",
            "--deepspeed.zero_stage", str(stage), "--deepspeed.precision", "fp32", "--deepspeed.micro_batch", "8",
            "--optim.global_batch", "16", "--optim.lr", "0.01", "--optim.warmup_steps", "3",
            "--steps", str(max_steps), "--checkpoint.every_steps", "4", "--scaling.workers", "2",
            "--completions", "2", "--model.resolution", str(resolution), "--transform.resolution", str(resolution)]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    return argv


def job(tmp_path, palette_path, name, stage, max_steps, resolution=16, **extra) -> PretrainJobConfig:
    return cli.parse(PretrainJobConfig, job_argv(tmp_path, palette_path, name, stage, max_steps, resolution, **extra))


def history(summary, key):
    return MlflowClient(summary["tracking_uri"]).get_metric_history(summary["run_id"], key)


def test_two_workers_loss_falls_and_mlflow_has_the_run(tmp_path, palette_path, ray_local, monkeypatch):
    # ZeRO 3 (its weights gathered from shards, the hardest case; ZeRO 2's weights file is checked after the
    # resume below, each logged step there), logging every 5 steps: the first, every 5th, checkpoints (every 4)
    # and the end. Every micro-batch reaches the step 0.5 s late (a test fault; long beside the step's own 0.1-0.3 s,
    # so its share passes 10% on a loaded machine too): the data wait it measures
    stage, delay = 3, 0.5
    monkeypatch.setenv("IGPT_FAULTS", json.dumps({"data_delay_s": delay}))
    extra = {"log_every": 5, "tracking.register": f"igpt-z{stage}"}
    summary = pretrain.run(job(tmp_path, palette_path, f"z{stage}", stage, max_steps=12, resolution=32, **extra))
    logged = sorted(history(summary, "train/loss"), key=lambda m: m.step)
    losses = [m.value for m in logged]
    assert [m.step for m in logged] == [1, 4, 5, 8, 10, 12]
    assert losses[0] == pytest.approx(np.log(512), abs=1e-3)  # the zero-initialised head: uniform over 512
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses  # it learns
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("train/bits_per_token", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "val/loss"):
        assert key in run.data.metrics, key
    # the data wait of every logged window: at least the delay per step (one micro-batch a step), a share of the
    # step below 1; over the run past the first window, above the warning's 10%: warned, naming the knobs
    waits = sorted(history(summary, "train/data_wait_s"), key=lambda m: m.step)
    shares = {m.step: m.value for m in history(summary, "train/data_wait_share")}
    assert [m.step for m in waits] == [1, 4, 5, 8, 10, 12] and sorted(shares) == [1, 4, 5, 8, 10, 12]
    assert all(m.value >= delay for m in waits), [m.value for m in waits]  # the first also holds the start-up
    assert all(0 < v < 1 for v in shares.values()) and min(shares.values()) > 0.1, shares
    assert 0.1 < run.data.metrics["summary/data_wait_share"] < 1
    assert "--scaling.cpus_per_worker" in run.data.tags["igpt.warning.data_wait"]
    assert run.data.params["deepspeed.zero_stage"] == str(stage) and "CPU" in run.data.tags["mfu_peak"]
    # resolved values, not the flags' "None": what DeepSpeed's config says ran
    assert (run.data.params["deepspeed.precision"], run.data.params["deepspeed.micro_batch"]) == ("fp32", "8")
    assert run.data.params["deepspeed.grad_accum"] == "1" and run.data.params["optim.global_batch"] == "16"
    assert not [k for k, v in run.data.params.items() if v == "None" and k.startswith(("deepspeed.", "optim.",
                                                                                         "model.", "steps"))]
    assert run.data.tags["igpt.size"] == "debug" and run.data.tags["igpt.resolution"] == "32"
    # the splits as MLflow datasets: source, digest of the selection, record count
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert json.loads(inputs["training"].profile)["num_rows"] == 1000 and len(inputs["training"].digest) == 10
    assert json.loads(inputs["training"].source)["uri"] in (str(SHARED_CIFAR), str(SAMPLE))
    # MLflow's system metrics, sampled on rank 0's node while it trained
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    # summary metrics the runs table sorts by
    assert run.data.metrics["summary/final_val_loss"] == run.data.metrics["val/loss"]
    assert run.data.metrics["summary/tokens"] == 12 * 16 * 32 * 32
    # the model's own FLOPs per token (attention included, MFU's formula) x tokens
    from igpt.model.config import train_flops_per_token

    p = run.data.params
    fpt = train_flops_per_token(int(p["model.n_layer"]), int(p["model.d_model"]), 32 * 32, int(p["model.n_colors"]))
    assert run.data.metrics["summary/train_flops"] == pytest.approx(fpt * 12 * 16 * 32 * 32, rel=1e-6)
    arts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"config.json", "deepspeed_config.json", "palette", "completions"} <= arts
    pics = [a.path for a in client.list_artifacts(summary["run_id"], "completions")]
    assert pics == ["completions/epoch_001.png"]
    local = client.download_artifacts(summary["run_id"], pics[0], str(tmp_path))
    from PIL import Image

    # 2 images x (original | 2 completions), 32x32 each with 2-pixel gaps, upscaled 4x
    assert Image.open(local).size == ((3 * 34 + 2) * 4, (2 * 34 + 2) * 4)
    run_dir = Path(summary["run_dir"])
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_accumulation_steps"] == 1
    kept = sorted(p.name for p in run_dir.glob("step_*"))
    assert kept == ["step_00000008", "step_00000012"]  # every 4 steps and at the end; the newest 2 kept
    assert all((run_dir / k / MARKER).exists() for k in kept)
    # the plain weights file evaluation loads equals DeepSpeed's own consolidation of the shards

    ours = checkpoints.load(run_dir)  # torch.load(weights_only=True) inside
    theirs = final_params(summary["run_dir"])
    assert ours["step"] == 12 and ours.keys() >= {"model", "palette"} and ours["state_dict"].keys() == theirs.keys()
    assert all(torch.equal(ours["state_dict"][k], theirs[k].float()) for k in theirs)
    model = checkpoints.load_model(run_dir)
    assert torch.equal(model.head.weight, theirs["head.weight"].float()) and model.head.weight.abs().sum() > 0
    np.testing.assert_array_equal(checkpoints.load_palette(run_dir).centres, np.load(palette_path))
    # the final weights as an MLflow model (PyTorch flavour), registered: version 1 of the name, from this run
    import mlflow.pytorch

    version = client.get_model_version(f"igpt-z{stage}", "1")
    assert version.run_id == summary["run_id"] and summary["model_uri"].startswith("models:/")
    mlflow.set_tracking_uri(summary["tracking_uri"])
    logged = mlflow.pytorch.load_model(f"models:/igpt-z{stage}/1")
    x = model.ar_inputs(torch.randint(0, 512, (2, 1024)))
    with torch.no_grad():
        assert torch.equal(logged(x), model(x))


def test_torn_checkpoint_is_skipped_and_resubmission_continues_the_same_run(tmp_path, palette_path, ray_local):
    first = pretrain.run(job(tmp_path, palette_path, "torn", 2, max_steps=8))
    run_dir = Path(first["run_dir"])
    assert newest_complete(run_dir).name == "step_00000008"
    (run_dir / "step_00000008" / MARKER).unlink()  # as if the run died while writing step 8
    assert newest_complete(run_dir).name == "step_00000004"
    second = pretrain.run(job(tmp_path, palette_path, "torn", 2, max_steps=10))
    assert second["resumed"] and second["run_id"] == first["run_id"]  # the same MLflow run continues
    steps = [m.step for m in history(second, "train/loss")]
    # steps 1-8 from the first submission; 5-8 are trained again from the complete step-4 checkpoint but not
    # logged twice; 9-10 are new
    assert sorted(steps) == list(range(1, 11))
    assert newest_complete(run_dir).name == "step_00000010"
    # the weights file of a resumed ZeRO-2 run equals DeepSpeed's own consolidation of its shards
    ours, theirs = checkpoints.load(run_dir)["state_dict"], final_params(run_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].float()) for k in theirs)
    # each worker's data position is in a share dealt for 2 workers: another count is refused before Ray starts
    with pytest.raises(Conflict, match="written by 2 workers .* --scaling.workers 1: resume with --scaling.workers 2"):
        pretrain.run(job(tmp_path, palette_path, "torn", 2, max_steps=12, **{"scaling.workers": 1}))


def final_params(run_dir, tmp_path=None) -> dict:
    """The fp32 parameters of a run's newest complete checkpoint, consolidated by DeepSpeed itself (a checkpoint
    on object storage is copied down to ``tmp_path`` first)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = newest_complete(run_dir)
    tag = read_marker(ckpt)["tag"]
    local = ckpt.download(tmp_path / "final" / ckpt.name) if ckpt.remote else ckpt.local()
    return get_fp32_state_dict_from_zero_checkpoint(str(local), tag=tag)


def test_a_diverging_loss_stops_the_run_with_a_clear_message(tmp_path, palette_path, ray_local, monkeypatch):
    monkeypatch.setenv("IGPT_FAULTS", json.dumps({"nan_at_step": 3}))
    cfg = job(tmp_path, palette_path, "nan", 2, max_steps=6, **{"checkpoint.max_failures": 2})
    with pytest.raises(Exception, match=r"loss is nan at step 3|diverged \(loss nan at step 3\)"):
        pretrain.run(cfg)
    run_dir = tmp_path / "runs" / "nan"
    client = MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED"
    assert run.data.metrics["train/nonfinite_loss"] == 1.0
    assert (run_dir / "nonfinite_loss").read_text() == "loss nan at step 3\n"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]


def test_two_jobs_submitted_with_one_name_one_trains_and_the_other_is_refused_at_once(tmp_path, palette_path,
                                                                                     ray_local):
    """A double submit: two pretraining drivers started together with one --name, both joining this Ray cluster.
    One trains; the other exits 2 within seconds, before Ray starts, naming the live owner. MLflow has one run, each
    step logged once."""
    import os
    import subprocess
    import sys
    import time

    argv = job_argv(tmp_path, palette_path, "twice", 2, max_steps=4, **{"scaling.workers": 1, "completions": 0,
                                                                          "val_images": 8})
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "DS_ACCELERATOR": "cpu"}
    t0 = time.time()
    logs = [(tmp_path / f"out{i}.log", tmp_path / f"err{i}.log") for i in range(2)]
    procs = []
    for o, e in logs:
        with open(o, "w") as out, open(e, "w") as err:  # the child keeps its own copies of the descriptors
            procs.append(subprocess.Popen([sys.executable, "-m", "pipelines.pretrain", *argv], cwd=ROOT, env=env,
                                          stdout=out, stderr=err))
    ends = {}
    while len(ends) < 2:
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                ends[i] = (time.time() - t0, p.returncode, logs[i][0].read_text(), logs[i][1].read_text())
        if time.time() - t0 > 400:
            for p in procs:
                p.kill()
            raise AssertionError("\n".join(e.read_text()[-3000:] for _, e in logs))
        time.sleep(0.2)
    (lost_at, lost_rc, _, lost_err), (_, won_rc, won_out, won_err) = sorted(ends.values(), key=lambda e: e[1] == 0)
    assert won_rc == 0, won_err[-3000:]
    assert lost_rc == 2 and lost_at < 30, (lost_rc, lost_at, lost_err[-3000:])
    winner = next(p.pid for i, p in enumerate(procs) if ends[i][1] == 0)
    assert lost_err.strip().splitlines()[-1].startswith(f"error: run {tmp_path / 'runs' / 'twice'} is owned by a "
                                                        "live job: host "), lost_err[-2000:]
    assert f"pid {winner}," in lost_err and "Choose another --name" in lost_err
    client = MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_name for r in runs] == ["twice"] and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == [1, 2, 3, 4]


def test_storage_that_turns_unwritable_ends_the_run_failed_naming_the_path(tmp_path, palette_path, ray_local):
    """Once the step-4 checkpoint is complete, the run folder is moved away and a file put in its place: every
    write under it now fails, as on a volume gone read-only (root ignores chmod, so the test cannot use it). The
    job ends FAILED in MLflow with the path and the way out, not with whatever the workers or the lease's clean-up
    hit; the moved folder still holds the complete checkpoint to resume from."""
    import threading
    import time

    cfg = job(tmp_path, palette_path, "ro", 2, max_steps=6, **{"scaling.workers": 1, "checkpoint.max_failures": 0,
                                                                  "completions": 0, "val_images": 8})
    run_dir, moved = tmp_path / "runs" / "ro", tmp_path / "runs" / "ro.moved"

    def break_storage():
        deadline = time.time() + 300
        while not (run_dir / "step_00000004" / MARKER).exists() and time.time() < deadline:
            time.sleep(0.1)
        run_dir.rename(moved)
        run_dir.write_text("not a folder any more\n")

    t = threading.Thread(target=break_storage, daemon=True)
    t.start()
    with pytest.raises(pretrain.StorageUnwritable, match=rf"cannot be written any more \(cannot write {run_dir}/"
                                                        rf".*make {run_dir} writable and re-submit --name ro"):
        pretrain.run(cfg)
    t.join(1)
    client = MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}")
    run = client.get_run((moved / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED" and run.data.tags["igpt.error"].startswith("StorageUnwritable: ")
    assert str(run_dir) in run.data.tags["igpt.error"]
    # the reason where the UI shows it: the run's description, with the traceback's tail
    assert run.data.tags["mlflow.note.content"].startswith("**FAILED**: StorageUnwritable: ")
    assert "Traceback" in run.data.tags["igpt.traceback"] and "StorageUnwritable" in run.data.tags["igpt.traceback"]
    assert newest_complete(moved, report=False).name == "step_00000004"


@pytest.mark.slow  # ~2.5 min: a driver started, killed, and the job submitted again
def test_resubmission_after_the_driver_died_continues_the_run(tmp_path, palette_path, ray_local):
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = job(tmp_path, palette_path, "orphan", 2, max_steps=12)
    run_dir = tmp_path / "runs" / "orphan"
    argv = [sys.executable, "-m", "pipelines.pretrain", "--config", str(tmp_path / "cfg.json")]
    (tmp_path / "cfg.json").write_text(json.dumps(cli.to_dict(cfg)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not (run_dir / "step_00000004" / MARKER).exists():
        assert proc.poll() is None and time.time() < deadline, "the first driver ended before its first checkpoint"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray runtime it started die at once
    proc.wait()
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "RUNNING"  # left behind by the dead driver
    before = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert 4 <= max(before) < 12

    again = pretrain.run(cfg)
    assert again["resumed"] and again["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 13))  # every step once: none lost, none logged twice


def folder_job(tmp_path, palette_path, name, n, bad, steps, **extra) -> PretrainJobConfig:
    """An ImageNet-style folder of ``n`` small PNGs in 3 classes (every ``bad``-th one not an image), trained on
    max_images=n-20 then a 50% holdout: the split's records are fewer than its files."""
    from .fixtures import encode, rand_images

    root = tmp_path / "folder"
    for i, img in enumerate(rand_images(n, 16)):
        d = root / "train" / f"n{i % 3:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.png").write_bytes(b"not an image" if bad and i % bad == 0 else encode(img))
    data = ["--path", str(root), "--format", "imagefolder", "--max_images", str(n - 20), "--holdout", "0.5"]
    argv = ["--name", name, "--storage_path", str(tmp_path / "runs"), "--palette_path", str(palette_path),
            *[f"--train.{a[2:]}" if a.startswith("--") else a for a in data], "--train.part", "rest",
            *[f"--val.{a[2:]}" if a.startswith("--") else a for a in data], "--val.part", "holdout",
            "--val.split", "train",
            "--val_images", "16", "--model.size", "debug", "--model.resolution", "8", "--transform.recipe", "none",
            "--deepspeed.preset", "cpu", "--deepspeed.precision", "fp32", "--deepspeed.micro_batch", "4",
            "--optim.global_batch", "8", "--optim.lr", "0.005", "--steps", str(steps),
            "--checkpoint.every_steps", "100", "--scaling.workers", "2", "--completions", "0"]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    return cli.parse(PretrainJobConfig, argv)


def test_a_held_out_folder_split_trains_for_its_steps_through_several_epochs(tmp_path, palette_path, ray_local):
    """The run that used to fail at step 6 with a bare StopIteration (steps per epoch taken from the file count):
    its length is in steps, the stream cycles epochs, the warm-up is one epoch of the records left, and the
    learning rate decays to ~0 at the last step."""
    cfg = folder_job(tmp_path, palette_path, "folder", 120, 0, 16)
    sched = pretrain.resolve(cfg)[0]
    assert sched.records < 100 and sched.warmup_steps == sched.steps_per_epoch == sched.records // 8
    assert sched.total_steps > 2 * sched.steps_per_epoch  # more than two epochs of this split
    summary = pretrain.run(cfg)
    lrs = [m.value for m in sorted(history(summary, "train/lr"), key=lambda m: m.step)]
    assert len(lrs) == 16
    peak = max(lrs)
    assert peak == pytest.approx(0.005) and lrs.index(peak) == sched.warmup_steps - 1  # one epoch of warm-up
    assert all(a < b for a, b in zip(lrs[:sched.warmup_steps - 1], lrs[1:sched.warmup_steps], strict=False))
    assert lrs[-1] < 0.05 * peak  # cosine to 0 at the end
    assert MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).data.params["data.train_records"] == \
        str(sched.records)


@pytest.mark.slow  # ~1.5 min
def test_a_stream_that_runs_dry_is_a_clear_error_naming_the_counts(tmp_path, palette_path, ray_local):
    """Half the files do not decode: the passes planned (the steps' worth plus a spare epoch) hold fewer good
    records than the steps need, and the run stops with the counts instead of a bare StopIteration."""
    cfg = folder_job(tmp_path, palette_path, "dry", 120, 2, 30, **{"checkpoint.max_failures": 0})
    with pytest.raises(Exception, match=r"training stream ended .* passes over \d+ records"):
        pretrain.run(cfg)
    # the report the message points to is there although the run died: only undecodable files (every 2nd), each
    # with its reason
    rows = [r.split("\t") for r in (tmp_path / "runs" / "dry" / "errors.tsv").read_text().splitlines()[1:]]
    assert rows and all(int(key.rsplit("/", 1)[-1][:3]) % 2 == 0 and reason for key, reason in rows), rows[:5]
