import io

import numpy as np
import pytest
from PIL import Image

from igpt.data import transforms
from igpt.data.transforms import _reflect_index, apply, record_rng


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def real_photo(name: str = "china.jpg") -> bytes:
    """A real photograph (scikit-learn's 640x427 samples) re-encoded as an ImageNet-like 500x375 JPEG."""
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(load_sample_image(name)).resize((500, 375), Image.LANCZOS)
    return jpeg(np.asarray(img))


@pytest.fixture(scope="module")
def photo() -> bytes:
    return real_photo()


def test_reflect_index_equals_numpy_reflect_pad():
    for n in (1, 2, 5, 32, 96):
        ref = np.pad(np.arange(n), 4, mode="reflect") if n > 1 else np.zeros(n + 8, int)
        assert np.array_equal(_reflect_index(n, 4), ref), n


def test_cifar_train_is_pad_crop_flip_and_replays_under_a_seed(cifar_images):
    img = cifar_images[0]
    outs = {}
    for epoch in range(12):
        a = apply(img, "cifar", 32, True, seed=7, epoch=epoch, key="k")
        b = apply(img, "cifar", 32, True, seed=7, epoch=epoch, key="k")
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)  # same seed, epoch, key: same pixels
        outs[epoch] = a
    distinct = {o.tobytes() for o in outs.values()}
    assert len(distinct) >= 8  # crops and flips change across epochs
    # every output is a window of the reflect-padded image, possibly flipped
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    windows = {padded[y : y + 32, x : x + 32].tobytes() for y in range(9) for x in range(9)}
    windows |= {padded[y : y + 32, x : x + 32][:, ::-1].tobytes() for y in range(9) for x in range(9)}
    assert distinct <= windows
    flips = sum(o.tobytes() in {padded[y : y + 32, x : x + 32][:, ::-1].tobytes() for y in range(9)
                                for x in range(9)} for o in outs.values())
    assert 0 < flips < 12
    assert np.array_equal(apply(img, "cifar", 32, False), img)  # eval: none


def test_different_keys_and_seeds_draw_differently():
    a = [record_rng(0, 0, f"k{i}").random() for i in range(200)]
    assert len(set(a)) == 200 and 0.4 < np.mean(a) < 0.6
    assert record_rng(0, 0, "k").random() != record_rng(1, 0, "k").random()
    assert record_rng(0, 0, "k").random() != record_rng(0, 0, "k", stream=1).random()


def test_imagenet_train_and_eval_shapes_and_determinism(photo):
    for ir in (32, 48, 64):
        e1 = apply(photo, "imagenet", ir, False)
        assert e1.shape == (ir, ir, 3) and e1.dtype == np.uint8
        assert np.array_equal(e1, apply(photo, "imagenet", ir, False))
        t1 = apply(photo, "imagenet", ir, True, seed=1, epoch=0, key="x")
        assert np.array_equal(t1, apply(photo, "imagenet", ir, True, seed=1, epoch=0, key="x"))
        assert not np.array_equal(t1, apply(photo, "imagenet", ir, True, seed=1, epoch=1, key="x"))


def test_imagenet_crop_geometry():
    rng = record_rng(0, 0, "g")
    for _ in range(2):
        left, top, right, bottom = transforms._imagenet_box(500, 375, True, rng)
        side = right - left
        assert bottom - top == pytest.approx(side)
        assert 224 * 375 / 384 - 1e-9 <= side <= 224 * 375 / 256 + 1e-9  # shorter side resized into [256, 384]
        assert left >= 0 and top >= 0 and right <= 500 and bottom <= 375
    assert transforms._imagenet_box(500, 375, False, None) == (62.5, 0.0, 437.5, 375.0)  # centre square


def test_eval_is_the_box_average_of_the_centre_square():
    # a 2-colour image whose centre square is split half/half: the box average is exact
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 200
    out = apply(jpeg(arr, 100), "imagenet", 2, False, draft=False)
    assert abs(int(out[0, 0, 0]) - 200) <= 2 and int(out[0, 1, 0]) <= 2


def test_images_smaller_than_the_crop_are_handled(photo):
    tiny = jpeg(np.random.default_rng(0).integers(0, 256, (20, 20, 3), np.uint8))
    assert apply(tiny, "imagenet", 32, True, key="t").shape == (32, 32, 3)
    assert apply(tiny, "imagenet", 64, False).shape == (64, 64, 3)
    assert apply(tiny, "cifar", 32, True, key="t").shape == (32, 32, 3)
    assert apply(np.zeros((3, 3, 3), np.uint8), "cifar", 32, True, key="t").shape == (32, 32, 3)


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_reduced_scale_decoding_stays_within_tolerance(name):
    """Draft decoding against full decoding, same crops: mean abs difference <= 1.5 of 255 levels (stated in
    igpt/data/transforms.py), and it does reduce the decode at IR 32."""
    photo = real_photo(name)
    for ir in (32, 64):
        for train in (False, True):
            diffs = [np.abs(apply(photo, "imagenet", ir, train, key=f"d{i}", draft=True).astype(int)
                            - apply(photo, "imagenet", ir, train, key=f"d{i}", draft=False).astype(int)).mean()
                     for i in range(5)]
            assert np.mean(diffs) <= 1.5, (ir, train, diffs)
    img = Image.open(io.BytesIO(photo))
    img.draft("RGB", (500 // 2, 375 // 2))
    assert img.size == (250, 188)  # Pillow does decode at 1/2 scale here
