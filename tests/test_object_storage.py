"""Run state on object storage: an S3-compatible server (moto) on 127.0.0.1, spoken to through pyarrow's S3 file
system as on a real cluster. Checkpoint markers, verification and fallback, pruning, weights loading, the run-name
lease, and a pretraining run resumed on S3 (tests/test_pretrain.py, slow)."""

import json
import uuid

import numpy as np
import pytest
import torch

from igpt.storage import Loc
from igpt.train import checkpoints
from igpt.train.checkpoints import MARKER, WEIGHTS
from igpt.train.lease import Lease, RunNameTaken


@pytest.fixture
def bucket(s3):
    return Loc(f"{s3}/{uuid.uuid4().hex[:8]}")


def test_files_are_written_whole_listed_sized_and_deleted(bucket, tmp_path):
    f = bucket / "a" / "b.json"
    assert not f.exists() and bucket.children() == []
    f.write_text('{"x": 1}')
    assert f.is_file() and f.size() == 8 and json.loads(f.read_text()) == {"x": 1}
    assert (bucket / "a").is_dir() and [c.name for c in bucket.children(dirs=True)] == ["a"]
    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "sub" / "c.bin").write_bytes(b"\0" * 1000)
    (bucket / "d").upload(tmp_path / "up")
    assert (bucket / "d").files() == {"sub/c.bin": 1000}
    back = (bucket / "d").download(tmp_path / "down")
    assert (back / "sub" / "c.bin").read_bytes() == b"\0" * 1000
    (bucket / "d").rmtree()
    assert not (bucket / "d").exists() and f.exists()
    with pytest.raises(FileNotFoundError, match="no such file: s3://"):
        (bucket / "nothing").read_text()


def fake_checkpoint(run: Loc, step: int, tmp_path, marker: bool = True) -> Loc:
    """A checkpoint folder as a run leaves it: a shard per rank, weights.pt, then (unless torn) the marker."""
    local = tmp_path / f"c{step}"
    (local / f"step{step}").mkdir(parents=True)
    for r in range(2):
        (local / f"step{step}" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r]) * (100 + r))
    (local / f"step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 50)
    checkpoints.write_weights(local, {"w": torch.full((3,), float(step))}, {"size": "debug"},
                              np.zeros((4, 3), np.float32), step)
    folder = run / f"step_{step:08d}"
    folder.upload(local)
    if marker:
        checkpoints.write_marker(folder, {"tag": f"step{step}", "step": step, "world_size": 2})
    return folder


def test_checkpoints_on_s3_verify_fall_back_prune_and_load(bucket, tmp_path):
    run = bucket / "run"
    for step in (4, 8, 12):
        fake_checkpoint(run, step, tmp_path)
    assert [p.name for p in checkpoints.checkpoint_dirs(run)] == ["step_00000004", "step_00000008", "step_00000012"]
    assert checkpoints.newest_complete(run).name == "step_00000012"
    # a shard cut after the marker was written: passed over, with the reason; the older one is used
    shard = run / "step_00000012" / "step12" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"\1" * 10)
    assert "has 10 bytes, the marker recorded 101" in checkpoints.verify(run / "step_00000012")
    assert checkpoints.newest_complete(run).name == "step_00000008"
    fake_checkpoint(run, 16, tmp_path, marker=False)  # torn mid-write
    assert checkpoints.verify(run / "step_00000016") == "no completion marker (torn mid-write)"
    assert checkpoints.newest_complete(run).name == "step_00000008"
    # weights.pt loads straight from the bucket, the run folder resolving to its newest complete checkpoint
    assert str(checkpoints.resolve(run)) == f"{run}/step_00000008/{WEIGHTS}"
    assert torch.equal(checkpoints.load(run)["state_dict"]["w"], torch.full((3,), 8.0))
    (run / "step_00000004" / WEIGHTS).write_bytes(b"garbage")  # its marker lists the real size and checksum
    assert "weights.pt" in checkpoints.verify(run / "step_00000004")
    with pytest.raises(RuntimeError, match="does not verify"):
        checkpoints.resolve(run / "step_00000004")
    # keep 1: everything older than the newest checkpoint that verifies goes, torn ones after it stay for now
    fake_checkpoint(run, 20, tmp_path)
    gone = checkpoints.prune(run, keep=1)
    assert sorted(p.name for p in gone) == ["step_00000004", "step_00000008", "step_00000012", "step_00000016"]
    assert [p.name for p in checkpoints.checkpoint_dirs(run)] == ["step_00000020"]


def test_a_resuming_rank_copies_down_only_its_own_shards(bucket, tmp_path):
    folder = fake_checkpoint(bucket / "run", 4, tmp_path)
    got = folder.download(tmp_path / "rank1", keep=lambda name: checkpoints.rank_file(name, 1))
    names = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    assert names == [MARKER, "step4/mp_rank_00_model_states.pt", "step4/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                     WEIGHTS]


def test_the_run_name_lease_holds_on_s3(bucket):
    with Lease(bucket / "run", settle=0.2) as first:
        assert json.loads((bucket / "run" / "owner.json").read_text())["token"] == first.me["token"]
        with pytest.raises(RunNameTaken, match="owned by a live job"):
            Lease(bucket / "run", settle=0.2).acquire()
    assert not (bucket / "run" / "owner.json").exists()  # released: the name is free again
    with Lease(bucket / "run", settle=0.2):
        pass
