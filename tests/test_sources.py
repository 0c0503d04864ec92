"""Every reader, through a real local Ray runtime, on fixtures the tests write (and the real CIFAR-10 Parquet)."""

from dataclasses import replace

import numpy as np
import pytest

from igpt.data import sources
from igpt.data.images import decode_rgb
from igpt.data.sources import DatasetSpec, SpecError

from . import fixtures
from .conftest import SAMPLE, SHARED_CIFAR


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
    spec = DatasetSpec(str(tmp_path), "webdataset", "train")
    rows = read_all(spec)
    assert sources.check(spec).count == len(rows)  # the header scan ends where the reader does
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
    assert parts["rest"] | parts["holdout"] == \
           set(read_all(DatasetSpec(str(SAMPLE), key_prefix="train/", max_images=300)))
    s = DatasetSpec(str(SAMPLE), max_images=300, holdout=0.3, part="holdout")  # no prefix: exact cut in the reader
    assert sources.check(s).count == len(read_all(s)) < 150


# ------------------------------------------------------------------------------ exact counts, epochs, unit order
def format_cases(tmp_path, monkeypatch) -> dict[str, DatasetSpec]:
    """A small split of every format, each cut into several read units (smaller chunks than the defaults)."""
    monkeypatch.setattr(sources, "FOLDER_CHUNK", 1)
    monkeypatch.setattr(sources, "STL_CHUNK", 2)
    fixtures.imagefolder(tmp_path / "inet")
    fixtures.webdataset(tmp_path / "wds")
    fixtures.cifar(tmp_path / "c10", per_batch=20)
    fixtures.cifar(tmp_path / "c100", "cifar100", per_batch=30)
    fixtures.stl10(tmp_path / "stl", n=7)
    return {
        "parquet": DatasetSpec(str(SAMPLE), "parquet", key_prefix="train/"),
        "imagefolder": DatasetSpec(str(tmp_path / "inet"), "imagefolder", "train"),
        "imagefolder-flat": DatasetSpec(str(tmp_path / "inet"), "imagefolder", "val",
                                        labels_file=str(tmp_path / "inet" / "LOC_val_solution.csv")),
        "webdataset": DatasetSpec(str(tmp_path / "wds"), "webdataset", "train"),
        "cifar10": DatasetSpec(str(tmp_path / "c10"), "cifar10", "train"),
        "cifar10-archive": DatasetSpec(str(fixtures.targz(tmp_path / "c10", tmp_path / "c10.tgz")), "cifar10"),
        "cifar100-archive": DatasetSpec(str(fixtures.targz(tmp_path / "c100", tmp_path / "c100.tgz")), "cifar100"),
        "stl10": DatasetSpec(str(tmp_path / "stl"), "stl10", "train"),
    }


def ordered_keys(spec: DatasetSpec, **kw) -> list:
    ds = sources.read(spec, **kw)
    ds.context.execution_options.preserve_order = True
    return [(r["epoch"], r["key"], r["error"]) for r in ds.take_all()]


@pytest.mark.parametrize("case", ["parquet", "imagefolder", "imagefolder-flat", "webdataset", "cifar10",
                                  "cifar10-archive", "cifar100-archive", "stl10"])
