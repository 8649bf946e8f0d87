"""Fused RMS norm + RoPE (sla_dist.kernels.norm_rope) against the float64 reference: output within 2x, gradients
(x and the norm's weight) within 3x of the reference's own error in the kernel's dtype. CPU: the interpreter on a
sample (float32 / float16, odd lengths, head dims whose pair count is no power of two, x a slice of a fused qkv
projection as in the DiT); GPU: bf16 at the DiT's dim and through torch.compile."""

from __future__ import annotations

import pytest
import torch

from sla_dist.kernels import configs, norm_rope as norm_rope_module
from sla_dist.kernels.norm_rope import BackwardLaunch, norm_rope, norm_rope_ref
from sla_dist.models.layers import NormRoPE
from sla_dist.models.rope import rope_tables
from tests.kernels.harness import GRAD_FACTOR, OUTPUT_FACTOR, relative_error
from tests.utils import HAS_CUDA

CPU_CASES = [  # (dtype, B, L, heads, D, x a slice of a fused qkv projection)
    (torch.float32, 2, 37, 3, 12, True),
    (torch.float16, 1, 53, 2, 16, True),
    (torch.float16, 2, 19, 3, 12, False),
]
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")  # the CPU sample runs on the card where there is one
GPU_CASES = [(dt, 1, L, 12, 128, True) for dt in (torch.bfloat16, torch.float16) for L in (4097, 8192)] + [
    (torch.bfloat16, 2, 1031, 24, 64, True), (torch.float32, 1, 777, 12, 128, False)]


def _inputs(dtype, B, L, heads, D, sliced, device, seed=0):
    """Fresh x (a slice of a [B, L, 3 dim] buffer when ``sliced``), a non-trivial weight, tables, upstream gradient."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dim = heads * D
    buffer = torch.randn(B, L, 3 * dim if sliced else dim, generator=g) * 2 + 0.5
    weight = 1 + 0.3 * torch.randn(dim, generator=g)
    grad = torch.randn(B, L, heads, D, generator=g)
    cos, sin = rope_tables((1, L, 1), D, theta=100.0)
    return [t.to(device) for t in (buffer, weight, grad, cos, sin)]


def _run(buffer, weight, grad, cos, sin, heads, dtype, fused, forward=norm_rope):
    """(out, dx, dw) of ``forward`` (norm_rope or a compiled form) in ``dtype`` (float64: the exact reference), x the
    buffer's first dim columns."""
    buffer = buffer.to(dtype).requires_grad_()
    weight = weight.to(dtype).requires_grad_()
    dim = weight.shape[0]
    tables = (cos.double(), sin.double()) if dtype == torch.float64 else (cos, sin)
    out = forward(buffer[..., :dim], weight, *tables, heads, 1e-6, fused=fused)
    dx, dw = torch.autograd.grad(out, (buffer, weight), grad.to(dtype))
    return out, dx[..., :dim], dw


def _check(case, device):
    dtype, B, L, heads, D, sliced = case
    inputs = _inputs(dtype, B, L, heads, D, sliced, device)
    got = _run(*inputs, heads, dtype, fused=True)
    low = _run(*inputs, heads, dtype, fused=False)
    exact = _run(*inputs, heads, torch.float64, fused=False)
    for name, k, lo, e in zip(("out", "dx", "dw"), got, low, exact):
        assert k.dtype == dtype and torch.isfinite(k).all(), f"{name}: {k.dtype}, non-finite values"
        factor = OUTPUT_FACTOR if name == "out" else GRAD_FACTOR
        kernel_err, ref_err = relative_error(k, e), relative_error(lo, e)
        assert kernel_err <= factor * max(ref_err, 1e-7), f"{name}: {kernel_err:.3e} > {factor} x {ref_err:.3e}"


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{str(c[0])[6:]}-L{c[2]}-D{c[4]}")
def test_matches_float64_reference(case, poison_outputs):
    _check(case, DEVICE)


