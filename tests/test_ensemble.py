"""BERT evaluation masks and modal voting."""

import torch

from igpt.eval.ensemble import N_MASKS, eval_masks, modal


def test_each_image_gets_five_distinct_masks_stable_by_key():
    keys = [f"test/{i}" for i in range(6)]
    m = eval_masks(keys, n_ctx=64, prob=0.15)
    assert m.shape == (N_MASKS, 6, 64) == (5, 6, 64)
    for b in range(6):
        assert len({m[k, b].numpy().tobytes() for k in range(5)}) == 5
    assert torch.equal(m, eval_masks(keys, 64, 0.15))  # the same masks in every job
    assert not torch.equal(m[:, 0], m[:, 1])  # different images, different masks
    assert 0.08 < m.float().mean() < 0.22
    # tiny contexts force redraws, still distinct
    tiny = eval_masks(["a"], n_ctx=4, prob=0.5)
    assert len({tiny[k, 0].numpy().tobytes() for k in range(5)}) == 5


def test_modal_vote_and_its_tie_break():
    preds = torch.tensor([[1, 2], [1, 0], [3, 0], [1, 2], [0, 3]])  # image 0: 1 wins 3 votes; image 1: 0 v 2 tie
    assert modal(preds).tolist() == [1, 0]  # tie -> smallest id without scores
    scores = torch.zeros(5, 2, 4)
    scores[:, 1, 2] = 5.0  # image 1: class 2 scored higher overall
    assert modal(preds, scores).tolist() == [1, 2]
