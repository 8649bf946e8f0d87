"""SLA over video keys merged with dense text keys by log-sum-exp."""

import pytest
import torch
import torch.nn.functional as F

from sla_dist import SparseLinearAttention
from sla_dist.kernels.block_map import CRITICAL, predict_block_map
from sla_dist.kernels.reference import linear_branch_ref
from sla_dist.models.joint_attention import attention_with_lse, sla_with_dense_keys


def _qkv(B=2, H=2, L=200, D=32, text=9):
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    kt, vt = (torch.randn(B, H, text, D, dtype=torch.float64) for _ in range(2))
    return q, k, v, kt, vt


def _sla(topk, negligible=0.0, **kwargs):
    return SparseLinearAttention(32, topk, negligible=negligible, **kwargs).double()


def test_attention_with_lse():
    q, k, v, _, _ = _qkv(L=50)
    o, lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, ((q @ k.transpose(-1, -2)) / 32**0.5).logsumexp(-1))


def test_full_topk_equals_dense_over_all_keys():
    q, k, v, kt, vt = _qkv()
    for t in (q, k, v, kt, vt):
        t.requires_grad_(True)
    out = sla_with_dense_keys(_sla(1.0), q, k, v, kt, vt)
    ref = F.scaled_dot_product_attention(q, torch.cat([kt, k], 2), torch.cat([vt, v], 2))
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, kt, vt), grad)
    want = torch.autograd.grad(ref, (q, k, v, kt, vt), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_sparse_equals_masked_softmax_with_text_always_critical():
    q, k, v, kt, vt = _qkv()
    sla = _sla(0.25, 0.25)
    with torch.no_grad():
        sla.proj_l.weight.normal_()
        sla.proj_l.bias.normal_()
    out = sla_with_dense_keys(sla, q, k, v, kt, vt)

    bm = predict_block_map(q, k, topk=0.25, negligible=0.25)
    scores = torch.cat([q @ kt.transpose(-1, -2), q @ k.transpose(-1, -2)], -1) / 32**0.5
    text_mask = torch.ones(*q.shape[:3], kt.shape[2], dtype=torch.bool)
    scores = scores.masked_fill(~torch.cat([text_mask, bm.token_mask(CRITICAL)], -1), float("-inf"))
    ref = torch.softmax(scores, -1) @ torch.cat([vt, v], 2)
    ref = ref + sla.proj_l(linear_branch_ref(q, k, v, bm, "softmax", "marginal"))
    torch.testing.assert_close(out, ref)
    assert (out - sla_with_dense_keys(_sla(1.0), q, k, v, kt, vt)).abs().max() > 1e-2


def test_uses_the_layers_branches_and_module_projection():
    """proj_l runs as a module call (ZeRO-3 gathers parameters in module hooks) and the layer's own input checks
    apply, e.g. its head dim."""
    q, k, v, kt, vt = _qkv()
    sla = _sla(0.25, 0.25)
    calls = []
    sla.proj_l.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    sla_with_dense_keys(sla, q, k, v, kt, vt)
    assert calls == [q.shape]
    narrow = tuple(t[..., :16] for t in (q, k, v, kt, vt))
    with pytest.raises(ValueError, match="head dim 16 but this layer was built with head_dim=32"):
        sla_with_dense_keys(sla, *narrow)
