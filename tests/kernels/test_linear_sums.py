"""SLAConfig.linear_sums: the backward reads the linear branch's per-query-block sums H_i, Z_i that the forward made
('save') or makes them again ('recompute'). Both run the same kernels on the same sums, so their gradients are
bit-identical, through the eager autograd.Function, the custom ops and a compiled layer; 'save' launches no
summaries kernel in the backward."""

import pytest
import torch

from sla_dist import SLAConfig, SparseLinearAttention
from sla_dist.kernels import backward_ops, configs, op
from sla_dist.kernels.block_map import predict_block_map
from sla_dist.kernels.op import sla_branches, sparse_linear_attention
from tests.utils import DEVICE

from .harness import layer_step, patch_launchers

D = 32


def _inputs(L: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v [1, 2, L, D], an output gradient, proj_l's weight and bias, and the block map."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(1, 2, L, D, generator=g).to(DEVICE, dtype) for _ in range(4))
    w, b = torch.randn(D, D, generator=g) * D**-0.5, torch.randn(D, generator=g) * 0.1
    w, b = w.to(DEVICE, dtype), b.to(DEVICE, dtype)
    return q, k, v, grad, w, b, predict_block_map(q, k, topk=0.3, negligible=0.1)


def _forward(path: str, projected: bool, linear_scope: str, linear_sums: str, q, k, v, w, b, bm) -> torch.Tensor:
    """An output that every branch reaches, through the public functions (eager: _EagerSLA) or the custom ops
    called directly (their torch.library autograd)."""
    if path == "eager":
        if projected:
            return sparse_linear_attention(q, k, v, bm, w, b, linear_scope=linear_scope, linear_sums=linear_sums)
        o_s, o_l, lse = sla_branches(q, k, v, bm, linear_scope=linear_scope, linear_sums=linear_sums)
        return o_s + 0.5 * o_l + 0.1 * lse[..., None]
    ops = torch.ops.sla_dist
    lists = (bm.block_class, bm.kv_num_blocks, bm.kv_indices, bm.block_q, bm.block_k, "softmax", linear_scope,
             linear_sums, "env")
    if projected:
        return ops.sla_projected_forward(q, k, v, *lists, w, b)[0]
    o_s, o_l, lse, _ = ops.sla_forward(q, k, v, *lists)
    return o_s + 0.5 * o_l + 0.1 * lse[..., None]


def _gradients(linear_sums: str, path: str, projected: bool, linear_scope: str, L: int, dtype: torch.dtype):
    q, k, v, grad, w, b, bm = _inputs(L, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b)]
    out = _forward(path, projected, linear_scope, linear_sums, *leaves[:3], *leaves[3:], bm)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves[: 5 if projected else 3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("linear_scope", ["marginal", "all"])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_save_and_recompute_give_identical_gradients(path, linear_scope, projected, dtype, poison_outputs):
    L = 201  # a partial last block of queries and of keys
    save, recompute = (_gradients(s, path, projected, linear_scope, L, dtype) for s in ("save", "recompute"))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dW", "db"), save, recompute):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), (name, (a - b).abs().max())


class _Launches:
    """get_kernel wrapped, where the forward, backward and summaries launchers call it, to record the name of every
    kernel launched through it."""

    def __init__(self, monkeypatch):
        self.names = []
        patch_launchers(monkeypatch, lambda name: self.names.append(name) or configs.get_kernel(name))

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("linear_sums, backward_summaries", [("save", 0), ("recompute", 1)])
def test_saved_sums_are_not_made_again(linear_sums, backward_summaries, path, projected, monkeypatch):
    """One summaries launch in the forward; in the backward none with 'save', one with 'recompute'."""
    launches = _Launches(monkeypatch)
    q, k, v, grad, w, b, bm = _inputs(130, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = _forward(path, projected, "marginal", linear_sums, *leaves, w, b, bm)
    assert launches.take().count("summaries") == 1
    out.backward(grad)
    backward = launches.take()
    assert "dkdv" in backward  # the wrapper saw the backward's launches
    assert backward.count("summaries") == backward_summaries, backward


def test_second_backward_makes_released_sums_again(monkeypatch, poison_outputs):
    """The eager backward frees the saved sums after its pre-pass; a second backward through the same graph
    (retain_graph) finds them released, makes them again and gets the same gradients. (sla_branches: the projected
    op's backward also frees its O_s and O_l, which it cannot make again; see test_release.py.)"""
    launches = _Launches(monkeypatch)
    q, k, v, grad, w, b, bm = _inputs(130, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = _forward("eager", False, "marginal", "save", *leaves, w, b, bm)
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    launches.take()
    second = torch.autograd.grad(out, leaves, grad)
    assert launches.take().count("summaries") == 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("linear_scope, linear_sums", [("marginal", "save"), ("all", "save"),
                                                       ("marginal", "recompute"), ("none", "save")])
def test_forward_ops_fakes_give_the_sums_metadata(linear_scope, linear_sums):
    """The fakes' sums output (rows [BH, Nq|1, D D + D], or empty) has the real one's shape, strides and dtype."""
    q, k, v, _, _, _, bm = _inputs(201, torch.float32)
    args = (q, k, v, bm.block_class, bm.kv_num_blocks, bm.kv_indices, 64, 64, "softmax", linear_scope, linear_sums,
            "env")
    torch.library.opcheck(op.sla_forward, args, test_utils=("test_schema", "test_faketensor"))
    sums = op.sla_forward(*args)[-1]
    rows = {"marginal": bm.block_class.shape[2], "all": 1}.get(linear_scope)
    saved = linear_sums == "save" and rows is not None
    assert sums.shape == ((2, rows, D * D + D) if saved else (0,))


@pytest.mark.parametrize("linear_scope", ["marginal", "all"])
def test_backward_ops_take_the_sums(linear_scope):
    """The compiled backward's ops (compiled_backward): the first reads the saved sums; their fakes (checked
    against the real outputs) and schemas, the 0/1 matrix (scope 'marginal') or none ('all') between them."""
    q, k, v, grad, w, b, bm = _inputs(201, torch.float32)
    lists = (bm.block_class, bm.kv_num_blocks, bm.kv_indices, 64, 64, "softmax", linear_scope)
    _, o_s, o_l, lse, sums = op.sla_projected_forward(q, k, v, *lists, "save", "env", w, b)
    args = (grad, None, None, q, k, v, o_s, lse, *lists, w.to(grad.dtype), sums)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(backward_ops.sla_backward_queries, args, test_utils=checks)
    dq, delta, rows, marginal, do_kernel = backward_ops.sla_backward_queries(*args)
    assert do_kernel.numel() == 0  # the output gradient has q's layout: read in place
    assert (marginal.numel() == 0) == (linear_scope == "all")  # scope 'all' sums over every query block
    marginal = marginal if marginal.numel() else None
    torch.library.opcheck(backward_ops.sla_backward_key_rows, (rows, marginal, "ieee"), test_utils=checks)
    key_rows = backward_ops.sla_backward_key_rows(rows, marginal, "ieee")
    for summed, rows_in, marginal_in in ((True, key_rows, None), (False, rows, marginal)):
        torch.library.opcheck(backward_ops.sla_backward_key_grads, (grad, q, k, v, lse, delta, bm.block_class,
                                                                 rows_in, marginal_in, 64, 64, "softmax", summed),
                              test_utils=checks)


def test_compiled_layer_gradients_do_not_depend_on_linear_sums(block_map_kernels, monkeypatch):
    """Compiled (the sums a saved activation of the graph), 'save' and 'recompute' give identical gradients, and
    the eager layer's; a compiled step with 'save' launches the summaries kernel once (forward only)."""
    launches = _Launches(monkeypatch)
    g = torch.Generator().manual_seed(1)
    q, k, v, grad = (torch.randn(1, 2, 200, D, generator=g).to(DEVICE) for _ in range(4))
    compiled, eager = {}, {}
    for linear_sums in ("save", "recompute"):
        torch.manual_seed(0)
        layer = SparseLinearAttention(D, topk=0.5, negligible=0.25, linear_sums=linear_sums, backend="triton")
        torch.nn.init.normal_(layer.proj_l.weight, std=0.2)
        layer = layer.to(DEVICE)
        launches.take()
        compiled[linear_sums] = layer_step(torch.compile(layer, backend="aot_eager", fullgraph=True), q, k, v, grad)
        assert launches.take().count("summaries") == (1 if linear_sums == "save" else 2), linear_sums
        eager[linear_sums] = layer_step(layer, q, k, v, grad)
    for i, name in enumerate(("out", "dq", "dk", "dv", "dproj_w")):
        assert torch.equal(compiled["save"][i], compiled["recompute"][i]), name
        assert torch.equal(eager["save"][i], eager["recompute"][i]), name
        torch.testing.assert_close(compiled["save"][i], eager["save"][i], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("linear_sums", ["save", "recompute"])
@pytest.mark.parametrize("fused", [True, False])
def test_layer_passes_its_config_to_the_kernels(linear_sums, fused, monkeypatch):
    """SparseLinearAttention.from_config keeps linear_sums, and both of the layer's kernel paths (proj_l fused in
    the forward kernel, or the branches then proj_l as a module) hand it to the op."""
    config = SLAConfig(topk=0.5, linear_sums=linear_sums, backend="triton")
    layer = SparseLinearAttention.from_config(D, config).to(DEVICE)
    assert layer.config.linear_sums == linear_sums and f"linear_sums={linear_sums!r}" in repr(layer)
    if not fused:
        layer.proj_l.register_forward_hook(lambda *args: None)  # a hooked proj_l keeps the unfused path
    assert layer.fuses_projection(DEVICE) == fused
    launches = _Launches(monkeypatch)
    q, k, v, grad, *_ = _inputs(130, torch.float32)
    out = layer(*(t.requires_grad_() for t in (q, k, v)))
    launches.take()
    out.backward(grad)
    assert launches.take().count("summaries") == (linear_sums == "recompute")


@pytest.mark.parametrize("bad", ["Save", "none", None, 1])
def test_bad_linear_sums_is_named(bad):
    with pytest.raises(ValueError, match="linear_sums"):
        SLAConfig(linear_sums=bad)
    q, k, v, _, w, b, bm = _inputs(64, torch.float32)
    for call in (lambda: sparse_linear_attention(q, k, v, bm, w, b, linear_sums=bad),
                 lambda: sparse_linear_attention(q, k, v, bm, linear_sums=bad),
                 lambda: sla_branches(q, k, v, bm, linear_sums=bad)):
        with pytest.raises(ValueError, match=repr(bad).replace("'", ".")):
            call()
