"""Training from pre-tokenized shards (``--train.format tokens``): quantize's augmented passes read through the
same plan, slots, positions and resume as images, through a real local Ray runtime, DeepSpeed on the CPU and a
local MLflow store."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from igpt import cli
from igpt.config import IngestLimits, TrackingConfig, TransformConfig
from igpt.data import ingest, sources, stream
from igpt.data import quantize_job as quantize
from igpt.data.palette import Palette
from igpt.data.quantize_job import QuantizeJobConfig
from igpt.data.sources import DatasetSpec
from igpt.errors import UserError
from igpt.train import pretrain_job as pretrain
from igpt.train.pretrain_job import PretrainJobConfig

from .conftest import SAMPLE
from .test_pretrain import final_params

RES, SEED = 16, 5


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, ray_local, cifar_images):
    """The sample's 1,000 training images quantized at 16x16 in two augmented passes (epochs 0 and 1)."""
    root = tmp_path_factory.mktemp("tokens")
    pal = root / "palette.npy"
    Palette.fit(cifar_images[:100].reshape(-1, 3), max_iter=5).save(pal)
    cfg = QuantizeJobConfig(name="tok", storage_path=str(root), palette_path=str(pal), passes=2, rows_per_shard=300,
                            data=DatasetSpec(str(SAMPLE), key_prefix="train/"),
                            transform=TransformConfig(recipe="cifar", resolution=RES, augment=True, seed=SEED),
                            limits=IngestLimits(max_error_rate=0.5, min_records=10),
                            tracking=TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"))
    return {"summary": quantize.run(cfg), "path": str(root / "tok"), "palette": pal, "root": root}


def live_tokens(palette: Palette, keys: list[str], epoch: int) -> dict[str, np.ndarray]:
    """What the live image stream makes of these keys in ``epoch`` (decode, the epoch's crop and flip, palette)."""
    rows = {r["key"]: r for r in pq.read_table(SAMPLE).to_pylist() if r["key"] in set(keys)}
    t = ingest.TransformSpec("cifar", RES, True, SEED, 0)
    return {k: palette.lut[ingest.colour_keys(ingest.record_pixels(rows[k]["image"], 0, k, t, epoch))].reshape(-1)
            for k in keys}


def test_each_pass_is_the_live_streams_epoch_and_a_split_is_read_only_when_complete(tokens, tmp_path):
    s = tokens["summary"]
    assert (s["passes"], s["tokenized"], s["resolution"], s["pass_epochs"]) == (2, 1000, RES, [0, 1])
    spec = DatasetSpec(tokens["path"], "tokens", "train")
    plan = sources.check(spec)
    assert plan.count == 1000 and len(plan.units) == 4 and plan.meta["palette_digest"] == s["palette_digest"]
    got = {}  # (key, epoch) -> tokens, through the reader every run uses
    for r in sources.read(spec, plan, epochs=3, shuffle_seed=SEED).take_all():
        got[(r["key"], r["epoch"])] = np.asarray(r["tokens"])
    assert len(got) == 3000  # every record once per epoch
    palette = Palette.load(tokens["palette"])
    keys = sorted({k for k, _ in got})[::50]
    for epoch in (0, 1):  # pass p holds the live stream's epoch p, token for token
        live = live_tokens(palette, keys, epoch)
        assert all(np.array_equal(got[(k, epoch)], live[k]) for k in keys), epoch
    assert any(not np.array_equal(got[(k, 0)], got[(k, 1)]) for k in keys)  # two augmentations
    assert all(np.array_equal(got[(k, 2)], got[(k, 0)]) for k in keys)  # epoch 2 reads pass 0 again
    # its held-out records' own images: the source quantize read, with the same holdout and part
    src = sources.image_source(DatasetSpec(tokens["path"], "tokens", "train", holdout=0.1, part="holdout"))
    assert (src.path, src.format, src.key_prefix, src.holdout, src.part) == (str(SAMPLE), "parquet", "train/", 0.1,
                                                                             "holdout")
    # a run must agree with the split's palette and resolution
    with pytest.raises(UserError, match="another palette"):
        sources.check_token_split(plan, "0" * 16, RES, "--train.path")
    with pytest.raises(UserError, match="holds 16x16 images; the model's resolution is 32"):
        sources.check_token_split(plan, s["palette_digest"], 32, "--train.path")
    # a split whose summary is missing (quantize died before writing it) is no split
    import shutil

    shutil.copytree(tokens["path"], tmp_path / "cut")
    (tmp_path / "cut" / "train.summary.json").unlink()
    with pytest.raises(UserError, match="no complete token split 'train': train.summary.json is missing"):
        sources.check(DatasetSpec(str(tmp_path / "cut"), "tokens", "train"))


def test_a_worker_resumed_from_tokens_continues_exactly_and_reads_only_what_is_left(tokens):
    spec = DatasetSpec(tokens["path"], "tokens", "train")
    plan = sources.check(spec)

    def make(log):
        return stream.TrainStream(spec, ray.put(plan), tuple(u.take for u in plan.units), 2, 2,
                                  ray.put(Palette.load(tokens["palette"]).lut),
                                  ingest.TransformSpec("cifar", RES, True, SEED, 0), log)

    full = list(make(ingest.error_log()).batches(1, 8))
    k = len(full) * 3 // 4
    log = ingest.error_log()
    resumed = list(make(log).batches(1, 8, after=full[k - 1]["position"]))
    assert len(resumed) == len(full) - k and abs(len(full) - 1000 * 2 // 2 // 8) <= 300 // 8  # within a piece
    for a, b in zip(resumed, full[k:], strict=True):  # the same micro-batches, bit for bit
        assert np.array_equal(a["tokens"], b["tokens"]) and a["position"] == b["position"]
    read, skipped = ray.get(log.stats.remote())
    left = 8 * (len(full) - k)
    assert skipped == 0 and left <= read < left + 8 + 300, (read, left)  # only the rest of its last piece again


def _job(tokens, name: str) -> PretrainJobConfig:
    return cli.parse(PretrainJobConfig, [
        "--name", name, "--storage_path", str(tokens["root"] / "runs"), "--palette_path", str(tokens["palette"]),
        "--train.path", tokens["path"], "--train.format", "tokens", "--val.path", str(SAMPLE),
        "--val.key_prefix", "test/", "--val_images", "16", "--model.size", "debug", "--model.resolution", str(RES),
        "--transform.resolution", str(RES), "--transform.seed", str(SEED), "--transform.augment",
        "--deepspeed.preset", "cpu", "--deepspeed.precision", "fp32", "--deepspeed.micro_batch", "8",
        "--optim.global_batch", "16", "--optim.warmup_steps", "2", "--steps", "8", "--checkpoint.every_steps", "4",
        "--scaling.workers", "2", "--completions", "0",
        "--tracking.tracking_uri", f"sqlite:///{tokens['root'] / 'runs.db'}"])


def test_pretraining_from_tokens_resumes_bit_exactly_after_a_worker_dies(tokens, monkeypatch):
    """Two 8-step runs from the token split: one whose worker 1 dies after step 6 (Ray Train restarts the group from
    step 4's checkpoint, each worker's stream from its saved position) and one uninterrupted: the same weights."""
    from mlflow.tracking import MlflowClient

    plain = pretrain.run(_job(tokens, "plain"))
    monkeypatch.setenv("IGPT_FAULTS", json.dumps({"fail_at_step": 6, "fail_rank": 1}))
    hurt = pretrain.run(_job(tokens, "hurt"))
    assert (tokens["root"] / "runs" / "hurt" / "fault_injected").exists()  # it did die
    a, b = final_params(plain["run_dir"]), final_params(hurt["run_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    client = MlflowClient(plain["tracking_uri"])
    run = client.get_run(hurt["run_id"])
    assert [m.step for m in sorted(client.get_metric_history(hurt["run_id"], "train/loss"),
                                   key=lambda m: m.step)] == list(range(1, 9))  # every step once
    assert run.data.metrics["data/records_skipped"] == 0 and run.data.metrics["data/records_read"] > 0
    assert "train/data_wait_share" in run.data.metrics and run.data.params["train.format"] == "tokens"
