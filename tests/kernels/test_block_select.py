"""The Triton block-map kernels (block_select.py) against the PyTorch path of block_map.py: the same block sums,
classes and critical lists, the ranking with either radix select of the classify kernel (SLA_DIST_CLASSIFY). On
CPU they run in the interpreter on small shapes; on a GPU on the Wan lengths."""

import pytest
import torch
from tests.utils import DEVICE, HAS_CUDA

from sla_dist.kernels import configs
from sla_dist.kernels.block_map import (CRITICAL, block_scores, block_sums, num_blocks, predict_block_map, rank_blocks,
                                        rows_per_block, smooth_k_scores, transposed_lists)
from sla_dist.kernels.configs import CLASSIFY_ENV, CLASSIFY_PACKED_MAX_BLOCKS, CLASSIFY_SELECTS


@pytest.fixture(params=CLASSIFY_SELECTS)
def classify_select(request, monkeypatch):
    """Each test that takes it runs with every value of SLA_DIST_CLASSIFY."""
    monkeypatch.setenv(CLASSIFY_ENV, request.param)
    return request.param

SHAPES = [(2, 2, 1000, 64, 128), (1, 3, 131, 32, 64), (1, 2, 300, 48, 64)]  # 48: any head dim
if HAS_CUDA:
    SHAPES += [(1, 12, 32760, 128, 128), (1, 4, 75600, 128, 128), (2, 24, 8193, 64, 64)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, H, L, D, block_q", SHAPES)
def test_kernels_match_pytorch(B, H, L, D, block_q, dtype, classify_select):
    gen = torch.Generator().manual_seed(L * 31 + D)
    q, k = (torch.randn(B, H, L, D, generator=gen).to(DEVICE, dtype) for _ in range(2))
    k = k[..., :D].transpose(1, 2).contiguous().transpose(1, 2)  # a [B, L, H, D] layout, read in place
    for block, n_blocks in ((64, None), (block_q, -(-L // block_q) + 3)):  # +3: zero-padded blocks (context parallel)
        torch.testing.assert_close(block_sums(k, block, n_blocks, kernels=True),
                                   block_sums(k, block, n_blocks, kernels=False), rtol=1e-6, atol=1e-4)
    fast = predict_block_map(q, k, topk=0.05, negligible=0.1, block_q=block_q, block_k=64, kernels=True)
    slow = predict_block_map(q, k, topk=0.05, negligible=0.1, block_q=block_q, block_k=64, kernels=False)
    # Float rounding of the block sums may swap two nearly tied key blocks; anything more is a bug.
    assert (fast.block_class != slow.block_class).float().mean() < 1e-4
    assert torch.equal(fast.kv_num_blocks, slow.kv_num_blocks)
    assert (fast.kv_indices != slow.kv_indices).float().mean() < 1e-3
    critical = fast.block_class == CRITICAL
    assert torch.equal(torch.zeros_like(critical).scatter_(-1, fast.kv_indices.long(), True), critical)
    assert (fast.kv_indices.diff(dim=-1) > 0).all()


SCORE_SHAPES = [(1, 2, 1000, 1000, 64, 128), (2, 3, 333, 517, 48, 64), (1, 1, 4100, 2113, 128, 128)]
if HAS_CUDA:
    SCORE_SHAPES += [(1, 12, 32760, 32760, 128, 128), (1, 4, 75600, 75600, 128, 128), (2, 24, 8193, 8193, 64, 64)]


@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q", SCORE_SHAPES)
def test_scores_kernel_rounds_the_float64_scores(B, H, Lq, Lk, D, block_q, poison_outputs):
    """The scores kernel (one launch from the block sums) against smooth-K in float64 on the same sums: each score
    within one float32 ulp of the exact value (the PyTorch path rounds the same float64 value once), for partial
    last blocks, Lq != Lk and a head dim that is no power of two."""
    gen = torch.Generator().manual_seed(Lq + 7 * Lk + D)
    q = torch.randn(B, H, Lq, D, generator=gen).to(DEVICE)
    k = (torch.randn(B, H, Lk, D, generator=gen) + torch.randn(D, generator=gen)).to(DEVICE)  # a shared K offset
    scores = block_scores(q, k, block_q, 64, kernels=True)
    q_sums, k_sums = (block_sums(x, block, kernels=True).cpu() for x, block in ((q, block_q), (k, 64)))
    nq, nk = num_blocks(Lq, block_q), num_blocks(Lk, 64)
    q_bar = q_sums / rows_per_block(Lq, block_q, nq, "cpu")
    k_bar = k_sums / rows_per_block(Lk, 64, nk, "cpu") - k_sums.sum(2, keepdim=True) / Lk
    exact = q_bar @ k_bar.transpose(-1, -2) / D**0.5
    assert scores.shape == exact.shape and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    error = (scores.cpu().double() - exact).abs()
    assert (error <= exact.abs() * 2**-23 + 1e-300).all(), f"{error.max():.3e} off, more than one float32 ulp"
    rounded = smooth_k_scores(q_sums, rows_per_block(Lq, block_q, nq, "cpu"), k_sums,
                              rows_per_block(Lk, 64, nk, "cpu"), Lk)
    assert (scores.cpu() != rounded).float().mean() < 1e-3  # ties at a rounding boundary only


def test_ranking_ties_and_signed_zeros(classify_select):
    """Ties go to the lower index, -0.0 ties with +0.0, and every class count is exact, as in the PyTorch path."""
    row = [1.0, 1.0, 1.0, 0.0, -0.0, 2.0, 2.0, -1e30, 0.5, 3.0, -2.0]
    scores = torch.tensor([row, row[::-1]], device=DEVICE)
    for topk, negligible in ((0.25, 0.25), (0.1, 0.0), (1.0, 0.0), (0.5, 0.5)):
        fast = rank_blocks(scores, topk, negligible, kernels=True)
        slow = rank_blocks(scores, topk, negligible, kernels=False)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]), (topk, negligible)


@pytest.mark.parametrize("nk", [1, 37, 591])
def test_ranking_heavy_ties_long_rows(nk, classify_select):
    """Rows of few distinct values (most keys tie at both class boundaries), signs mixed, up to L 75600's Nk of 591
    (padded to 1024): the same classes and critical lists as a stable descending sort, for counts from one critical
    block to all of them."""
    gen = torch.Generator().manual_seed(nk)
    values = torch.tensor([-3.5, -1.0, -0.0, 0.0, 0.25, 1.0, 7.0])
    scores = values[torch.randint(0, len(values), (5, nk), generator=gen)].to(DEVICE)
    for topk, negligible in ((0.05, 0.1), (0.3, 0.3), (1.0, 0.0), (0.5, 0.45)):
        fast = rank_blocks(scores, topk, negligible, kernels=True)
        slow = rank_blocks(scores, topk, negligible, kernels=False)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]), (nk, topk, negligible)


