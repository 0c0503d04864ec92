"""Checkpoints verified, not trusted (igpt.train.checkpoints): a marker that lies is caught and the newest checkpoint
that verifies is used; keep holds. Plain files, no training."""

import pytest
import torch

from igpt.train import checkpoints
from igpt.train.checkpoints import MARKER, WEIGHTS, newest_complete, prune, verify, write_marker, write_weights


def fake_checkpoint(run_dir, step):
    d = run_dir / f"step_{step:08d}"
    (d / f"step{step}").mkdir(parents=True)
    (d / f"step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)  # a DeepSpeed shard stand-in
    write_weights(d, {"w": torch.full((4,), float(step))}, {"size": "debug"}, torch.zeros(4, 3).numpy(), step)
    write_marker(d, {"tag": f"step{step}", "step": step, "world_size": 2})
    return d


def test_a_cut_or_missing_file_after_the_marker_falls_back_to_the_newest_that_verifies(tmp_path, capsys):
    for s in (4, 8, 12):
        fake_checkpoint(tmp_path, s)
    assert newest_complete(tmp_path).name == "step_00000012"
    shard = tmp_path / "step_00000012" / "step12" / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"x" * 10)  # cut after the marker was written
    assert "has 10 bytes, the marker recorded 1000" in verify(shard.parents[1])
    (tmp_path / "step_00000008" / WEIGHTS).unlink()  # lost
    assert newest_complete(tmp_path).name == "step_00000004"
    err = capsys.readouterr().err
    assert "step_00000012 skipped: step12/mp_rank_00_model_states.pt has 10 bytes" in err
    assert "step_00000008 skipped: weights.pt is missing" in err
    assert checkpoints.load(tmp_path)["step"] == 4  # a run folder resolves to the newest that verifies
    with pytest.raises(RuntimeError, match="does not verify: weights.pt is missing"):
        checkpoints.load(tmp_path / "step_00000008")


def test_a_truncated_weights_file_is_named(tmp_path):
    d = fake_checkpoint(tmp_path, 4)
    w = d / WEIGHTS
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    assert "weights.pt has" in verify(d)  # caught by its size before torch ever reads it
    (d / MARKER).unlink()
    write_marker(d, {"tag": "step4", "step": 4, "world_size": 2})  # a marker that records the cut file
    with pytest.raises(RuntimeError, match=rf"cannot read checkpoint weights {w}"):
        checkpoints.load(w)


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    d = fake_checkpoint(tmp_path, 4)
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-20] ^= 0xFF
    (d / WEIGHTS).write_bytes(bytes(data))
    assert verify(d) == "weights.pt does not match its recorded checksum"


def test_prune_keeps_the_newest_that_verify_and_removes_what_older_attempts_left(tmp_path):
    for s in (100, 200, 300, 400):
        fake_checkpoint(tmp_path, s)
    (tmp_path / "step_00000400" / MARKER).unlink()  # torn newest: kept (not older than the kept ones)
    gone = prune(tmp_path, keep=2)
    assert [p.name for p in gone] == ["step_00000100"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000200", "step_00000300", "step_00000400"]
