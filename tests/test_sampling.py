"""KV-cache decoding and sampling: the cache reproduces the full forward pass, cached and uncached decoding are the
same algorithm, and the picture / ``python -m igpt sample`` come out the right size.

Token-equality tests run the model in float64: there the cached and full forwards agree to ~1e-14, so equal
tokens test the algorithm, not float32 rounding luck at a near-tie."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igpt.config import ModelConfig
from igpt.data.palette import Palette
from igpt.model import IGPT
from igpt.model.sampling import _pick, complete, grid, picture, sample

RES = 8  # 64 tokens: every test decodes whole images in well under a second


def small(dtype=torch.float32, **kw) -> IGPT:
    torch.manual_seed(0)
    m = IGPT(ModelConfig(size="debug", resolution=RES, **kw))
    # the released init zeroes the output matrix (all logits equal: greedy would always pick colour 0 and every
    # comparison below would pass vacuously), so give it random weights
    torch.nn.init.normal_(m.head.weight, std=0.5)
    return m.to(dtype).eval()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cached_logits(m: IGPT, inp: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of AR inputs ``inp`` fed through one cache in pieces of the given lengths."""
    cache, out, s = m.new_cache(), [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(m(inp[:, s : s + n], cache=cache))
            s += n
    assert s == inp.shape[1] and cache.length == s
    return torch.cat(out, 1)


# a prefill (is_causal), a chunk after cached positions (explicit mask), then one token at a time (no mask)
CHUNKS = [5, 7] + [1] * (RES * RES - 12)


def test_kv_cache_logits_match_the_full_forward_at_every_position():
    x = torch.randint(0, 512, (3, RES * RES), generator=gen(1))
    m = small()
    with torch.no_grad():
        full = m(m.ar_inputs(x))
    cached = cached_logits(m, m.ar_inputs(x), CHUNKS)
    assert cached.shape == full.shape == (3, RES * RES, 512)
    # float32: logits reach ~17 here, where one ulp is 2e-6; the two paths differ by a few ulps (measured <= 1e-5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # float64: the same computation up to rounding, so any error in positions or masks would show far above this
    m64 = small(torch.float64)
    with torch.no_grad():
        full64 = m64(m64.ar_inputs(x))
    torch.testing.assert_close(cached_logits(m64, m64.ar_inputs(x), CHUNKS), full64, rtol=0, atol=1e-10)


def test_cache_leaves_the_plain_forward_unchanged_and_guards_its_use():
    m = small()
    x = torch.randint(0, 512, (2, RES * RES), generator=gen(2))
    with torch.no_grad():
        before = m(m.ar_inputs(x))
        cached_logits(m, m.ar_inputs(x), CHUNKS)  # a cached pass in between must not leave state in the model
        after = m(m.ar_inputs(x))
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    cache = m.new_cache()
    with torch.no_grad():
        m(m.ar_inputs(x)[:, :60], cache=cache)
        with pytest.raises(ValueError, match="exceeds the context"):
            m(x[:, :5], cache=cache)  # 60 + 5 > 64 positions
        with pytest.raises(ValueError, match="causal"):
            m(x[:, :1], causal=False, cache=cache)


def test_greedy_is_argmax_of_the_full_forward_with_and_without_cache():
    m = small(torch.float64)
    a = sample(m, 4, temperature=0)
    b = sample(m, 4, temperature=0, use_cache=False)
    assert a.shape == (4, RES * RES) and a.dtype == torch.long
    assert torch.equal(a, b)
    # and it is greedy decoding: each token is the argmax of the full forward on the tokens before it
    with torch.no_grad():
        assert torch.equal(m(m.ar_inputs(a)).argmax(-1), a)
    assert len(a.unique()) > 5  # random weights: not a constant image (which would make the checks above weak)


@pytest.mark.parametrize("top_k", [None, 20])
def test_sampling_with_the_same_generator_gives_the_same_tokens_with_and_without_cache(top_k):
    m = small(torch.float64)
    a = sample(m, 3, temperature=1.0, top_k=top_k, generator=gen(7))
    b = sample(m, 3, temperature=1.0, top_k=top_k, generator=gen(7), use_cache=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(m, 3, temperature=1.0, top_k=top_k, generator=gen(8)))  # the seed matters
    assert not torch.equal(a, sample(m, 3, temperature=0))  # a draw, not the argmax


def test_top_k_1_is_greedy():
    m = small(torch.float64)
    greedy = sample(m, 3, temperature=0)
    assert torch.equal(sample(m, 3, temperature=1.0, top_k=1, generator=gen(3)), greedy)
    assert not torch.equal(sample(m, 3, temperature=1.0, generator=gen(3)), greedy)  # without top-k it is not


def test_top_k_draws_only_among_the_k_largest_logits():
    logits = torch.randn(2000, 512, generator=gen(4))
    top = logits.topk(5, -1).indices
    picked = _pick(logits, 1.0, 5, gen(5))
    assert (top == picked[:, None]).any(1).all()
    picked_all = _pick(logits, 1.0, None, gen(5))
    assert not (top == picked_all[:, None]).any(1).all()  # without top-k some draws fall outside the top 5
    with pytest.raises(ValueError, match="temperature"):
        _pick(logits, -1.0, None, None)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prefix_is_kept_verbatim_and_continued(use_cache):
    m = small(torch.float64)
    prefix = torch.randint(0, 512, (2, 20), generator=gen(6))
    out = sample(m, 2, temperature=0, prefix=prefix, use_cache=use_cache)
    assert out.shape == (2, RES * RES)
    assert torch.equal(out[:, :20], prefix)
    with torch.no_grad():
        assert torch.equal(m(m.ar_inputs(out)).argmax(-1)[:, 20:], out[:, 20:])  # greedy after the prefix
    # complete() is sample() with the first `given` tokens of whole images as the prefix, dtype kept
    tokens = torch.cat([prefix, torch.randint(0, 512, (2, RES * RES - 20), generator=gen(9))], 1).to(torch.int32)
    done = complete(m, tokens, 20, generator=gen(1), use_cache=use_cache)
    assert done.dtype == torch.int32 and torch.equal(done[:, :20], tokens[:, :20])
    assert torch.equal(done.long(), sample(m, 2, generator=gen(1), prefix=prefix, use_cache=use_cache))
    assert not torch.equal(done[:, 20:], tokens[:, 20:])  # the rest is sampled, not copied
    assert torch.equal(sample(m, 2, temperature=0, prefix=tokens.long(), use_cache=use_cache), tokens.long())


def test_sampling_refuses_a_bert_model_and_a_bad_prefix():
    with pytest.raises(ValueError, match="autoregressive"):
        sample(small(objective="bert"), 1)
    with pytest.raises(ValueError, match="prefix"):
        sample(small(), 2, prefix=torch.zeros(3, 4, dtype=torch.long))


def random_palette() -> Palette:
    return Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))