def test_compiled_graph_takes_the_ops():
    """torch.compile traces both ops through their fake implementations and autograd; the compiled step returns the
    eager kernels' values bit for bit (aot_eager: the same ops run, no codegen on the CPU); the backward runs
    through the compiled graph's autograd."""
    buffer, weight, grad, cos, sin = _inputs(torch.float32, 1, 21, 2, 12, True, DEVICE)
    eager = _run(buffer, weight, grad, cos, sin, 2, torch.float32, fused=True)
    compiled = torch.compile(norm_rope, backend="aot_eager", fullgraph=True)
    for a, b in zip(eager, _run(buffer, weight, grad, cos, sin, 2, torch.float32, True, compiled)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_reads_a_heads_first_gradient_in_place(monkeypatch):
    """The attention's dq / dk come back heads-first ([B, L, H, D] viewed over [B, H, L, D]): the backward kernel
    gets that tensor itself (no copy into token rows) and gives the token-major gradient's results bit for bit."""
    buffer, weight, grad, cos, sin = _inputs(torch.float32, 2, 23, 3, 12, True, DEVICE)
    heads_first = grad.transpose(1, 2).contiguous().transpose(1, 2)
    assert heads_first.stride(2) != 12 and torch.equal(heads_first, grad)
    forward, backward = norm_rope_module._kernels()
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(g, *args, **kwargs):
                seen.append((g.data_ptr(), g.stride()))
                return backward[grid](g, *args, **kwargs)
            return launch

    monkeypatch.setattr(norm_rope_module, "_kernels", lambda: (forward, Spy()))
    token_major = _run(buffer, weight, grad, cos, sin, 3, torch.float32, fused=True)
    in_place = _run(buffer, weight, heads_first, cos, sin, 3, torch.float32, fused=True)
    assert seen[1] == (heads_first.data_ptr(), heads_first.stride()), seen
    for a, b in zip(token_major, in_place):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [
    (dict(heads=5), "dim 24 must split into 5 heads"),
    (dict(heads=8), "dim 24 must split into 8 heads of an even head dim"),
    (dict(weight=torch.ones(23)), r"weight shape \(23,\) is not \(24,\)"),
    (dict(cos=torch.ones(6, 6)), r"cos must be \[7, 6\]"),
    (dict(x=torch.ones(1, 7, 24, dtype=torch.float64)), "float16 / bfloat16 / float32"),
])
def test_bad_input_names_the_value(bad, message):
    args = dict(x=torch.randn(1, 7, 24), weight=torch.ones(24), cos=torch.ones(7, 6), sin=torch.ones(7, 6), heads=2)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        norm_rope(args["x"], args["weight"], args["cos"], args["sin"], args["heads"], 1e-6, fused=True)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    x = torch.randn(1, 7, 24)
    with pytest.raises(ValueError, match="fused kernels take CUDA tensors .* got x on cpu"):
        norm_rope(x, torch.ones(24), torch.ones(7, 6), torch.ones(7, 6), 2, 1e-6, fused=True)


def test_module_keeps_the_rms_norm_key_and_reference_on_cpu():
    """NormRoPE holds nn.RMSNorm's parameter name (checkpoints and Wan weights load unchanged) and, on the CPU by
    default, computes the reference exactly."""
    module = NormRoPE(24, 2, 1e-6)
    assert list(module.state_dict()) == ["weight"]
    x = torch.randn(1, 7, 24)
    cos, sin = rope_tables((1, 7, 1), 12)
    torch.testing.assert_close(module(x, cos, sin), norm_rope_ref(x, module.weight, cos, sin, 2, 1e-6),
                               rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{str(c[0])[6:]}-B{c[1]}-L{c[2]}-H{c[3]}-D{c[4]}")
def test_matches_float64_reference_gpu(case, poison_outputs):
    _check(case, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("launch", [BackwardLaunch(*v) for v in (
    (1, 4, 4), (1, 16, 4), (1, 32, 4), (1, 64, 4), (2, 4, 4), (2, 8, 4), (2, 16, 4), (4, 4, 8), (4, 8, 8), (4, 16, 8), (8, 4, 8))],
                         ids=lambda b: f"rows{b.rows}-per_sm{b.programs_per_sm}-warps{b.warps}")
def test_backward_launches_gpu(launch, monkeypatch, poison_outputs):
    """Every backward launch bench_norm_rope.py --backward-launch times computes the same gradients' accuracy."""
    monkeypatch.setattr(norm_rope_module, "BACKWARD_LAUNCH", launch)
    _check((torch.bfloat16, 2, 4099, 12, 128, True), DEVICE)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_inductor_graph_matches_eager_gpu():
    """Inductor compiles around the ops (as in a compiled DiT block): same values as eager, bit for bit."""
    buffer, weight, grad, cos, sin = _inputs(torch.bfloat16, 1, 1031, 12, 128, True, "cuda")
    eager = _run(buffer, weight, grad, cos, sin, 12, torch.bfloat16, fused=True)
    compiled = torch.compile(norm_rope, fullgraph=True)
    for a, b in zip(eager, _run(buffer, weight, grad, cos, sin, 12, torch.bfloat16, True, compiled)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
