import numpy as np
import pytest
import torch

from igpt.data.palette import LUT_SIZE, Palette, build_lut, nearest_centre


@pytest.fixture(scope="module")
def random_palette():
    rng = np.random.default_rng(0)
    return Palette(rng.uniform(-1, 1, (512, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def fitted_palette(cifar_images):
    return Palette.fit(cifar_images[:200].reshape(-1, 3), seed=0, max_iter=20)


def test_fit_gives_512_centres_in_unit_space(fitted_palette):
    c = fitted_palette.centres
    assert c.shape == (512, 3) and c.dtype == np.float32
    assert c.min() >= -1.0 and c.max() <= 1.0
    assert len(np.unique(c, axis=0)) == 512


def test_fit_is_seeded(cifar_images):
    px = cifar_images[:30].reshape(-1, 3)
    a = Palette.fit(px, seed=3, max_iter=5).centres
    b = Palette.fit(px, seed=3, max_iter=5).centres
    assert np.array_equal(a, b)


def test_fit_rejects_too_few_colours():
    with pytest.raises(ValueError, match="distinct colours"):
        Palette.fit(np.zeros((1000, 3), np.uint8))
    with pytest.raises(ValueError, match="zero pixels"):
        Palette.fit(np.zeros((0, 3), np.uint8))


@pytest.mark.parametrize("which", ["random_palette", "fitted_palette"])
def test_lut_equals_plain_argmin_on_random_colours(which, request):
    pal = request.getfixturevalue(which)
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (300_000, 3), dtype=np.uint8)
    assert np.array_equal(pal.quantize(px), nearest_centre(px, pal.centres))


def test_lut_equals_plain_argmin_on_real_images(fitted_palette, cifar_images):
    got = fitted_palette.quantize(cifar_images)
    assert got.shape == cifar_images.shape[:3] and got.dtype == np.uint16
    assert np.array_equal(got, nearest_centre(cifar_images, fitted_palette.centres))


def test_lut_breaks_ties_to_the_lowest_index():
    # two identical centres: every colour nearest to them must map to the first
    rng = np.random.default_rng(2)
    c = rng.uniform(-1, 1, (16, 3)).astype(np.float32)
    c[9] = c[4]
    lut = build_lut(c)
    assert np.count_nonzero(lut == 4) > 0 and np.count_nonzero(lut == 9) == 0
    px = rng.integers(0, 256, (50_000, 3), dtype=np.uint8)
    from igpt.data.palette import colour_keys

    # (a Palette refuses repeated centres, so the table is looked up directly)
    assert np.array_equal(lut[colour_keys(px)], nearest_centre(px, c))


def test_a_palette_out_of_range_or_with_repeats_is_refused_with_the_fix(tmp_path, fitted_palette):
    in_255 = (fitted_palette.centres + 1) * 127.5  # the classic mistake: RGB centres, not the [-1, 1] space
    np.save(tmp_path / "p255.npy", in_255)
    with pytest.raises(ValueError, match=r"\[-1, 1\].*0\.\.255 RGB: convert it with centres / 127.5 - 1"):
        Palette.load(tmp_path / "p255.npy")
    c = fitted_palette.centres.copy()
    c[7] = c[3]
    with pytest.raises(ValueError, match="1 repeated centre"):
        Palette(c)
    with pytest.raises(ValueError, match="shape"):
        Palette(c[:, :2])
    c[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Palette(c)


def test_tokens_equal_hf_image_processor(fitted_palette, cifar_images):
    from transformers import ImageGPTImageProcessor

    proc = ImageGPTImageProcessor(clusters=fitted_palette.centres, do_resize=False)
    imgs = cifar_images[:100]
    hf = np.asarray(proc(images=list(imgs), return_tensors="np")["input_ids"]).reshape(len(imgs), -1)
    ours = fitted_palette.quantize(imgs).reshape(len(imgs), -1)
    assert np.array_equal(ours, hf)


def test_dequantize_returns_centre_colours(fitted_palette, cifar_images):
    tok = fitted_palette.quantize(cifar_images[:10])
    rgb = fitted_palette.dequantize(tok)
    assert rgb.shape == cifar_images[:10].shape and rgb.dtype == np.uint8
    # re-quantizing a centre colour gives back its token almost always (rounding to 8 bits can move a few)
    assert (fitted_palette.quantize(rgb) == tok).mean() > 0.95
    # and it is close to the image: mean abs error well under the 8-bit range
    assert np.abs(rgb.astype(int) - cifar_images[:10].astype(int)).mean() < 12
    with pytest.raises(ValueError, match="out of range"):
        fitted_palette.dequantize(np.array([512]))


def test_save_load_is_the_hf_format_and_caches_the_lut(fitted_palette, tmp_path):
    path = fitted_palette.save(tmp_path / "palette.npy")
    raw = np.load(path)
    assert raw.dtype == np.float32 and raw.shape == (512, 3)  # what ImageGPTImageProcessor(clusters=) takes
    lut_file = fitted_palette.lut_path(path)
    assert lut_file.exists() and np.load(lut_file).shape == (LUT_SIZE,)
    loaded = Palette.load(path)
    assert loaded._lut is not None and loaded.lut_seconds is None  # table read from the cache, not rebuilt
    assert np.array_equal(loaded.lut, fitted_palette.lut)
    # a palette edited on disk does not pick up the old table: the cache is named by the centres' hash
    np.save(path, raw[::-1].copy())
    assert Palette.load(path)._lut is None


def test_bad_palette_files_and_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        Palette.load(tmp_path / "none.npy")
    with pytest.raises(ValueError, match="shape"):
        Palette(np.zeros((512, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        Palette(np.full((512, 3), np.nan, np.float32))
    pal = Palette(np.random.default_rng(0).uniform(-1, 1, (8, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        pal.quantize(np.zeros((4, 3), np.float32))


@pytest.mark.slow
def test_lut_equals_brute_force_on_all_2_24_colours(fitted_palette):
    """Exhaustive: every 24-bit colour against all 512 centres.

    Distances come from one float64 matmul (|c|^2 - 2 x.c; |x|^2 is the same for every centre); where the
    best two are within 1e-9 of each other, far above the matmul's rounding, the colour is decided again
    with the elementwise formula the LUT's own tie-breaking follows. ~45 s instead of ~300 s elementwise.
    """
    c = torch.as_tensor(fitted_palette.centres, dtype=torch.float64)
    cn = (c * c).sum(1)
    lut = fitted_palette.lut
    allc = torch.arange(LUT_SIZE)
    for s in range(0, LUT_SIZE, 1 << 18):
        k = allc[s : s + (1 << 18)]
        px = torch.stack([(k >> 16) & 255, (k >> 8) & 255, k & 255], 1).double() / 127.5 - 1
        two = torch.addmm(cn, px, c.T, alpha=-2).topk(2, dim=1, largest=False)
        ref = two.indices[:, 0].clone()
        close = (two.values[:, 1] - two.values[:, 0]) < 1e-9
        if close.any():
            d0, d1, d2 = (px[close][:, None, i] - c[None, :, i] for i in range(3))
            ref[close] = ((d0 * d0 + d1 * d1) + d2 * d2).argmin(1)
        assert np.array_equal(lut[s : s + (1 << 18)], ref.numpy()), s
