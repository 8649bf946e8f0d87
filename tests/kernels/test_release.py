"""The eager backward frees saved buffers right after their last reader (op._gradients' ``release``): the linear
branch's saved sums and, for the projected op behind sparse_linear_attention with proj_l, its internal branch outputs
O_s and O_l. The gradients are those of the same backward without the frees, bit for bit; tensors the caller holds
(sla_branches' o_s and o_l, the custom ops' outputs) are never freed; a second backward through the same graph gets
the same gradients where it is handed fresh tensors (saved-tensor hooks that unpack copies, activation
checkpointing), and otherwise from O_s and O_l made again by the forward kernel."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from sla_dist.kernels import backward_ops, op
from sla_dist.kernels.block_map import predict_block_map
from sla_dist.kernels.op import sla_branches, sparse_linear_attention
from tests.utils import DEVICE

D = 32


def _inputs(L: int, dtype: torch.dtype = torch.float32):
    """Leaves q, k, v [1, 2, L, D], proj_l's weight and bias; an output gradient; the block map."""
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 2, L, D, generator=g).to(DEVICE, dtype) for _ in range(4))
    w, b = torch.randn(D, D, generator=g) * D**-0.5, torch.randn(D, generator=g) * 0.1
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v, w, b)], grad, bm


def _layer(q, k, v, w, b, bm, **options):
    """The layer's path: the projected op, whose O_s and O_l are internal."""
    return sparse_linear_attention(q, k, v, bm, w, b, **options)


def _branches(q, k, v, w, b, bm, **options):
    """sla_branches, its outputs merged by the caller, who holds them through the backward."""
    o_s, o_l, lse = sla_branches(q, k, v, bm, **options)
    return o_s + torch.nn.functional.linear(o_l, w, b) + 0.1 * lse[..., None]


def _grads(fn, leaves, grad, bm, **options) -> list[torch.Tensor]:
    return list(torch.autograd.grad(fn(*leaves, bm, **options), leaves, grad))


def _backward_holding_everything(ctx, *grads):
    """The eager backward as before the frees: every saved tensor held until the backward returns."""
    return op._gradients(backward_ops.sla_backward, ctx, *grads)


@pytest.fixture
def without_release(monkeypatch):
    monkeypatch.setattr(op._EagerSLA, "backward", staticmethod(_backward_holding_everything))


def _saved(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The projected op's saved O_s, sums and O_l, from the autograd node of the layer output ``out``."""
    saved = out.grad_fn.saved_tensors
    return dict(o_s=saved[3], sums=saved[8], o_l=saved[9])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L", [129, 201])  # a one-token and a partial last block (of 64 queries and keys)
@pytest.mark.parametrize("linear_sums", ["save", "recompute"])
@pytest.mark.parametrize("path", [_layer, _branches])
def test_frees_leave_the_gradients_unchanged(path, linear_sums, L, dtype, poison_outputs, monkeypatch):
    leaves, grad, bm = _inputs(L, dtype)
    freed = _grads(path, leaves, grad, bm, linear_sums=linear_sums)
    with monkeypatch.context() as patch:
        patch.setattr(op._EagerSLA, "backward", staticmethod(_backward_holding_everything))
        held = _grads(path, leaves, grad, bm, linear_sums=linear_sums)
    for name, a, b in zip(("dq", "dk", "dv", "dW", "db"), freed, held):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), (name, (a - b).abs().max())


@pytest.mark.parametrize("linear_scope", ["marginal", "all"])
def test_layer_backward_frees_its_internal_branch_outputs(linear_scope):
    leaves, grad, bm = _inputs(201)
    out = _layer(*leaves, bm, linear_scope=linear_scope)
    kept = out.detach().clone()
    out.backward(grad, retain_graph=True)  # the graph kept, to look at its saved tensors
    assert {name: t.untyped_storage().nbytes() for name, t in _saved(out).items()} == dict(o_s=0, sums=0, o_l=0)
    assert torch.equal(out, kept)  # the caller's output is not freed


def test_without_release_nothing_is_freed(without_release):
    """The fixture the other tests compare with holds every saved tensor (else they would compare like with like)."""
    leaves, grad, bm = _inputs(201)
    out = _layer(*leaves, bm)
    out.backward(grad, retain_graph=True)
    assert all(t.untyped_storage().nbytes() > 0 for t in _saved(out).values())


@pytest.mark.parametrize("linear_sums", ["save", "recompute"])
def test_outputs_the_caller_holds_are_never_freed(linear_sums):
    """sla_branches returns O_s and O_l, and the custom ops (what torch.compile traces) return all outputs: their
    backwards keep them, values included, and a second backward gets the same gradients."""
    leaves, grad, bm = _inputs(201)
    q, k, v, w, b = leaves
    lists = (bm.block_class, bm.kv_num_blocks, bm.kv_indices, bm.block_q, bm.block_k, "softmax", "marginal",
             linear_sums, "env")
    for name, outputs in (("sla_branches", sla_branches(q, k, v, bm, linear_sums=linear_sums)),
                          ("sla_forward", op.sla_forward(q, k, v, *lists)[:3]),
                          ("sla_projected_forward", op.sla_projected_forward(q, k, v, *lists, w, b)[:4])):
        kept = [t.detach().clone() for t in outputs]
        loss = sum((t * torch.randn_like(t)).sum() for t in outputs)
        first = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        for t, before in zip(outputs, kept):
            assert t.untyped_storage().nbytes() > 0 and torch.equal(t, before), name
        second = torch.autograd.grad(loss, leaves, allow_unused=True)
        for a, c in zip(first, second):
            assert (a is None and c is None) or torch.equal(a, c), name


@pytest.mark.parametrize("linear_sums", ["save", "recompute"])
def test_second_layer_backward_through_the_same_graph_makes_the_freed_outputs_again(linear_sums):
    """retain_graph (e.g. two losses through one forward): the first backward freed O_s and O_l, the second makes
    them again with the forward kernel and gets the first's gradients, bit for bit."""
    leaves, grad, bm = _inputs(130)
    out = _layer(*leaves, bm, linear_sums=linear_sums)
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad)
    for name, a, b in zip(("dq", "dk", "dv", "dW", "db"), first, second):
        assert torch.equal(a, b), name


def test_saved_tensor_hooks_that_unpack_copies_allow_a_second_backward():
    """A hook pair whose unpack hands the backward a copy (as save_on_cpu's does on a GPU): the backward frees the
    copy, and a second backward unpacks another."""
    leaves, grad, bm = _inputs(201)
    want = _grads(_layer, leaves, grad, bm)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x.clone()):
        out = _layer(*leaves, bm)
    for retain in (True, False):
        got = torch.autograd.grad(out, leaves, grad, retain_graph=retain)
        for name, a, b in zip(("dq", "dk", "dv", "dW", "db"), got, want):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_freed_outputs(reentrant):
    """A checkpointed layer's backward runs on its recomputed forward's tensors: same gradients, also from a second
    backward through the same graph (each recomputes the forward)."""
    leaves, grad, bm = _inputs(201)
    want = _grads(_layer, leaves, grad, bm)
    out = checkpoint(_layer, *leaves, bm, use_reentrant=reentrant)
    for retain in (True, False):
        out.backward(grad, retain_graph=retain)  # reentrant checkpointing takes .backward, not autograd.grad
        for name, leaf, b in zip(("dq", "dk", "dv", "dW", "db"), leaves, want):
            assert torch.equal(leaf.grad, b), name
            leaf.grad = None
