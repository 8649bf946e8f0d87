"""The dense reference against independent, more literal formulations of the spec."""

import pytest
import torch
import torch.nn.functional as F

from sla_dist.kernels.block_map import CRITICAL, MARGINAL, build_block_map, predict_block_map
from sla_dist.kernels.reference import feature_map_ref, linear_branch_ref, sla_branches_ref, sla_reference


def test_topk_one_is_dense_attention():
    q, k, v = (torch.randn(2, 3, 333, 32, dtype=torch.float64) for _ in range(3))
    bm = predict_block_map(q, k, topk=1.0, negligible=0.0)
    w, b = torch.randn(32, 32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    out = sla_reference(q, k, v, bm, w, b, linear_scope="marginal")  # no marginal block: O_l = 0, proj_l(0) = b
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v) + b)


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_linear_branch_per_block_sums(feature_map):
    """O_l row by row from the per-key-block sums H_i, Z_i of the spec."""
    L, D = 200, 16
    q, k, v = (torch.randn(1, 1, L, D, dtype=torch.float64) for _ in range(3))
    bm = predict_block_map(q, k, topk=0.25, negligible=0.25)
    got = linear_branch_ref(q, k, v, bm, feature_map, "marginal")[0, 0]
    fq, fk = feature_map_ref(q[0, 0], feature_map), feature_map_ref(k[0, 0], feature_map)
    for row in (0, 63, 64, 199):
        i = row // 64
        h, z = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        for j in (bm.block_class[0, 0, i] == MARGINAL).nonzero().flatten().tolist():
            h += fk[j * 64 : (j + 1) * 64].T @ v[0, 0, j * 64 : (j + 1) * 64]
            z += fk[j * 64 : (j + 1) * 64].sum(0)
        den = fq[row] @ z
        want = fq[row] @ h / den if den != 0 else torch.zeros(D, dtype=torch.float64)
        torch.testing.assert_close(got[row], want)


def test_relu_with_no_mass_gives_zero_not_nan():
    q = -torch.rand(1, 1, 128, 16, dtype=torch.float64)  # relu(q) = 0 -> denominator 0
    k, v = torch.randn(1, 1, 128, 16, dtype=torch.float64), torch.randn(1, 1, 128, 16, dtype=torch.float64)
    q.requires_grad_()
    bm = predict_block_map(q, k, topk=0.0, negligible=0.0)
    o_l = linear_branch_ref(q, k, v, bm, "relu", "all")
    o_l.sum().backward()
    assert (o_l == 0).all() and torch.isfinite(q.grad).all()


def test_sparse_branch_lse():
    q, k, v = (torch.randn(1, 2, 300, 16, dtype=torch.float64) for _ in range(3))
    bm = predict_block_map(q, k, topk=0.4, negligible=0.0)
    _, _, lse = sla_branches_ref(q, k, v, bm)
    s = (q @ k.transpose(-1, -2)) / 4.0
    want = torch.where(bm.token_mask(CRITICAL), s.exp(), 0).sum(-1).log()
    torch.testing.assert_close(lse, want)


def test_large_float16_inputs_do_not_overflow():
    """x100 inputs: the unscaled q . k reaches ~2.6e5 > 65504 (float16's largest), the scaled one ~5e4. The sparse
    branch must stay finite and match float64 on the same inputs up to float16 rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (100 * torch.randn(1, 2, 130, 32, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = (t.half() for t in (q, k, v))
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() > 65504
    bm = predict_block_map(q, k, topk=0.5, negligible=0.0)
    o16, o_l, lse16 = sla_branches_ref(q, k, v, bm)
    o64, _, lse64 = sla_branches_ref(q.double(), k.double(), v.double(), bm)
    assert torch.isfinite(o16).all() and torch.isfinite(o_l).all() and torch.isfinite(lse16).all()
    for got, want in ((o16, o64), (lse16, lse64)):  # scores of ~1e4 are rounded to float16 steps of 8 or more
        assert (got.double() - want).abs().max() < 1e-2 * want.abs().max()


def test_row_without_critical_block_gives_zero():
    """A hand-built map may leave a query block without critical blocks: O_s = 0 and lse = -inf there (as in the
    kernels), not NaN, and the gradients stay finite."""
    block_class = torch.full((1, 1, 3, 3), CRITICAL, dtype=torch.int8)
    block_class[0, 0, 1] = MARGINAL
    bm = build_block_map(block_class, 130, 130, 64, 64)
    q, k, v = (torch.randn(1, 1, 130, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    o_s, _, lse = sla_branches_ref(q, k, v, bm)
    assert (o_s[0, 0, 64:128] == 0).all() and (lse[0, 0, 64:128] == float("-inf")).all()
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(o_s[0, 0, 128:], dense[0, 0, 128:])
    (o_s.sum() + lse[lse.isfinite()].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[0, 0, 64:128] == 0).all()
