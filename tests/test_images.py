import io

import numpy as np
import pytest
from PIL import Image

from igpt.data.images import BadImage, decode_rgb, to_resolution


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_odd_modes_become_rgb():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    cases = {
        "L": encode(rgb.convert("L"), "PNG"),
        "CMYK": encode(rgb.convert("CMYK"), "JPEG"),
        "RGBA": encode(rgb.convert("RGBA"), "PNG"),
        "P": encode(rgb.convert("P"), "PNG"),
        "I;16": encode(Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)), "PNG"),
    }
    for mode, data in cases.items():
        img = decode_rgb(data)
        assert img.mode == "RGB" and img.size == (20, 20), mode
    grey = np.asarray(decode_rgb(cases["L"]))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])


def test_transparent_pixels_composite_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    img = decode_rgb(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.all(np.asarray(img) == 255)


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "zero bytes"), (b"hello, I am a text file\n", "cannot decode"), (None, "cannot decode")],
)
def test_bad_records_raise_bad_image_with_a_reason(data, reason):
    if data is None:  # a truncated JPEG
        data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
        data = data[: len(data) // 2]
    with pytest.raises(BadImage, match=reason):
        decode_rgb(data)


def test_to_resolution_box_filters():
    img = Image.fromarray(np.kron(np.arange(4, dtype=np.uint8).reshape(2, 2) * 60, np.ones((8, 8), np.uint8)))
    out = to_resolution(img.convert("RGB"), 2)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[..., 0].tolist() == [[0, 60], [120, 180]]


def test_a_decompression_bomb_is_a_bad_record_not_a_crash(monkeypatch):
    """PIL raises DecompressionBombError (not an OSError) past twice its pixel limit; lowered here so a small
    image trips it, as a 200-megapixel one would."""
    from .fixtures import encode, rand_images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_rgb(encode(rand_images(1, 64)[0]))
