"""Block-map prediction: pooling, smooth-K scores, the critical / marginal / negligible counts and the lists."""

import dataclasses
import math

import pytest
import torch

from sla_dist.kernels.block_map import (
    CRITICAL,
    MARGINAL,
    NEGLIGIBLE,
    BlockMap,
    block_counts,
    block_scores,
    block_sums,
    build_block_map,
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


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=0), "block_q=0 is not supported"),
    (dict(block_q=100), "block_q=100 is not supported"),
    (dict(block_q=64.0), "block_q=64.0 is not supported"),
    (dict(block_k=128), "block_k=128 is not supported"),
    (dict(block_k=True), "block_k=True is not supported"),
])
def test_prediction_takes_only_kernel_block_sizes(kwargs, match):
    q = torch.randn(1, 1, 130, 32)
    with pytest.raises(ValueError, match=match):
        predict_block_map(q, q, topk=0.5, negligible=0.0, **kwargs)


def _hand_built(**changes) -> BlockMap:
    """A valid map of 130 queries and keys in blocks of 64 (3 x 3), each query block's critical blocks listed in
    descending order (any order is valid), with ``changes`` applied."""
    block_class = torch.tensor([[[[CRITICAL, MARGINAL, CRITICAL],
                                  [NEGLIGIBLE, CRITICAL, MARGINAL],
                                  [CRITICAL, CRITICAL, CRITICAL]]]], dtype=torch.int8)
    fields = dict(block_class=block_class,
                  kv_num_blocks=torch.tensor([[[2, 1, 3]]], dtype=torch.int32),
                  kv_indices=torch.tensor([[[[2, 0, -7], [1, 99, 99], [2, 1, 0]]]], dtype=torch.int32),
                  q_len=130, kv_len=130, block_q=64, block_k=64)
    return BlockMap(**{**fields, **changes})


def test_a_valid_hand_built_map_passes():
    bm = _hand_built()
    bm.check_values()  # entries past kv_num_blocks (-7, 99) are never read
    assert not bm._trusted


@pytest.mark.parametrize("changes, match", [
    (dict(block_class=torch.zeros(1, 1, 3, 3, dtype=torch.int64)), "block_class must be torch.int8; got torch.int64"),
    (dict(kv_num_blocks=torch.zeros(1, 1, 3, dtype=torch.int64)), "kv_num_blocks must be torch.int32"),
    (dict(kv_indices=torch.zeros(1, 1, 3, 3)), "kv_indices must be torch.int32; got torch.float32"),
    (dict(q_len=200), r"q_len=200 and kv_len=130 .* expected \[B, H, 4, 3\]"),
    (dict(block_k=32), r"blocks of \(64, 32\): expected \[B, H, 3, 5\]"),
    (dict(block_q=0), "block_q=0 must be an integer of at least 1"),
    (dict(kv_len=130.0), "kv_len=130.0 must be an integer"),
    (dict(kv_num_blocks=torch.zeros(1, 1, 2, dtype=torch.int32)), r"kv_num_blocks must be \[B, H, Nq\] = \[1, 1, 3\]"),
    (dict(kv_indices=torch.zeros(1, 1, 3, 0, dtype=torch.int32)), r"\[W >= 1\]; got \[1, 1, 3, 0\]"),
    (dict(kv_indices=torch.zeros(1, 3, 3, dtype=torch.int32)), r"kv_indices must be \[B, H, Nq, W\]"),
    (dict(kv_indices=torch.zeros(1, 1, 3, 3, dtype=torch.int32, device="meta")), "different devices"),
])
def test_construction_checks_dtypes_shapes_and_devices(changes, match):
    with pytest.raises(ValueError, match=match):
        _hand_built(**changes)


@pytest.mark.parametrize("row, num, match", [
    ([2, 3, 0], 2, r"kv_indices\(0, 0, 0, 1\) = 3 is outside \[0, Nk=3\)"),  # one past the last key block
    ([2, -1, 0], 2, r"kv_indices\(0, 0, 0, 1\) = -1 is outside"),
    ([2, 0, 9], 4, r"kv_num_blocks\(0, 0, 0\) = 4 is outside \[0, W=3\]"),  # a list too narrow for its count
    ([2, 0, 9], -1, r"kv_num_blocks\(0, 0, 0\) = -1"),
    ([2, 1, 9], 2, r"kv_indices\(0, 0, 0\)\[:2\] = \[2, 1\] must list each CRITICAL key block .* once: \[0, 2\]"),
    ([2, 2, 9], 2, r"= \[2, 2\] must list each CRITICAL"),  # a duplicate
    ([2, 0, 9], 1, r"= \[2\] must list each CRITICAL"),  # one missing
])
def test_values_are_checked(row, num, match):
    bm = _hand_built()
    bm.kv_indices[0, 0, 0] = torch.tensor(row)
    bm.kv_num_blocks[0, 0, 0] = num
    with pytest.raises(ValueError, match=match):
        bm.check_values()


def test_block_classes_are_checked():
    bm = _hand_built()
    bm.block_class[0, 0, 1, 2] = 3
    with pytest.raises(ValueError, match=r"block_class\(0, 0, 1, 2\) = 3 is not NEGLIGIBLE 0, MARGINAL 1 or CRITICAL"):
        bm.check_values()


def test_only_the_factories_make_trusted_maps():
    """Maps from predict_block_map / build_block_map skip the value checks (a device sync); any other map, also one
    derived from a trusted map by dataclasses.replace, is checked."""
    q, k = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    predicted = predict_block_map(q, k, topk=0.3, negligible=0.1)
    built = build_block_map(predicted.block_class, 300, 300, 64, 64)
    assert predicted._trusted and built._trusted
    derived = dataclasses.replace(predicted, kv_indices=predicted.kv_indices.flip(-1))
    assert not derived._trusted
    derived.check_values()  # a different order of the same blocks is valid
    assert "_trusted" not in repr(predicted)
