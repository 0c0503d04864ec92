"""The per-worker training stream (igpt/data/stream.py): the deal of read slots, positions, and a resume that
reads nothing it already trained on, through a real local Ray runtime on the shipped CIFAR-10 sample."""

import numpy as np
import pytest

from igpt.config import TransformConfig
from igpt.data import ingest, sources, stream
from igpt.data.palette import Palette
from igpt.data.sources import DatasetSpec

from .conftest import SAMPLE


def test_the_deal_gives_every_slot_once_and_keeps_the_shares_within_one_piece():
    takes = (200, 200, 37, 200, 5, 120)  # unequal units, as Parquet row groups and the cut last chunk are
    for world, parts in ((1, 1), (2, 1), (3, 2), (8, 6)):
        shares = stream.deal(takes, parts, 5, 7, world)
        every = np.sort(np.concatenate(shares))
        assert np.array_equal(every, np.arange(len(takes) * parts * 5))  # every slot, once
        assert all(np.all(np.diff(s) > 0) for s in shares)  # each share in stream order
        sizes = [t * (p + 1) // parts - t * p // parts for t in takes for p in range(parts)]
        biggest = max(sizes)
        # the records of each share, after every prefix of the stream: never more than one piece apart
        for end in range(0, len(every) + 1, 7):
            loads = [sum(sizes[sources.piece_of(int(s), len(takes), parts, 7)[1] * parts +
                           sources.piece_of(int(s), len(takes), parts, 7)[2]] for s in share if s < end)
                     for share in shares]
            assert max(loads) - min(loads) <= biggest, (world, parts, end, loads)
    # a pure function of the plan, the seed and the worker count; another seed deals otherwise
    assert all(np.array_equal(a, b) for a, b in zip(stream.deal(takes, 1, 3, 7, 2), stream.deal(takes, 1, 3, 7, 2),
                                                     strict=True))
    assert not np.array_equal(stream.deal(takes, 1, 3, 7, 2)[0], stream.deal(takes, 1, 3, 8, 2)[0])
    # more epochs only append: a resubmission with more --steps keeps every position of the shorter stream
    short, long = stream.deal(takes, 1, 3, 7, 2), stream.deal(takes, 1, 9, 7, 2)
    assert all(np.array_equal(s, lg[:len(s)]) for s, lg in zip(short, long, strict=True))


def test_a_split_with_fewer_units_than_workers_is_cut_into_pieces():
    assert stream.parts_for(6, 1) == 1 and stream.parts_for(6, 2) == 2 and stream.parts_for(1, 8) == 32
    assert stream.parts_for(5000, 64) == 1  # ImageNet's 256-file chunks on 64 workers: whole units


@pytest.fixture(scope="module")
def train_stream(ray_local):
    import ray

    def make(world: int, epochs: int = 2, log=None):
        spec = DatasetSpec(str(SAMPLE), key_prefix="train/")
        plan = sources.check(spec)
        pal = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
        t = TransformConfig(augment=True)
        return stream.TrainStream(spec, ray.put(plan), tuple(u.take for u in plan.units), epochs, world,
                                  ray.put(pal.lut), ingest.TransformSpec(t.recipe, 16, True, 3, 0, t.draft),
                                  log or ingest.error_log())
    return make


def rows(ds) -> list[tuple]:
    return [(r["slot"], r["index"], tuple(r["tokens"])) for r in ds.take_all()]


def test_the_workers_shares_hold_each_epoch_once_in_an_order_drawn_per_epoch(train_stream):
    s = train_stream(2)
    shares = [rows(s.dataset(r)) for r in range(2)]
    pieces = len(s.takes) * s.parts
    by_epoch = [[], []]
    for share in shares:
        for slot, index, _ in share:
            by_epoch[slot // pieces].append((slot % pieces, index))
    for e in range(2):  # between them, the workers read every record of the split once per epoch
        assert len(by_epoch[e]) == len(set(by_epoch[e])) == 1000
    assert abs(len(shares[0]) - len(shares[1])) <= max(s.takes) // s.parts  # equal shares, within one piece
    # both epochs read the same records but in other orders: pieces and the records inside them
    first = [sources.piece_of(int(slot), len(s.takes), s.parts, 3) for slot in s.slots(0)]
    assert [p[1:] for p in first if p[0] == 0] != [p[1:] for p in first if p[0] == 1]


def test_a_resumed_worker_continues_exactly_and_reads_only_what_is_left(train_stream):
    import ray

    s = train_stream(2)
    full = list(s.batches(1, 8))
    k = len(full) * 3 // 4  # three quarters in: a resume at the start would read everything
    log = ingest.error_log()
    resumed = list(train_stream(2, log=log).batches(1, 8, after=full[k - 1]["position"]))
    assert len(resumed) == len(full) - k
    for a, b in zip(resumed, full[k:], strict=True):  # the same micro-batches, bit for bit
        assert np.array_equal(a["tokens"], b["tokens"]) and a["position"] == b["position"]
    read, _ = ray.get(log.stats.remote())
    left = 8 * (len(full) - k)  # what the resumed worker still trains on
    # it decoded only the records after its position (and the rest of the last, partial micro-batch's piece)
    assert left <= read < left + 8 + max(s.takes) // s.parts, (read, left)


def test_a_position_outside_the_workers_share_is_refused(train_stream):
    """A position from another worker's share (as one dealt for another worker count would be) never starts a
    stream somewhere else: the driver refuses such a resume first (tests/test_pretrain.py), this is the backstop."""
    s = train_stream(2)
    theirs = (int(s.slots(0)[3]), 5)
    with pytest.raises(ValueError, match="not in worker 1's share"):
        s.dataset(1, after=theirs)


def test_folder_chunks_mix_classes_in_an_order_independent_of_where_the_folder_lives(tmp_path, monkeypatch):
    from .fixtures import encode, rand_images

    imgs = rand_images(40, 8)
    for root in (tmp_path / "a", tmp_path / "elsewhere" / "b"):
        for i, img in enumerate(imgs):
            d = root / "train" / f"n{i // 10:02d}"  # 4 classes of 10 files, sorted by class on disk
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:03d}.png").write_bytes(encode(img))
    monkeypatch.setattr(sources, "FOLDER_CHUNK", 10)
    plans = [sources.check(DatasetSpec(str(tmp_path / r), "imagefolder")) for r in ("a", "elsewhere/b")]
    rel = [[f.split("/train/")[1] for f in p.files] for p in plans]
    assert rel[0] == rel[1]  # the same chunks wherever the dataset is
    classes_per_chunk = [len({f.split("/")[0] for f in rel[0][u.pos:u.pos + u.take]}) for u in plans[0].units]
    assert min(classes_per_chunk) >= 2, classes_per_chunk  # sorted order would give one class per chunk
