"""Palette fitting and tokenization through a real local Ray runtime and a real MLflow store."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from mlflow.tracking import MlflowClient
from PIL import Image

from igpt.config import IngestLimits, PaletteConfig, TrackingConfig, TransformConfig
from igpt.data import fit_palette_job as fit_palette
from igpt.data import ingest, sources
from igpt.data import quantize_job as quantize
from igpt.data.fit_palette_job import FitPaletteJobConfig
from igpt.data.images import decode_rgb
from igpt.data.palette import Palette
from igpt.data.quantize_job import QuantizeJobConfig
from igpt.data.sources import DatasetSpec
from igpt.storage import Loc

from . import fixtures
from .conftest import SAMPLE


@pytest.fixture(scope="module")
def palette_file(tmp_path_factory, ray_local):
    """A palette fitted by the fit_palette job on the real CIFAR-10 sample (train split)."""
    out = tmp_path_factory.mktemp("pal")
    cfg = FitPaletteJobConfig(name="pal", storage_path=str(out),
                              data=DatasetSpec(str(SAMPLE), "parquet", key_prefix="train/"),
                              palette=PaletteConfig(sample_pixels=100_000, max_iter=10))
    summary = fit_palette.run(cfg)
    return Path(summary["palette"]), summary, out


def test_fit_palette_job_samples_across_the_data_and_logs_artifacts(palette_file):
    path, summary, out = palette_file
    assert np.load(path).shape == (512, 3) and np.load(path).dtype == np.float32
    assert summary["images_read"] == 1000 and summary["skipped"] == 0
    assert summary["pixels"] == 100_000 and summary["pixels_per_image"] == 100
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"palette.npy", "swatch.png", "errors.tsv", "summary.json", "config.json"} <= arts
    assert Image.open(out / "pal" / "swatch.png").size == (16 * 16, 32 * 16)


def test_fit_palette_job_writes_to_object_storage_and_its_palette_loads_from_there(tmp_path, ray_local, s3):
    """--storage_path on S3 (moto on 127.0.0.1): the palette, its lookup table, swatch, summary and error report
    put whole into the bucket; Palette.load reads it back from there (with the table, not rebuilt), as the jobs
    given --palette_path s3://… do."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = FitPaletteJobConfig(name="pal", storage_path=f"{s3}/{tmp_path.name}",
                              data=DatasetSpec(str(SAMPLE), "parquet", key_prefix="train/", max_images=200),
                              palette=PaletteConfig(sample_pixels=20_000, max_iter=3),
                              tracking=TrackingConfig(tracking_uri=uri))
    summary = fit_palette.run(cfg)
    assert summary["palette"] == f"{s3}/{tmp_path.name}/pal/palette.npy"
    names = {f.name for f in (Loc(cfg.storage_path) / "pal").children()}
    assert {"palette.npy", "swatch.png", "summary.json", "errors.tsv"} <= names
    assert any(n.startswith("palette.lut-") for n in names) and not (tmp_path / "pal").exists()
    pal = Palette.load(summary["palette"])
    logged = np.load(MlflowClient(uri).download_artifacts(summary["run_id"], "palette.npy", str(tmp_path)))
    assert pal.centres.shape == (512, 3) and np.array_equal(pal.centres, logged)
    assert pal._lut is not None  # the bucket's table, copied down with it
    with pytest.raises(Exception, match="palette file not found"):
        Palette.load(f"{s3}/{tmp_path.name}/nowhere/palette.npy")


