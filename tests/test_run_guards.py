"""Guards around a run: one owner per run name (igpt.train.lease), a store opened race-free, a tracking server that
must answer (igpt.track.tracking). Real processes racing for real files."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from igpt.train.lease import OWNER, Lease, RunNameTaken

from .conftest import ROOT

HOLD = """
import sys, time
from igpt.train.lease import Lease, RunNameTaken
try:
    with Lease(sys.argv[1], every=0.2):
        print("won", flush=True)
        time.sleep(float(sys.argv[2]))
except RunNameTaken as e:
    print("refused:", e, flush=True)
"""


def _hold(run_dir, seconds):
    return subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def test_a_second_job_is_refused_naming_the_live_owner(tmp_path):
    first = _hold(tmp_path / "run", 6)
    assert first.stdout.readline().strip() == "won"
    with pytest.raises(RunNameTaken, match=rf"owned by a live job: host .*, pid {first.pid}.*another --name"):
        Lease(tmp_path / "run").acquire()
    first.wait()
    with Lease(tmp_path / "run") as lease:  # released on exit: the name is free again
        assert lease.took_over is None
    assert not (tmp_path / "run" / OWNER).exists()


def test_two_jobs_started_together_one_wins(tmp_path):
    procs = [_hold(tmp_path / "run", 3) for _ in range(4)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(o.split(":")[0] for o in outs) == ["refused", "refused", "refused", "won"], outs


def test_a_dead_owner_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "run"
    run.mkdir()
    import socket

    (run / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat":
                                         time.time()}))
    with Lease(run) as lease:  # same host, process gone: at once
        assert "is gone" in lease.took_over["why"]
    (run / OWNER).write_text(json.dumps({"host": "lost-node", "pid": 1, "heartbeat": time.time() - 600}))
    with Lease(run, ttl=60) as lease:  # another host, silent for longer than the ttl: a lost node
        assert "heartbeat is 600 s old" in lease.took_over["why"]
    (run / OWNER).write_text(json.dumps({"host": "other-node", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(RunNameTaken, match="other-node"):
        Lease(run, ttl=60).acquire()


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path):
    with Lease(tmp_path / "run", every=0.1):
        first = json.loads((tmp_path / "run" / OWNER).read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / "run" / OWNER).read_text())["heartbeat"] > first


RACE = """
import sys
from igpt.track.tracking import ensure_experiment
print(ensure_experiment(sys.argv[1], "igpt"))
"""


def test_jobs_opening_a_fresh_store_at_once_all_succeed(tmp_path):
    """Without the store lock, three processes creating a fresh SQLite store at once die in alembic's migration
    ("Online migration expected to match one row"), all but one (measured)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-500:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # one experiment, the same id for all


def test_an_unreachable_tracking_server_fails_in_seconds():
    import socket

    from igpt.track.tracking import TrackingUnreachable, check_reachable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.time()
    with pytest.raises(TrackingUnreachable, match=rf"127.0.0.1:{port} did not answer .*tracking_uri"):
        check_reachable(f"http://127.0.0.1:{port}", timeout=2)
    assert time.time() - t < 10


def _plan_job(tmp_path, *extra):
    from igpt import cli
    from igpt.data.palette import Palette
    from igpt.train.pretrain_job import PretrainJobConfig

    from .conftest import SAMPLE

    pal = tmp_path / "palette.npy"
    Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)).save(pal)
    return cli.parse(PretrainJobConfig, [
        "--name", "big", "--storage_path", str(tmp_path / "runs"), "--palette_path", str(pal),
        "--train.path", str(SAMPLE), "--train.key_prefix", "train/", "--val.path", str(SAMPLE),
        "--val.key_prefix", "test/", "--deepspeed.preset", "cpu", "--deepspeed.precision", "fp32",
        "--scaling.workers", "2", "--steps", "10", "--optim.warmup_steps", "1", *extra])


def test_a_run_the_plan_says_will_not_fit_is_refused_before_data_or_tracking(tmp_path):
    """XL on two 16 GiB CPU workers: refused in seconds from the plan, naming what it needs and the ways out; no run
    folder, no MLflow store. --scaling.ignore_plan lets it through the check."""
    from igpt.errors import UserError
    from igpt.train import pretrain_job as pretrain

    cfg = _plan_job(tmp_path, "--model.size", "XL", "--optim.global_batch", "16", "--deepspeed.micro_batch", "8",
                    "--scaling.worker_mem_gib", "16")
    t0 = time.time()
    with pytest.raises(UserError, match=r"will not fit: XL \(6\d{3}M parameters\), ZeRO-\d, fp32, micro batch 8, 2 "
                                        r"worker\(s\) needs \d+\.\d GiB per worker .* and 90% of 16\.0 GiB is there "
                                        r"\(--scaling.worker_mem_gib\)\. No micro batch fits: .*--scaling.ignore_plan"):
        pretrain.run(cfg)
    assert time.time() - t0 < 30 and [p.name for p in (tmp_path / "runs").rglob("*")] == ["big"]  # its empty folder
    # the check alone lets a smaller micro batch through when one fits, and says which
    s_cfg = _plan_job(tmp_path, "--model.size", "S", "--optim.global_batch", "64", "--deepspeed.micro_batch", "32",
                      "--scaling.worker_mem_gib", "16")
    sched, _, ds_conf, model_cfg = pretrain.resolve(s_cfg)
    with pytest.raises(UserError, match=r"--deepspeed\.micro_batch (2|4|8|16) fits"):
        pretrain.preflight_memory(s_cfg, ds_conf, model_cfg)
    brave = _plan_job(tmp_path, "--model.size", "XL", "--optim.global_batch", "16", "--deepspeed.micro_batch", "8",
                      "--scaling.worker_mem_gib", "16", "--scaling.ignore_plan")
    _, _, ds_conf, model_cfg = pretrain.resolve(brave)
    pretrain.preflight_memory(brave, ds_conf, model_cfg)  # no error: the brave start


