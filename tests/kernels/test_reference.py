"""The dense reference against independent, more literal formulations of the spec."""

import pytest
import torch
import torch.nn.functional as F

from sla_dist.kernels.block_map import CRITICAL, MARGINAL, predict_block_map
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
