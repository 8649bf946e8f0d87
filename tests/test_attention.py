"""The SparseLinearAttention module: public-SLA compatible constructor and state_dict, dispatch, errors."""

import pytest
import torch
import torch.nn.functional as F

from sla_dist import SLAConfig, SparseLinearAttention
from sla_dist.attention import relative_l1
from tests.utils import DEVICE, HAS_CUDA

# On CUDA, float32 inputs run the kernels in bfloat16 (use_bf16=True); on CPU both backends compute in float32.
TOL = dict(atol=3e-2, rtol=3e-2) if HAS_CUDA else dict(atol=2e-5, rtol=1e-4)


def _qkv(L=300, D=64, H=2, dtype=torch.float32):
    return [torch.randn(1, H, L, D, device=DEVICE, dtype=dtype) for _ in range(3)]


def test_public_constructor_and_state_dict_keys():
    m = SparseLinearAttention(128, 0.05, "softmax", 128, 64, True, True)
    assert set(m.state_dict()) == {"proj_l.weight", "proj_l.bias"}
    assert (m.proj_l.weight == 0).all() and (m.proj_l.bias == 0).all()
    assert m.config == SLAConfig(topk=0.05, negligible=0.10, block_q=128, block_k=64)


def test_fresh_layer_at_full_topk_is_dense_attention():
    q, k, v = _qkv()
    out = SparseLinearAttention(64, topk=1.0, negligible=0.0).to(DEVICE)(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL)


def test_triton_backend_matches_reference_backend():
    # On CUDA the kernels run float32 inputs in bfloat16; give both backends bfloat16 so that they predict the same
    # block map (a map from float32 q, k may rank two nearly tied key blocks the other way).
    torch.manual_seed(257)
    q, k, v = _qkv(L=257, dtype=torch.bfloat16 if HAS_CUDA else torch.float32)
    ref = SparseLinearAttention(64, topk=0.2, feature_map="elu", backend="reference").to(DEVICE)
    torch.nn.init.normal_(ref.proj_l.weight, std=0.1)
    kern = SparseLinearAttention(64, topk=0.2, feature_map="elu", backend="triton").to(DEVICE)
    kern.load_state_dict(ref.state_dict())
    (a, sa), (b, sb) = ref(q, k, v, return_sparsity=True), kern(q, k, v, return_sparsity=True)
    torch.testing.assert_close(a, b, **TOL)
    assert sa == sb == pytest.approx(1 - 1 / 5)  # n_c = 1 of Nk = 5


def test_gradients_reach_proj_l():
    q, k, v = (t.requires_grad_() for t in _qkv())
    m = SparseLinearAttention(64, topk=0.1).to(DEVICE)
    m(q, k, v).square().sum().backward()
    assert m.proj_l.weight.grad.abs().sum() > 0 and m.proj_l.bias.grad.abs().sum() > 0
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def _layer_grads(m, q, k, v):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    m.zero_grad()
    out = m(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out))
    return [out.detach()] + [t.grad for t in leaves] + [m.proj_l.weight.grad, m.proj_l.bias.grad]


def test_kernels_apply_proj_l_in_the_forward_kernel(monkeypatch):
    """With the kernels, the layer projects O_l inside the forward kernel (``project`` is not called) and gives the
    output and q, k, v, proj_l gradients of the unfused path (separate proj_l call), to rounding."""
    torch.manual_seed(131)
    q, k, v = _qkv(L=131)
    m = SparseLinearAttention(64, topk=0.3, feature_map="relu", backend="triton").to(DEVICE)
    torch.nn.init.normal_(m.proj_l.weight, std=0.1)
    torch.nn.init.normal_(m.proj_l.bias, std=0.1)
    assert m.fuses_projection(q.device)
    with monkeypatch.context() as patch:
        patch.setattr(SparseLinearAttention, "project", None)
        fused = _layer_grads(m, q, k, v)
    monkeypatch.setattr(SparseLinearAttention, "fuses_projection", lambda self, device: False)
    unfused = _layer_grads(m, q, k, v)
    tol = 1e-2 if HAS_CUDA else 1e-5  # on CUDA both run in bfloat16, the fused path rounding O_l W^T + b once less
    for name, a, b in zip(("out", "dq", "dk", "dv", "dW", "db"), fused, unfused):
        assert relative_l1(a, b) < tol, (name, relative_l1(a, b))


def test_hooked_or_partitioned_proj_l_is_called_as_a_module():
    """proj_l stays a module call where something relies on it: a forward hook (ZeRO-3 gathers partitioned
    parameters in such hooks), a ZeRO-3 parameter (``ds_id``), and of course without kernels or linear branch."""
    m = SparseLinearAttention(64, topk=0.3, backend="triton").to(DEVICE)
    assert m.fuses_projection(DEVICE)
    calls = []
    handle = m.proj_l.register_forward_hook(lambda *args: calls.append(args[1][0].shape))
    assert not m.fuses_projection(DEVICE)
    m(*_qkv(L=100))
    assert calls == [(1, 2, 100, 64)]
    handle.remove()
    m.proj_l.weight.ds_id = 0  # what ZeRO-3 sets on the parameters it partitions
    assert not m.fuses_projection(DEVICE)
    assert not SparseLinearAttention(64, linear_scope="none", backend="triton").fuses_projection(DEVICE)
    assert not SparseLinearAttention(64, backend="reference").fuses_projection(DEVICE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(topk=1.5), "topk=1.5"),
        (dict(topk=0.5, negligible=0.6), "exceeds 1"),
        (dict(BLKQ=32), "block_q=32"),
        (dict(BLKK=128), "block_k=128"),
        (dict(feature_map="cosine"), "cosine"),
        (dict(linear_scope="some"), "some"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseLinearAttention(64, **kwargs)


def test_bad_forward_inputs():
    m = SparseLinearAttention(64)
    q, k, v = (torch.randn(1, 2, 100, 64) for _ in range(3))
    with pytest.raises(ValueError, match="head dim 64 but this layer was built with head_dim=32"):
        SparseLinearAttention(32)(q, k, v)
    with pytest.raises(ValueError, match="different devices"):
        m(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="dtypes differ"):
        m(q, k.double(), v)
    with pytest.raises(NotImplementedError, match="head dim 96"):
        SparseLinearAttention(96, backend="triton")(*(torch.randn(1, 2, 100, 96) for _ in range(3)))