def cell(pic: np.ndarray, row: int, col: int, pad: int = 2, scale: int = 4) -> np.ndarray:
    y, x = (pad + row * (RES + pad)) * scale, (pad + col * (RES + pad)) * scale
    return pic[y : y + RES * scale, x : x + RES * scale]


def test_picture_rows_are_original_then_completions_then_samples():
    m, pal = small(), random_palette()
    images = torch.randint(0, 512, (2, RES * RES), generator=gen(10))
    pic = picture(m, pal, images, n=5, completions=3, generator=gen(0))
    # 2 completion rows of 1 + 3 cells, then 5 samples in rows of 4: 4 rows x 4 columns of 8x8 cells, padded 2,
    # upscaled 4x
    assert pic.shape == (4 * (4 * (RES + 2) + 2), 4 * (4 * (RES + 2) + 2), 3) and pic.dtype == np.uint8
    up = lambda a: a.repeat(4, 0).repeat(4, 1)  # noqa: E731
    half = RES // 2 * 4
    for i in range(2):
        original = up(pal.dequantize(images[i].numpy().reshape(RES, RES)))
        assert np.array_equal(cell(pic, i, 0), original)
        for c in (1, 2, 3):
            assert np.array_equal(cell(pic, i, c)[:half], original[:half])  # the given top half
            assert not np.array_equal(cell(pic, i, c)[half:], original[half:])  # a sampled bottom half
        assert not np.array_equal(cell(pic, i, 1), cell(pic, i, 2))  # separate draws, not one repeated
    assert (cell(pic, 3, 0) != 255).any() and (cell(pic, 3, 1) == 255).all()  # 5th sample drawn, then white
    assert grid([[np.zeros((3, 5, 3), np.uint8)]] * 2, pad=1, scale=2).shape == (2 * (2 * 4 + 1), 2 * (1 * 6 + 1), 3)