def bad_shard(path: Path) -> dict:
    """A Parquet shard of good CIFAR-10 records and every kind of bad one the issue lists."""
    good = pq.read_table(SAMPLE).slice(0, 40)
    keys, images = good["key"].to_pylist(), good["image"].to_pylist()
    truncated = images[0][: len(images[0]) // 2]
    rgb20 = np.random.default_rng(0).integers(0, 256, (20, 20, 3), np.uint8)
    extra = {
        "bad/truncated.jpg": truncated,
        "bad/zero-bytes.jpg": b"",
        "bad/text.txt": b"this is not an image\n",
        "odd/grey.png": fixtures.encode(rgb20, "PNG", "L"),
        "odd/cmyk.jpg": fixtures.encode(rgb20, "JPEG", "CMYK"),
        "odd/small-20x20.png": fixtures.encode(rgb20, "PNG"),
    }
    # bad records sit in the middle of the shard: the good ones after them must survive
    keys = keys[:20] + list(extra) + keys[20:]
    images = images[:20] + list(extra.values()) + images[20:]
    pq.write_table(pa.table({"key": keys, "image": pa.array(images, pa.binary()), "label": list(range(len(keys)))}),
                   path, row_group_size=16)
    return {"keys": keys, "images": images, "bad": {"bad/truncated.jpg", "bad/zero-bytes.jpg", "bad/text.txt"}}


def quantize_cfg(palette_path, data_path, out, **kw):
    return QuantizeJobConfig(name="tok", storage_path=str(out), palette_path=str(palette_path),
                             data=DatasetSpec(str(data_path), "parquet", "train"), rows_per_shard=17,
                             limits=IngestLimits(max_error_rate=kw.pop("max_error_rate", 0.5), min_records=10,
                                                 max_pixels=kw.pop("max_pixels", IngestLimits.max_pixels)), **kw)


def test_bad_records_are_skipped_alone_listed_and_counted(tmp_path, palette_file):
    shard = bad_shard(tmp_path / "train-00000.parquet")
    summary = quantize.run(quantize_cfg(palette_file[0], tmp_path / "train-00000.parquet", tmp_path / "out"))
    n = len(shard["keys"])
    assert summary["images_read"] == n
    assert summary["skipped"] == 3 and summary["tokenized"] == n - 3
    assert summary["images_read"] == summary["tokenized"] + summary["skipped"]

    out = tmp_path / "out" / "tok"
    table = pq.read_table(out / "train")
    assert table.schema.field("tokens").type == pa.list_(pa.uint16(), 1024)
    got = dict(zip(table["key"].to_pylist(), table["tokens"].to_pylist(), strict=False))
    assert set(got) == set(shard["keys"]) - shard["bad"]  # every good record, including the odd modes
    palette = Palette.load(palette_file[0])
    for key, data in zip(shard["keys"], shard["images"], strict=False):
        if key in got:  # tokens are the palette's quantization of the (box-resized) RGB image
            img = decode_rgb(data).resize((32, 32), Image.BOX) if key.startswith("odd/") else decode_rgb(data)
            assert got[key] == palette.quantize(np.asarray(img)).reshape(-1).tolist(), key

    report = (out / "train.errors.tsv").read_text().splitlines()
    assert report[0] == "key\treason" and len(report) == 4
    reasons = dict(line.split("\t", 1) for line in report[1:])
    assert set(reasons) == shard["bad"]
    assert "zero bytes" in reasons["bad/zero-bytes.jpg"]
    assert "cannot decode" in reasons["bad/text.txt"] and "cannot decode" in reasons["bad/truncated.jpg"]
    client = MlflowClient(summary["tracking_uri"])
    assert "train.errors.tsv" in {a.path for a in client.list_artifacts(summary["run_id"])}
    assert not (out / "train.partial").exists()


def test_an_image_over_the_pixel_limit_is_skipped_and_listed_before_decoding(tmp_path, palette_file):
    """--limits.max_pixels: a 64x64 image against a limit of 40x40 is refused from its header (what keeps a 20,000 x
    20,000 scan from taking a read task's memory), listed with its size; everything else is tokenized."""
    path = tmp_path / "train-00000.parquet"
    t = pq.read_table(SAMPLE).slice(0, 30)
    big = fixtures.encode(fixtures.rand_images(1, 64)[0])
    pq.write_table(pa.table({"key": t["key"].to_pylist() + ["big/64x64.png"],
                             "image": pa.array(t["image"].to_pylist() + [big], pa.binary()),
                             "label": t["label"].to_pylist() + [0]}), path)
    summary = quantize.run(quantize_cfg(palette_file[0], path, tmp_path / "out", max_pixels=1600))
    assert summary["images_read"] == 31 and summary["skipped"] == 1 and summary["tokenized"] == 30
    report = (tmp_path / "out" / "tok" / "train.errors.tsv").read_text().splitlines()
    assert report[1] == "big/64x64.png\timage of 64x64 = 4,096 pixels is over the limit of 1,600 (--limits.max_pixels)"
    with pytest.raises(ValueError, match="limits.max_pixels must be in"):
        IngestLimits(max_pixels=0)


def test_error_rate_over_the_limit_stops_the_run(tmp_path, palette_file):
    bad_shard(tmp_path / "train-00000.parquet")
    cfg = quantize_cfg(palette_file[0], tmp_path / "train-00000.parquet", tmp_path / "out", max_error_rate=0.01)
    with pytest.raises(ingest.ErrorRateExceeded, match=r"over the limit.*keys and reasons: .*train\.errors\.tsv"):
        quantize.run(cfg)
    out = tmp_path / "out" / "tok"
    assert not (out / "train").exists()  # no half-written split
    assert len((out / "train.errors.tsv").read_text().splitlines()) >= 2  # the report is still written
    from igpt.track.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(tmp_path / "out"))
    runs = client.search_runs([client.get_experiment_by_name("igpt").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def test_same_seed_gives_byte_identical_shards_locally_and_on_object_storage(tmp_path, palette_file, s3):
    """The same job twice, once into a folder and once into a bucket on the S3 test server: the same shards byte
    for byte, the split complete (its summary there, no partial folder left) in both."""
    digests = []
    for root in (tmp_path / "o0", f"{s3}/{tmp_path.name}/o1"):
        cfg = quantize_cfg(palette_file[0], SAMPLE, root,
                           transform=TransformConfig(recipe="cifar", augment=True, seed=3))
        cfg.data.key_prefix = "test/"
        cfg.tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        summary = quantize.run(cfg)
        out = Loc(root) / "tok"
        files = (out / "train" / "pass-000").children()
        assert len(files) == -(-200 // 17) == summary["shards"]
        assert json.loads((out / "train.summary.json").read_text())["tokenized"] == 200
        assert not (out / "train.partial").exists()
        digests.append([hashlib.sha256(f.read_bytes()).hexdigest() for f in files])
    assert digests[0] == digests[1]


def test_training_stream_changes_crops_every_epoch(palette_file, ray_local):
    palette = Palette.load(palette_file[0])
    lut = ray.put(palette.lut)
    spec = DatasetSpec(str(SAMPLE), "parquet", key_prefix="train/", max_images=64)
    tokens = {}
    for epoch in (0, 0, 1):
        log = ingest.ErrorLog.remote()
        t = ingest.TransformSpec("cifar", 32, True, seed=0, epoch=epoch)
        rows = ingest.tokenize(sources.read(spec), lut, t, log).take_all()
        tokens.setdefault(epoch, []).append({r["key"]: np.asarray(r["tokens"]) for r in rows})
        assert ray.get(log.stats.remote()) == (64, 0)
    a, b = tokens[0]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # replayable
    c = tokens[1][0]
    changed = sum(not np.array_equal(a[k], c[k]) for k in a)
    assert changed > 48  # new crops/flips for (nearly) every image in a new epoch


def test_one_dataset_of_two_epochs_augments_each_by_its_own_epoch(palette_file, ray_local):
    lut = ray.put(Palette.load(palette_file[0]).lut)
    spec = DatasetSpec(str(SAMPLE), "parquet", key_prefix="train/", max_images=64)

    def run(t, **read_kw):
        log = ingest.ErrorLog.remote()
        rows = ingest.tokenize(sources.read(spec, **read_kw), lut, t, log, carry=("epoch",)).take_all()
        return rows, ray.get(log.stats.remote())

    rows, stats = run(ingest.TransformSpec("cifar", 32, True, seed=0, epoch=0), epochs=2, shuffle_seed=5)
    assert stats == (128, 0)
    by_epoch = {e: {r["key"]: np.asarray(r["tokens"]) for r in rows if r["epoch"] == e} for e in (0, 1)}
    assert by_epoch[0].keys() == by_epoch[1].keys() and len(by_epoch[0]) == 64
    changed = sum(not np.array_equal(by_epoch[0][k], by_epoch[1][k]) for k in by_epoch[0])
    assert changed > 48  # each epoch its own crops and flips
    for e in (0, 1):  # the same as a one-epoch dataset tokenized with TransformSpec(epoch=e)
        single, _ = run(ingest.TransformSpec("cifar", 32, True, seed=0, epoch=e))
        assert all(np.array_equal(by_epoch[e][r["key"]], np.asarray(r["tokens"])) for r in single)
        assert {r["epoch"] for r in single} == {0}  # carried as read: the pass, not the TransformSpec's offset
    # without carry the rows keep the columns the quantize job writes
    plain = ingest.tokenize(sources.read(spec), lut, ingest.TransformSpec("none", 32, False), ingest.ErrorLog.remote())
    assert plain.columns() == ["key", "label", "tokens"]


def test_a_stream_with_an_error_budget_stops_inside_ray_data_once_it_is_spent(tmp_path, palette_file, ray_local):
    """Pretraining and fine-tuning read their streams inside Ray Train workers, where no driver loop checks: the
    error log carries the budget and the batch that spends it raises, naming the counts; within the budget (or
    with none) the same stream is read whole, its bad records listed."""
    from igpt.config import IngestLimits

    bad_shard(tmp_path / "train-00000-of-00001.parquet")  # 3 bad of 46, in the middle
    lut = ray.put(Palette.load(palette_file[0]).lut)
    spec = DatasetSpec(str(tmp_path), "parquet", "train")
    t = ingest.TransformSpec("none", 32, False)
    log = ingest.ErrorLog.remote(IngestLimits(max_error_rate=0.01, min_records=10), "s3://b/run/errors.tsv")
    with pytest.raises(Exception, match=r"records \([\d.]+%\) could not be read, over the limit of 1.00% \(--limits"
                                        r"\.max_error_rate\); keys and reasons: s3://b/run/errors\.tsv"):
        ingest.tokenize(sources.read(spec), lut, t, log).take_all()
    # the budget is judged as records come in: at worst the 3 bad ones arrive in the first row group of 16
    for limits in (IngestLimits(max_error_rate=0.25, min_records=10), None):
        log = ingest.ErrorLog.remote(limits)
        assert len(ingest.tokenize(sources.read(spec), lut, t, log).take_all()) == 43
        assert ray.get(log.stats.remote()) == (46, 3)