@pytest.mark.parametrize("nk", [1, 2, 17, 130, 1182])
def test_packed_select_matches_the_separate_ones(nk, monkeypatch):
    """The packed select (both class boundaries from one loop of packed counts, 32-bit keys) gives the separate
    selects' classes and critical lists bit for bit, and the stable sort's: rows of Gaussian scores and rows of
    extremes and ties (+-inf, +-the largest float32, +-0, +-1), up to L 75600's Nk of 1182 at BK 64 (padded to
    2048), for counts from one critical block to all of them and with no negligible block."""
    gen = torch.Generator().manual_seed(nk)
    extremes = torch.tensor([float("inf"), -float("inf"), 3.4e38, -3.4e38, 0.0, -0.0, 1.0, -1.0])
    scores = torch.cat([torch.randn(3, nk, generator=gen),
                        extremes[torch.randint(0, len(extremes), (3, nk), generator=gen)]]).to(DEVICE)
    for topk, negligible in ((0.05, 0.1), (0.0, 0.5), (1.0, 0.0), (0.3, 0.6)):
        ranked = {}
        for select in CLASSIFY_SELECTS:
            monkeypatch.setenv(CLASSIFY_ENV, select)
            ranked[select] = rank_blocks(scores, topk, negligible, kernels=True)
        slow = rank_blocks(scores, topk, negligible, kernels=False)
        for got in ranked.values():
            assert torch.equal(got[0], slow[0]) and torch.equal(got[1], slow[1]), (nk, topk, negligible)


def test_packed_select_takes_rows_its_counts_fit(monkeypatch):
    """SLA_DIST_CLASSIFY: 'separate', the separate selects; unset or 'packed', the packed one for rows of up to
    CLASSIFY_PACKED_MAX_BLOCKS key blocks (two counts of up to Nk in one int32), the separate ones past that."""
    monkeypatch.setenv(CLASSIFY_ENV, "separate")
    assert not configs.classify_packed(64)
    for setting in (None, "packed"):
        if setting is None:
            monkeypatch.delenv(CLASSIFY_ENV, raising=False)
        else:
            monkeypatch.setenv(CLASSIFY_ENV, setting)
        assert configs.classify_packed(1) and configs.classify_packed(CLASSIFY_PACKED_MAX_BLOCKS)
        assert not configs.classify_packed(CLASSIFY_PACKED_MAX_BLOCKS + 1)
    assert CLASSIFY_PACKED_MAX_BLOCKS * 65537 < 2**31  # both counts and no carry between them in an int32


@pytest.mark.parametrize("shape", [(2, 3, 9, 17), (1, 2, 64, 130)] + ([(1, 12, 256, 512)] if HAS_CUDA else []))
def test_transposed_lists_match_pytorch(shape):
    gen = torch.Generator().manual_seed(shape[-1])
    block_class = torch.randint(0, 3, shape, generator=gen, dtype=torch.int8).to(DEVICE)
    fast_num, fast_idx = transposed_lists(block_class, kernels=True)
    slow_num, slow_idx = transposed_lists(block_class, kernels=False)
    assert torch.equal(fast_num, slow_num)
    listed = torch.arange(shape[2], device=DEVICE) < fast_num[..., None]  # entries past q_num are unspecified
    assert torch.equal(torch.where(listed, fast_idx, -1), torch.where(listed, slow_idx, -1))
