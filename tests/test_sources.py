"""Every reader, through a real local Ray runtime, on fixtures the tests write (and the real CIFAR-10 Parquet)."""

import numpy as np
import pytest

from igpt import sources
from igpt.images import decode_rgb
from igpt.sources import DatasetSpec, SpecError

from . import fixtures
from .conftest import SHARED_CIFAR, SAMPLE


def read_all(spec: DatasetSpec) -> dict:
    return {r["key"]: r for r in sources.read(spec).take_all()}


def pixels(row) -> np.ndarray:
    if row["raw_size"]:
        s = row["raw_size"]
        return np.frombuffer(row["image"], np.uint8).reshape(s, s, 3)
    return np.asarray(decode_rgb(row["image"]))


def assert_matches(rows: dict, truth: dict) -> None:
    assert set(rows) == set(truth)
    for key, (img, label) in truth.items():
        assert rows[key]["label"] == label, key
        assert rows[key]["error"] == "", key
        assert np.array_equal(pixels(rows[key]), img), key


def test_imagefolder_train_and_flat_val_with_labels(tmp_path, ray_local):
    truth = fixtures.imagefolder(tmp_path)
    train = read_all(DatasetSpec(str(tmp_path), "imagefolder", "train"))
    assert_matches(train, {k: v for k, v in truth.items() if k.startswith("train/")})
    val = read_all(DatasetSpec(str(tmp_path), "imagefolder", "val", labels_file=str(tmp_path / "LOC_val_solution.csv")))
    assert_matches(val, {k: v for k, v in truth.items() if k.startswith("val/")})


def test_webdataset_shards(tmp_path, ray_local):
    truth = fixtures.webdataset(tmp_path)
    rows = read_all(DatasetSpec(str(tmp_path), "webdataset", "train"))
    bad = rows.pop("train-001/s/k4")
    assert "no image member" in bad["error"]
    assert_matches(rows, truth)


def test_truncated_webdataset_shard_keeps_what_came_before(tmp_path, ray_local):
    fixtures.webdataset(tmp_path)
    shard = tmp_path / "train-000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 3 // 4])  # cut inside the second member's image
    rows = read_all(DatasetSpec(str(tmp_path), "webdataset", "train"))
    assert rows["train-000/s/k1"]["error"] == ""  # the first record survives
    errors = {k: r["error"] for k, r in rows.items() if r["error"]}
    assert any("unreadable" in e or "no image" in e for e in errors.values()), errors


@pytest.mark.parametrize("fmt", ["cifar10", "cifar100"])
def test_cifar_pickles_folder_and_archive(tmp_path, fmt, ray_local):
    folder = tmp_path / ("cifar-10-batches-py" if fmt == "cifar10" else "cifar-100-python")
    truth = fixtures.cifar(folder, fmt)
    for path in (folder, fixtures.targz(folder, tmp_path / "archive.tar.gz")):
        for split in ("train", "test"):
            rows = read_all(DatasetSpec(str(path), fmt, split))
            want = {k: v for k, v in truth.items() if (k.startswith("test") == (split == "test"))}
            assert_matches(rows, want)


def test_stl10_binary(tmp_path, ray_local):
    truth = fixtures.stl10(tmp_path / "stl10_binary")
    for split in ("train", "unlabeled"):
        rows = read_all(DatasetSpec(str(tmp_path / "stl10_binary"), "stl10", split))
        assert_matches(rows, {k: v for k, v in truth.items() if k.startswith(split)})


def test_real_cifar10_parquet(ray_local):
    path = SHARED_CIFAR if (SHARED_CIFAR / "test-00000-of-00001.parquet").exists() else SAMPLE
    spec = DatasetSpec(str(path), "parquet", "test", max_images=300)
    if path == SAMPLE:
        spec.key_prefix = "test/"
    rows = read_all(spec)
    assert len(rows) == min(300, sources.check(spec).count)
    for key, row in list(rows.items())[:50]:
        assert key.startswith("test/") and 0 <= row["label"] <= 9 and row["error"] == ""
        assert pixels(row).shape == (32, 32, 3)


def test_bad_specs_fail_before_any_work(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        sources.check(DatasetSpec(str(tmp_path / "nope"), "parquet"))
    with pytest.raises(SpecError, match="unknown dataset format"):
        sources.check(DatasetSpec(str(tmp_path), "tfrecords"))
    fixtures.imagefolder(tmp_path / "inet")
    with pytest.raises(SpecError, match="no split folder 'test'"):
        sources.check(DatasetSpec(str(tmp_path / "inet"), "imagefolder", "test"))
    with pytest.raises(SpecError, match="labels_file"):
        sources.check(DatasetSpec(str(tmp_path / "inet"), "imagefolder", "val"))
    fixtures.cifar(tmp_path / "c10")
    (tmp_path / "c10" / "data_batch_3").unlink()
    with pytest.raises(SpecError, match="data_batch_3"):
        sources.check(DatasetSpec(str(tmp_path / "c10"), "cifar10", "train"))
    with pytest.raises(SpecError, match="splits train and test"):
        sources.check(DatasetSpec(str(tmp_path / "c10"), "cifar10", "val"))
    with pytest.raises(SpecError, match="lacks column"):
        sources.check(DatasetSpec(str(SAMPLE), "parquet", image_column="img"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no parquet files"):
        sources.check(DatasetSpec(str(tmp_path / "empty"), "parquet"))


def test_holdout_parts_are_disjoint_stable_and_counted_up_front(tmp_path, ray_local):
    spec = dict(path=str(SAMPLE), key_prefix="train/")
    whole = set(read_all(DatasetSpec(**spec)))
    parts = {}
    for part in ("rest", "holdout"):
        s = DatasetSpec(**spec, holdout=0.2, part=part)
        parts[part] = set(read_all(s))
        assert sources.check(s).count == len(parts[part])  # the step arithmetic of a pretrain run relies on it
    assert parts["rest"].isdisjoint(parts["holdout"]) and parts["rest"] | parts["holdout"] == whole
    assert 0.15 < len(parts["holdout"]) / len(whole) < 0.25
    assert set(read_all(DatasetSpec(**spec, holdout=0.2, part="holdout"))) == parts["holdout"]  # the same keys again
    # other readers filter the same way, by key
    truth = fixtures.cifar(tmp_path, per_batch=20)
    held = set(read_all(DatasetSpec(str(tmp_path), "cifar10", "train", holdout=0.5, part="holdout")))
    rest = set(read_all(DatasetSpec(str(tmp_path), "cifar10", "train", holdout=0.5, part="rest")))
    train_keys = {k for k in truth if not k.startswith("test")}
    assert held and rest and held.isdisjoint(rest) and held | rest == train_keys
    with pytest.raises(ValueError, match="needs holdout"):
        DatasetSpec(str(SAMPLE), part="holdout")


def test_max_images_applies_before_the_holdout_split(ray_local):
    parts = {}
    for part in ("rest", "holdout"):
        s = DatasetSpec(str(SAMPLE), key_prefix="train/", max_images=300, holdout=0.3, part=part)
        parts[part] = set(read_all(s))
        assert sources.check(s).count == len(parts[part])
    assert parts["rest"] | parts["holdout"] == set(read_all(DatasetSpec(str(SAMPLE), key_prefix="train/", max_images=300)))
    s = DatasetSpec(str(SAMPLE), max_images=300, holdout=0.3, part="holdout")  # no prefix: exact cut in the reader
    assert sources.check(s).count == len(read_all(s)) < 150
