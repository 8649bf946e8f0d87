"""Block-map prediction: pooling, smooth-K scores, the critical / marginal / negligible counts and the lists."""

import math

import pytest
import torch

from sla_dist.kernels.block_map import (
    CRITICAL,
    MARGINAL,
    NEGLIGIBLE,
    block_counts,
    block_scores,
    block_sums,
    critical_lists,
    predict_block_map,
    rows_per_block,
)


def test_block_sums_cover_valid_rows_and_pad_with_zeros():
    x = torch.randn(2, 3, 70, 8)
    sums = block_sums(x, 64, n_blocks=4)
    assert sums.dtype == torch.float64 and sums.shape == (2, 3, 4, 8)
    torch.testing.assert_close(sums[:, :, 0], x[:, :, :64].double().sum(2))
    torch.testing.assert_close(sums[:, :, 1], x[:, :, 64:].double().sum(2))  # 6 rows, not 64
    assert (sums[:, :, 2:] == 0).all()
    assert rows_per_block(70, 64, 4, x.device).flatten().tolist() == [64, 6, 0, 0]


def test_scores_use_smooth_k():
    q, k = torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    # Adding the same vector to every key changes no ranking: smooth-K removes it.
    shifted = block_scores(q, k + 5.0 * torch.randn(1, 2, 1, 16), 64, 64)
    torch.testing.assert_close(shifted, block_scores(q, k, 64, 64), atol=1e-4, rtol=1e-4)
    qbar = torch.stack([q[:, :, i : i + 64].mean(2) for i in range(0, 200, 64)], 2)
    kc = k - k.mean(2, keepdim=True)
    kbar = torch.stack([kc[:, :, i : i + 64].mean(2) for i in range(0, 200, 64)], 2)
    torch.testing.assert_close(block_scores(q, k, 64, 64), qbar @ kbar.transpose(-1, -2) / 4.0)


@pytest.mark.parametrize(
    "nk, topk, negligible, expected",
    [(512, 0.05, 0.10, (25, 51)), (2, 0.05, 0.1, (1, 0)), (16, 1.0, 0.0, (16, 0)), (10, 0.3, 0.7, (3, 7)),
     (7, 0.0, 1.0, (1, 6))],
)
def test_block_counts(nk, topk, negligible, expected):
    assert block_counts(nk, topk, negligible) == expected


@pytest.mark.parametrize("topk, negligible", [(-0.1, 0.0), (1.5, 0.0), (0.5, -1.0), (0.6, 0.5)])
def test_bad_fractions_name_the_values(topk, negligible):
    with pytest.raises(ValueError, match="topk|negligible"):
        block_counts(10, topk, negligible)


@pytest.mark.parametrize("L, block_q", [(1000, 64), (4113, 128), (65, 64)])
def test_classification_ranks_scores(L, block_q):
    q, k = torch.randn(2, 3, L, 32), torch.randn(2, 3, L, 32)
    bm = predict_block_map(q, k, topk=0.1, negligible=0.2, block_q=block_q, block_k=64)
    nq, nk = math.ceil(L / block_q), math.ceil(L / 64)
    assert bm.block_class.shape == (2, 3, nq, nk)
    n_c, n_n = block_counts(nk, 0.1, 0.2)
    cls = bm.block_class
    assert ((cls == CRITICAL).sum(-1) == n_c).all() and ((cls == NEGLIGIBLE).sum(-1) == n_n).all()
    scores = block_scores(q, k, block_q, 64)
    inf = torch.tensor(float("inf"))
    lowest_critical = torch.where(cls == CRITICAL, scores, inf).amin(-1)
    highest_other = torch.where(cls != CRITICAL, scores, -inf).amax(-1)
    assert (lowest_critical >= highest_other).all()
    if n_n:
        highest_negligible = torch.where(cls == NEGLIGIBLE, scores, -inf).amax(-1)
        lowest_marginal = torch.where(cls == MARGINAL, scores, inf).amin(-1)
        assert (highest_negligible <= lowest_marginal).all()


def test_lists_are_sorted_and_transposed_consistently():
    q, k = torch.randn(1, 2, 900, 32), torch.randn(1, 2, 900, 32)
    bm = predict_block_map(q, k, topk=0.2, negligible=0.1, block_q=128, block_k=64)
    critical = bm.block_class == CRITICAL
    for b, h, i in [(0, 0, 0), (0, 1, 3), (0, 1, 6)]:
        n = int(bm.kv_num_blocks[b, h, i])
        assert bm.kv_indices[b, h, i, :n].tolist() == critical[b, h, i].nonzero().flatten().tolist()
    q_num, q_idx = bm.transposed()
    for b, h, j in [(0, 0, 0), (0, 1, 5), (0, 0, 14)]:
        n = int(q_num[b, h, j])
        assert q_idx[b, h, j, :n].tolist() == critical[b, h, :, j].nonzero().flatten().tolist()


def test_ties_break_towards_lower_index():
    cls_counts, order = critical_lists(torch.tensor([[CRITICAL, MARGINAL, CRITICAL, NEGLIGIBLE]], dtype=torch.int8))
    assert cls_counts.tolist() == [2] and order[0, :2].tolist() == [0, 2]
    q = torch.ones(1, 1, 256, 8)
    bm = predict_block_map(q, q.clone(), topk=0.5, negligible=0.0)  # all scores equal
    assert bm.kv_indices[0, 0, 0].tolist() == [0, 1]


def test_cross_lengths():
    q, k = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 700, 32)
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)
    assert bm.block_class.shape == (1, 2, 5, 11) and (bm.q_len, bm.kv_len) == (300, 700)
    assert bm.token_mask(CRITICAL).shape == (1, 2, 300, 700)