def test_bf16_on_a_cpu_without_native_bf16_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """The CPU's flags decide: an AVX2-only CPU (the flags of the machine the 16x slowdown was measured on) refuses
    a bf16 CPU run before its run folder's lease, naming the CPU and the way out; avx512_bf16, amx_bf16 or Arm's
    bf16 let it through, as do GPU workers and fp32."""
    from igpt import hw
    from igpt.errors import UserError
    from igpt.train import pretrain_job as pretrain

    avx2 = {"fpu", "sse4_2", "avx", "avx2", "fma"}
    for ok in ({"avx2", "avx512_bf16"}, {"amx_bf16"}, {"asimd", "bf16"}):
        hw.check_cpu_precision("bf16", False, "x", flags=ok)
    hw.check_cpu_precision("bf16", True, "x", flags=avx2)
    hw.check_cpu_precision("fp32", False, "x", flags=avx2)
    monkeypatch.setattr(hw, "cpu_flags", lambda: avx2)  # this machine's own flags, whatever they are, set aside
    cfg = _plan_job(tmp_path, "--model.size", "debug", "--optim.global_batch", "16", "--deepspeed.micro_batch", "8",
                    "--deepspeed.precision", "bf16")
    with pytest.raises(UserError, match=r"this run trains in bf16 on CPU workers, but this CPU \(.+\) has no native "
                                        r"bf16 .*16x slower.*--deepspeed\.precision fp32"):
        pretrain.run(cfg)
    assert not (tmp_path / "runs").exists()  # refused before the run folder or its lease
    assert "native bf16: no" in hw.describe()


def test_worker_memory_is_measured_on_the_cluster(tmp_path, ray_local):
    """Without --scaling.worker_mem_gib, CPU workers share the smallest node's Ray memory: XL is refused naming it;
    the debug model passes."""
    import ray

    from igpt.errors import UserError
    from igpt.raysetup import worker_memory_gib
    from igpt.train import pretrain_job as pretrain

    node = min(n["Resources"]["memory"] for n in ray.nodes() if n["Alive"]) / 1024**3
    gib, how = worker_memory_gib(2, False, 0.5)
    assert gib == pytest.approx(node / 2) and "shared by 2 worker(s)" in how
    assert worker_memory_gib(2, False, 1.5)[0] == pytest.approx(node)  # one 1.5-CPU worker per 2-CPU node
    cfg = _plan_job(tmp_path, "--model.size", "XL", "--optim.global_batch", "16", "--deepspeed.micro_batch", "8")
    with pytest.raises(UserError, match=rf"of {node / 2:.1f} GiB is there \(Ray's memory on the smallest node"):
        pretrain.run(cfg)
    ok = _plan_job(tmp_path, "--model.size", "debug", "--optim.global_batch", "16", "--deepspeed.micro_batch", "8")
    _, _, ds_conf, model_cfg = pretrain.resolve(ok)
    pretrain.preflight_memory(ok, ds_conf, model_cfg)


def test_gpu_workers_get_the_largest_micro_batch_the_plan_fits(tmp_path):
    """On GPU workers without --deepspeed.micro_batch, the micro batch is igpt plan's best for the worker's memory
    (S, 8 x 80 GiB, the S preset); a given one is kept, and CPU workers keep the recipe's."""
    from igpt.model.config import ModelConfig
    from igpt.train import plan as memplan
    from igpt.train import pretrain_job as pretrain

    def chosen(*extra):
        cfg = _plan_job(tmp_path, "--model.size", "S", "--deepspeed.preset", "S", "--deepspeed.precision", "bf16",
                        "--scaling.workers", "8", "--scaling.worker_mem_gib", "80", *extra)
        _, _, ds_conf, model_cfg = pretrain.resolve(cfg)
        return pretrain.fill_micro_batch(cfg, ds_conf, model_cfg, pretrain.preflight_memory(cfg, ds_conf, model_cfg))

    zero = json.loads((ROOT / "cluster" / "deepspeed" / "S.json").read_text())["deepspeed"]["zero_optimization"]
    best = memplan.best_micro_batch(memplan.PlanInput(ModelConfig.from_name("S"), gpus=8, gpu_mem_gib=80,
                                                      zero_stage=zero["stage"], precision="bf16", global_batch=128))
    assert best is not None and best > 1
    assert chosen("--scaling.use_gpu") == best
    assert chosen("--scaling.use_gpu", "--deepspeed.micro_batch", "2") == 2
    from igpt.recipes import recipe

    assert chosen() == recipe("S").micro_batch  # CPU workers: the recipe's
