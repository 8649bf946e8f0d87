"""The fused tanh-GELU MLP backward (sla_dist.kernels.gelu_mlp) against float64: dh and a within 2x, the column sums
and the MLP's gradients within 3x of the reference's own error in the kernel's dtype. CPU: the interpreter on odd
shapes in float32 / float16; GPU: bfloat16 at a DiT's hidden width, and the model's MLP taking the fused path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sla_dist.kernels import gelu_mlp as gelu_mlp_module
from sla_dist.kernels.gelu_mlp import BackwardLaunch, gelu_mlp, gelu_tanh_backward_ref
from sla_dist.models.layers import MLP
from tests.kernels.harness import GRAD_FACTOR, OUTPUT_FACTOR, relative_error
from tests.utils import HAS_CUDA

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
CPU_CASES = [(torch.float32, 333, 200), (torch.float16, 65, 129), (torch.float16, 257, 64)]
GPU_CASES = [(torch.bfloat16, 4097, 8960), (torch.float16, 1031, 3000), (torch.bfloat16, 7, 130)]


def _pair(M, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, N, generator=g), 3 * torch.randn(M, N, generator=g)  # ga, h (h spans GELU's bend)


def _errors_within_bounds(got, low, exact, names, factors):
    for name, k, lo, e, factor in zip(names, got, low, exact, factors):
        assert torch.isfinite(k).all(), f"{name}: non-finite values"
        kernel_err, ref_err = relative_error(k, e), relative_error(lo, e)
        assert kernel_err <= factor * max(ref_err, 1e-7), f"{name}: {kernel_err:.3e} > {factor} x {ref_err:.3e}"


def _check_backward(dtype, M, N, launch=None):
    ga, h = _pair(M, N, seed=M + N)
    got = gelu_mlp_module._gelu_tanh_backward_impl(ga.to(DEVICE, dtype), h.to(DEVICE, dtype), launch)
    assert [t.dtype for t in got] == [dtype, dtype, torch.float32]
    low = gelu_tanh_backward_ref(ga.to(dtype), h.to(dtype))
    exact = gelu_tanh_backward_ref(ga.double(), h.double())
    _errors_within_bounds([t.cpu() for t in got], low, exact, ("dh", "a", "db"),
                          (OUTPUT_FACTOR, OUTPUT_FACTOR, GRAD_FACTOR))


@pytest.mark.parametrize("dtype, M, N", CPU_CASES, ids=str)
def test_backward_matches_float64(dtype, M, N, poison_outputs):
    _check_backward(dtype, M, N)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, M, N", GPU_CASES, ids=str)
def test_backward_matches_float64_gpu(dtype, M, N, poison_outputs):
    _check_backward(dtype, M, N)


@pytest.mark.parametrize("launch", [BackwardLaunch(block_m=16, block_n=128, rows=48, warps=4),
                                    BackwardLaunch(block_m=8, block_n=256, rows=32, warps=4)])
def test_other_tilings_give_the_same_values(launch, poison_outputs):
    """Any tiling (row runs that end inside the tensor, partial column tiles) gives dh and a bit for bit and the
    column sums to float32 rounding."""
    ga, h = (t.to(DEVICE) for t in _pair(131, 100, seed=3))
    base = gelu_mlp_module._gelu_tanh_backward_impl(ga, h)
    other = gelu_mlp_module._gelu_tanh_backward_impl(ga, h, launch)
    assert torch.equal(base[0], other[0]) and torch.equal(base[1], other[1])
    torch.testing.assert_close(base[2], other[2], rtol=1e-6, atol=1e-5)


def _mlp_grads(x, w1, b1, w2, b2, dy, fn):
    leaves = [t.detach().requires_grad_() for t in (x, w1, b1, w2, b2)]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy)]


def _unfused(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mlp_matches_float64(dtype, poison_outputs):
    """y and the gradients of x [B, L, dim], both weights and both biases."""
    g = torch.Generator().manual_seed(11)
    dim, hidden, out = 24, 70, 20
    x = torch.randn(2, 37, dim, generator=g)
    w1, b1 = torch.randn(hidden, dim, generator=g) / dim**0.5, torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(out, hidden, generator=g) / hidden**0.5, torch.randn(out, generator=g)
    dy = torch.randn(2, 37, out, generator=g)
    args = (x, w1, b1, w2, b2, dy)
    got = _mlp_grads(*(t.to(DEVICE, dtype) for t in args), gelu_mlp)
    low = _mlp_grads(*(t.to(dtype) for t in args), _unfused)
    exact = _mlp_grads(*(t.double() for t in args), _unfused)
    _errors_within_bounds([t.cpu() for t in got], low, exact, ("y", "dx", "dw1", "db1", "dw2", "db2"),
                          (OUTPUT_FACTOR,) + (GRAD_FACTOR,) * 5)


def test_compiles_as_one_graph():
    """torch.compile traces the MLP function and its backward with no graph break; the same values as eager."""
    g = torch.Generator().manual_seed(5)
    x, w1, b1 = torch.randn(3, 17, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    w2, b2, dy = torch.randn(6, 40, generator=g), torch.randn(6, generator=g), torch.randn(3, 17, 6, generator=g)
    args = [t.to(DEVICE) for t in (x, w1, b1, w2, b2, dy)]
    eager = _mlp_grads(*args, gelu_mlp)
    compiled = _mlp_grads(*args, torch.compile(gelu_mlp, backend="aot_eager", fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_value():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="must have x's dtype"):
        gelu_mlp(x, torch.randn(16, 8, dtype=torch.float64), None, torch.randn(8, 16), None)
    with pytest.raises(ValueError, match="do not chain"):
        gelu_mlp(x, torch.randn(16, 9), None, torch.randn(8, 16), None)
    with pytest.raises(ValueError, match="int64"):
        gelu_mlp(x.long(), torch.randn(16, 8), None, torch.randn(8, 16), None)
    with pytest.raises(ValueError, match="rows=50"):
        BackwardLaunch(rows=50, block_m=32)


def _fused_and_module_calls(mlp, x, dy, autocast=None):
    """[y, dx, then every parameter's gradient] of ``mlp`` fused, then through its module calls (under ``autocast``,
    a dtype, when given)."""
    results = []
    for fused in (True, False):
        mlp.fused = fused
        assert mlp.fuses(x) is fused
        leaf = x.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=autocast, enabled=autocast is not None):
            y = mlp(leaf)
        results.append([y, *torch.autograd.grad(y, [leaf, *mlp.parameters()], dy.to(y.dtype))])
    return results


def test_model_mlp_takes_the_fused_path(poison_outputs):
    """The DiT's MLP module: fused (forced here; the default on CUDA) against its module calls, forward and every
    parameter's gradient; a hooked projection keeps the module calls."""
    torch.manual_seed(2)
    mlp = MLP(16, 48, "gelu").to(DEVICE)
    x, dy = torch.randn(2, 9, 16, device=DEVICE), torch.randn(2, 9, 16, device=DEVICE)
    for a, b in zip(*_fused_and_module_calls(mlp, x, dy)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    mlp.fused = None
    handle = mlp.up.register_forward_hook(lambda *args: None)
    assert not mlp.fuses(x.to("cuda") if HAS_CUDA else x)
    handle.remove()
    assert mlp.fuses(x) is HAS_CUDA


def test_model_mlp_under_autocast_matches_the_module_calls(poison_outputs):
    """Mixed precision (Lightning's bf16-mixed: float32 parameters and activations under autocast): the fused path
    runs the products in autocast's dtype as F.linear does, returns that dtype, and gives float32 parameters their
    gradients in float32, close to the module calls' (both round the same products to bfloat16)."""
    torch.manual_seed(4)
    mlp = MLP(32, 64, "gelu").to(DEVICE)
    x, dy = torch.randn(2, 40, 32, device=DEVICE), torch.randn(2, 40, 32, device=DEVICE)
    fused, modules = _fused_and_module_calls(mlp, x, dy, autocast=torch.bfloat16)
    assert fused[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in fused[1:])
    for name, a, b in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), fused, modules):
        assert relative_error(a.float(), b.double()) < 2e-2, name