def test_plan_count_is_what_the_reader_yields(tmp_path, monkeypatch, case, ray_local):
    spec = format_cases(tmp_path, monkeypatch)[case]
    plan = sources.check(spec)
    rows = read_all(spec)
    assert plan.count == len(rows) > 0  # records the reader marks with an error (webdataset k4) count too
    assert len(plan.units) > 1 or spec.format == "cifar100"  # (one batch file per split)
    cut = max(1, plan.count * 2 // 3)  # ends inside a unit
    parts = {}
    for part in ("rest", "holdout"):
        s = replace(spec, max_images=cut, holdout=0.3, part=part)
        parts[part] = set(read_all(s))
        assert sources.check(s).count == len(parts[part])
    assert len(parts["rest"]) + len(parts["holdout"]) == cut
    assert parts["rest"] | parts["holdout"] == {k for _, k, _ in ordered_keys(spec)[:cut]}  # the first, in file order


@pytest.mark.parametrize("case", ["parquet", "imagefolder", "imagefolder-flat", "webdataset", "cifar10",
                                  "cifar10-archive", "cifar100-archive", "stl10"])
def test_pick_spreads_a_few_records_of_any_format_over_the_split_without_ray(tmp_path, monkeypatch, case):
    spec = format_cases(tmp_path, monkeypatch)[case]
    plan = sources.check(spec)
    every = sources.pick(spec, 10**6).to_pylist()  # more than there are: every record, in file order
    keys = [r["key"] for r in every]
    assert len(keys) == len(set(keys)) == plan.count
    few = [r["key"] for r in sources.pick(spec, 3).to_pylist()]  # the first, the last, and one between
    assert len(few) == min(3, plan.count) and few[0] == keys[0] and few[-1] == keys[-1]
    assert few == sorted(few, key=keys.index)
    held = replace(spec, holdout=0.4, part="holdout")
    got = [r["key"] for r in sources.pick(held, 10**6).to_pylist()]
    assert got == [k for k, h in zip(keys, sources.held_out(keys, 0.4), strict=True) if h]
    assert got or plan.count < 5  # (the flat val folder has two images, both outside the 40%)
    assert set(r["key"] for r in sources.pick(held, 2).to_pylist()) <= set(got)


@pytest.mark.parametrize("root_blocks", [True, False], ids=["block-per-unit", "split-as-read"])
def test_epochs_stream_in_one_dataset_each_in_its_unit_order(monkeypatch, root_blocks, ray_local):
    if not root_blocks:
        monkeypatch.setattr(sources, "ROOT_BLOCKS_MAX", 0)
    spec = DatasetSpec(str(SAMPLE), "parquet", max_images=1100)  # 6 row groups, the last cut to 100 records
    plan = sources.check(spec)
    takes = [u.take for u in plan.units]
    assert takes == [200] * 5 + [100] and plan.count == 1100
    one = [k for _, k, _ in ordered_keys(spec)]
    units = [one[sum(takes[:i]):sum(takes[:i + 1])] for i in range(len(takes))]
    rows = ordered_keys(spec, plan=plan, epochs=3, shuffle_seed=1)
    assert len(rows) == 3 * plan.count
    orders = [sources.unit_order(len(takes), e, 1) for e in range(3)]
    assert len(set(orders)) == 3 and sorted(orders[0]) == list(range(6))  # a new order every epoch
    for e in range(3):
        got = [k for ep, k, _ in rows if ep == e]
        # units in the epoch's order, the records of each in the order drawn for the epoch
        assert got == [units[u][i] for u in orders[e] for i in sources.record_order(units[u], e, 1)]
        assert got[:200] != units[orders[e][0]]  # not file order
    assert sources.unit_order.__wrapped__(6, 2, 1) == orders[2]  # a pure function of (seed, epoch)
    assert sources.unit_order(6, 0, 2) != orders[0]
    assert [k for _, k, _ in ordered_keys(spec, plan=plan, epochs=2)] == one * 2  # no seed: file order


def test_setup_does_not_grow_with_epochs(ray_local):
    import time

    spec = DatasetSpec(str(SAMPLE), "parquet", key_prefix="train/")
    plan = sources.check(spec)
    times = {}
    for epochs in (1, 20_000):  # 100,000 units: one root block each would cost minutes before the first row
        t = time.perf_counter()
        batch = next(iter(sources.read(spec, plan, epochs=epochs, shuffle_seed=3).iter_batches(batch_size=None)))
        times[epochs] = time.perf_counter() - t
        assert len(batch["key"]) == 200
    assert times[20_000] < times[1] + 10, times


def _parquet(path, keys, images, labels, **kw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": keys, "image": images, "label": labels}), path, **kw)
    return path


def test_every_parquet_file_is_checked_and_a_bad_one_named_before_any_work(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = [fixtures.encode(a) for a in fixtures.rand_images(4)]
    good = _parquet(tmp_path / "train-0.parquet", [f"a{i}" for i in range(4)], imgs, [0, 1, 2, 3])
    spec = DatasetSpec(str(tmp_path), "parquet")
    assert sources.check(spec).count == 4
    # a second file without the image column: named, though the first file's schema is fine
    pq.write_table(pa.table({"key": ["b0"], "img": [imgs[0]], "label": [0]}), tmp_path / "train-1.parquet")
    with pytest.raises(SpecError, match=r"train-1\.parquet lacks column\(s\) \['image'\]"):
        sources.check(spec)
    # wrong types: image as text, label as text
    _parquet(tmp_path / "train-1.parquet", ["b0"], ["not bytes"], [0])
    with pytest.raises(SpecError, match=r"train-1\.parquet: column 'image' is string, expected binary"):
        sources.check(spec)
    _parquet(tmp_path / "train-1.parquet", ["b0"], [imgs[0]], ["cat"])
    with pytest.raises(SpecError, match=r"train-1\.parquet: column 'label' is string, expected an integer"):
        sources.check(spec)
    # random bytes instead of a Parquet file
    (tmp_path / "train-1.parquet").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(SpecError, match=r"train-1\.parquet is not a readable Parquet file"):
        sources.check(spec)
    # a zero-row file beside a good one adds nothing; alone it is a clear error, not Ray's "parallelism" one
    _parquet(tmp_path / "train-1.parquet", pa.array([], pa.string()), pa.array([], pa.binary()),
             pa.array([], pa.int64()))
    assert sources.check(spec).count == 4
    good.unlink()
    with pytest.raises(SpecError, match=r"split 'train' under .* yields no records \(1 file\(s\), none with records"):
        sources.check(spec)


def test_a_row_group_with_corrupt_pages_is_listed_record_by_record(tmp_path, ray_local):
    """Random bytes over one row group's image pages: that row group's records come out as errors naming the file
    and the row group (the tokenizer counts and lists them); the other row group reads as ever."""
    import pyarrow.parquet as pq

    imgs = [fixtures.encode(a) for a in fixtures.rand_images(6)]
    path = _parquet(tmp_path / "d.parquet", [f"k{i}" for i in range(6)], imgs, list(range(6)), row_group_size=3,
                    compression="none")
    col = pq.ParquetFile(path).metadata.row_group(0).column(1)
    assert col.path_in_schema == "image"
    data = bytearray(path.read_bytes())
    start = col.data_page_offset
    data[start:start + 64] = np.random.default_rng(1).bytes(64)
    path.write_bytes(bytes(data))
    rows = read_all(DatasetSpec(str(path), "parquet"))
    assert len(rows) == 6
    bad = {k for k, r in rows.items() if r["error"]}
    assert bad == {"k0", "k1", "k2"}, {k: r["error"] for k, r in rows.items()}
    assert all(f"{path}, row group 0 cannot be read" in rows[k]["error"] for k in bad)
    assert all(np.array_equal(pixels(rows[f"k{i}"]), fixtures.rand_images(6)[i]) for i in (3, 4, 5))