def test_sample_command_writes_the_png_and_logs_it_to_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from igpt import cli
    from igpt.__main__ import main
    from igpt.train import checkpoints
    from tests.conftest import SAMPLE

    m, pal = small(), random_palette()
    weights = checkpoints.write_weights(tmp_path, m.state_dict(), cli.to_dict(m.cfg), pal.centres, step=3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "pics" / "samples.png"
    main(["sample", "--checkpoint", str(weights), "--n", "3", "--completions", "2", "--images", str(SAMPLE),
          "--key_prefix", "test/", "--out", str(out), "--tracking.tracking_uri", uri])
    msg = capsys.readouterr().out
    pic = np.asarray(Image.open(out))
    # 3 images x (original + 2 completions), then 3 samples in one row of 3: 4 x 3 cells
    assert pic.shape == (4 * (4 * (RES + 2) + 2), 4 * (3 * (RES + 2) + 2), 3)
    half = RES // 2 * 4
    for i in range(3):
        assert np.array_equal(cell(pic, i, 0)[:half], cell(pic, i, 1)[:half])
    assert not np.array_equal(cell(pic, 0, 0), cell(pic, 1, 0))  # different images picked
    run_id = msg.split("MLflow run ")[1].split()[0]
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/samples.png"]
    run = client.get_run(run_id)
    assert run.data.params["top_k"] == "0" and run.info.status == "FINISHED"


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset", "cifar10", "stl10"])
def test_sample_reads_images_of_any_dataset_format(tmp_path, capsys, fmt):
    """``--images`` takes every layout the jobs read; the images picked are the dataset's own, decoded as the
    jobs decode them."""
    from PIL import Image

    from igpt import cli
    from igpt.__main__ import main
    from igpt.commands import read_images
    from igpt.data.sources import DatasetSpec
    from igpt.data.transforms import apply
    from igpt.train import checkpoints
    from tests import fixtures

    root = tmp_path / fmt
    truth = getattr(fixtures, fmt if fmt != "cifar10" else "cifar")(root)
    split = {"imagefolder": "val", "webdataset": "train", "cifar10": "test", "stl10": "train"}[fmt]
    labels = str(root / "LOC_val_solution.csv") if fmt == "imagefolder" else ""
    spec = DatasetSpec(str(root), fmt, split, labels_file=labels)
    # webdataset: the third pick is the shard member without an image (fixtures), skipped with a note
    px = read_images(spec, 3 if fmt == "webdataset" else 2, RES, "none")
    known = [apply(img, "none", RES, train=False) for img, _ in truth.values()]
    found = [next((i for i, k in enumerate(known) if np.array_equal(p, k)), None) for p in px]
    assert px.shape == (2, RES, RES, 3) and None not in found and found[0] != found[1], found
    m, pal = small(), random_palette()
    weights = checkpoints.write_weights(tmp_path, m.state_dict(), cli.to_dict(m.cfg), pal.centres, step=3)
    out = tmp_path / "s.png"
    n = 3 if fmt == "webdataset" else 2
    main(["sample", "--checkpoint", str(weights), "--n", str(n), "--completions", "1", "--images", str(root),
          "--images_format", fmt, "--images_split", split, "--labels_file", labels, "--recipe", "none",
          "--out", str(out)])
    assert "2 images x 1 completions" in capsys.readouterr().out
    rows = 2 + -(-n // 2)  # 2 images, then the n samples in rows as wide as an image's row (original + 1)
    assert np.asarray(Image.open(out)).shape == (4 * (rows * (RES + 2) + 2), 4 * (2 * (RES + 2) + 2), 3)
