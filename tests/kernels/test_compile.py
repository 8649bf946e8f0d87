"""torch.compile of the SLA layer on the Triton-kernel path: one graph, no graph break, forward and backward.

Every Triton launch of the layer (block sums, ranking, the attention forward / backward, the transposed lists inside
the backward) is a torch.library custom op with a fake implementation, so dynamo never traces into Triton. Whole DiT
blocks can then be compiled, and ``mode="reduce-overhead"`` (CUDA graphs) removes the host time that bounds the layer
up to ~16K tokens. On CPU the kernels run in the Triton interpreter; the block map, which by default takes its
PyTorch path off CUDA, is forced onto its kernels as on a GPU (the ``block_map_kernels`` fixture).
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from sla_dist import SparseLinearAttention
from sla_dist.kernels.configs import DKDV_CHUNKS_ENV
from sla_dist.kernels.summary_rows import gradient_views
from tests.utils import DEVICE, HAS_CUDA

from .harness import KernelArgs, MatrixProducts, layer_step, relative_error

BLOCK_MAP_OPS = ("sla_dist.block_sums.default", "sla_dist.rank_blocks.default")


def _layer(seed: int = 0) -> SparseLinearAttention:
    torch.manual_seed(seed)
    layer = SparseLinearAttention(32, topk=0.5, negligible=0.25, backend="triton")
    torch.nn.init.normal_(layer.proj_l.weight, std=0.2)  # a zero proj_l would hide the linear branch
    return layer.to(DEVICE)


def _inputs(L: int, seed: int):
    """Float32 inputs on the test device: the interpreter on CPU, the compiled kernels on a GPU."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 1, L, 32, generator=g).to(DEVICE) for _ in range(4))


def test_layer_compiles_to_one_graph(block_map_kernels):
    q, k, v, _ = _inputs(200, seed=1)
    explained = torch._dynamo.explain(_layer())(q, k, v)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
    ops = {str(node.target) for node in explained.graphs[0].graph.nodes}
    assert {*BLOCK_MAP_OPS, "sla_dist.sla_projected_forward.default"} <= ops, sorted(ops)  # proj_l in the kernel


def test_compiled_layer_matches_eager(block_map_kernels):
    layer = _layer()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):
        inputs = _inputs(200, seed)
        want, got = layer_step(layer, *inputs), layer_step(compiled, *inputs)
        for name, g, w in zip(("out", "dq", "dk", "dv", "dproj_w"), got, want):
            torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")


def test_compiled_layer_makes_dol_in_the_prepass(block_map_kernels):
    """Compiled, the layer's backward takes the eager route: the op's unused outputs (O_s, O_l, lse) get None
    gradients, not zeros, so dO_l = dOut W is made in the pre-pass (on a GPU a tf32 tile product for float32
    inputs) and the only PyTorch product is dW [D, D]. With zeros the backward took the PyTorch GEMM (IEEE float32
    on a GPU): compiled and eager gradients then differed on the H200 (dk by 0.004)."""
    compiled = torch.compile(_layer(), backend="aot_eager", fullgraph=True)
    q, k, v, grad = _inputs(200, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    with MatrixProducts() as products:
        out.backward(grad)
    assert (32, 32) in products.shapes, products.shapes  # dW: the mode saw the compiled backward's products
    assert all(math.prod(shape) < q.numel() for shape in products.shapes), products.shapes


@pytest.mark.parametrize("chunked", [False, True])
def test_compiled_backward_launches_as_the_eager_one(chunked, block_map_kernels, monkeypatch):
    """The compiled backward is three custom ops (compiled_backward) on the eager backward's code: the same
    launches in the same order, and the same gradients bit for bit, in one dK/dV launch (the key-block rows summed by
    the op between) and with SLA_DIST_DKDV_CHUNKS in chunks of heads (planned when the graph is traced, each chunk's
    rows summed by the dK/dV op: three launches over B 2 x H 2 heads, across the batch boundary)."""
    if chunked:
        monkeypatch.setenv(DKDV_CHUNKS_ENV, "auto")
        monkeypatch.setattr("sla_dist.kernels.backward_ops.dkdv_head_chunks",
                            lambda bh, *sizes: ((0, 1), (1, 3), (3, bh)))
    else:
        monkeypatch.delenv(DKDV_CHUNKS_ENV, raising=False)
    torch._dynamo.reset()  # the chunk plan is fixed when the backward is traced: no graph of another test's plan
    launches = KernelArgs("BH_FIRST")  # records the dK/dV launches' first heads
    monkeypatch.setattr("sla_dist.kernels.backward_ops.get_kernel", launches)
    layer = _layer()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(4)
    q, k, v, grad = (torch.randn(2, 2, 201, 32, generator=g).to(DEVICE) for _ in range(4))
    want = layer_step(layer, q, k, v, grad)
    eager_launches = list(launches.seen)
    layer_step(compiled, q, k, v, grad)  # compiles
    launches.seen.clear()
    got = layer_step(compiled, q, k, v, grad)
    assert launches.seen == eager_launches == [("dkdv", first) for first in ((0, 1, 3) if chunked else (0,))]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dproj_w"), got, want):
        assert torch.equal(a, b), (name, (a - b).abs().max())


def test_one_graph_serves_every_length(block_map_kernels):
    """With dynamic shapes (what torch.compile switches to when a length changes) the block counts stay symbolic:
    one graph, no recompilation per length, and the eager layer's output at each length (odd, partial blocks)."""
    layer = _layer()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    with torch.no_grad():
        for L in (200, 333):
            q, k, v, _ = _inputs(L, seed=L)
            torch.testing.assert_close(compiled(q, k, v), layer(q, k, v), msg=lambda m: f"L={L}: {m}")
            frames.append(counter.frame_count)
    assert frames[0] == frames[1], f"recompiled for the second length: {frames} frames"


@pytest.mark.parametrize("op, args", [
    ("block_sums", lambda x: (x, 64, 5)),  # one zero-padded block past the sequence, as context parallelism pads
    ("rank_blocks", lambda x: (x[0, :, :3, :4].float(), 2, 1)),
    ("transposed_lists", lambda x: (torch.randint(0, 3, (1, 2, 3, 4), dtype=torch.int8, device=x.device),)),
])
def test_block_map_ops_have_fake_implementations(op, args):
    x = torch.randn(1, 2, 200, 32, device=DEVICE)
    torch.library.opcheck(getattr(torch.ops.sla_dist, op).default, args(x),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_reduce_overhead_layer_replays_eager_results():
    """The layer compiled with CUDA graphs (fullgraph: a graph break is an error) gives the eager layer's output and
    gradients on two input sets, each run twice: warm-up, recording, then replays that must read their own inputs."""
    torch.manual_seed(0)
    layer = SparseLinearAttention(64, topk=0.1, BLKQ=128).to(DEVICE)
    torch.nn.init.normal_(layer.proj_l.weight, std=0.1)
    sets = []
    for seed in (1, 2):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        sets.append([torch.randn(2, 3, 1001, 64, generator=g, device=DEVICE, dtype=torch.bfloat16) for _ in range(4)])
    want = [layer_step(layer, *inputs) for inputs in sets]
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for i in (0, 1, 0, 1):
        torch.compiler.cudagraph_mark_step_begin()
        got = layer_step(compiled, *sets[i])
        for name, a, b in zip(("out", "dq", "dk", "dv", "dproj_w"), got, want[i]):
            assert torch.isfinite(a).all(), name
            assert relative_error(a, b.double()) < 1e-2, (i, name, relative_error(a, b.double()))
    assert relative_error(want[0][0], want[1][0].double()) > 0.5  # the two sets are told apart


@pytest.mark.parametrize("layout", ["sliced", "dit"])
def test_fake_outputs_have_the_kernels_strides(layout, block_map_kernels):
    """Inductor asserts that a custom op's outputs have the strides its fake gave. The ops re-lay out inputs whose
    strides disagree (q a [B, L, H, D] view, the output gradient contiguous, as inductor may make it) or that are not
    dense (a sliced sequence), and read v with strides of its own (dv then takes k's layout), so the fakes must make
    the same choice: a compiled DiT step on the H200 failed with "expected ... stride 4193280==128" in the backward
    op before they did. The backward's three ops (compiled_backward) are checked in turn, each output's shape and
    dtype too. sliced: q, k, v sliced along the sequence; dit: q, k [B, L, H, D] views and v a slice of a fused
    [B, L, 3 H D] qkv projection, as in VideoDiT."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sla_dist.kernels.block_map import predict_block_map

    layer = _layer()
    g = torch.Generator().manual_seed(3)
    if layout == "sliced":
        # Batch 2: with one sample, a slice along the sequence would still be dense (a permuted contiguous layout).
        q, k, v = (torch.randn(2, 201, 2, 32, generator=g).to(DEVICE).transpose(1, 2)[:, :, :200] for _ in range(3))
    else:
        q, k = (torch.randn(2, 200, 2, 32, generator=g).to(DEVICE).transpose(1, 2) for _ in range(2))
        v = torch.randn(2, 200, 3 * 64, generator=g).to(DEVICE)[..., 128:].unflatten(-1, (2, 32)).transpose(1, 2)
    block_map = predict_block_map(q, k, topk=0.5, negligible=0.25)
    lists = (block_map.block_class, block_map.kv_num_blocks.contiguous(), block_map.kv_indices.contiguous(),
             block_map.block_q, block_map.block_k, "softmax", "marginal")
    weight, bias = layer.proj_l.weight.detach(), layer.proj_l.bias.detach()
    forward_args = (q, k, v, *lists, "save", "env", weight, bias)
    ops = torch.ops.sla_dist

    def strides(outputs):
        return [t.stride() for t in outputs]

    def backward(do, dol, q, k, v, o_s, lse, sums):
        """Every output of the compiled backward's three ops, called as backward_ops.compiled_backward calls them."""
        dq, delta, rows, marginal, do_kernel = ops.sla_backward_queries(do, dol, None, q, k, v, o_s, lse, *lists, None,
                                                                        sums)
        key_rows = ops.sla_backward_key_rows(rows, marginal, "ieee")
        dkv = ops.sla_backward_key_grads(do_kernel if do_kernel.numel() else do, q, k, v, lse, delta, lists[0],
                                         key_rows, None, *lists[3:6], True)
        return dq, delta, rows, marginal, do_kernel, key_rows, dkv

    outputs = ops.sla_projected_forward(*forward_args)  # (out, O_s, O_l, lse, sums)
    _, o_s, o_l, lse, sums = outputs
    do, dol = (torch.randn(o_s.shape, generator=g).to(DEVICE) for _ in range(2))  # contiguous: not O_s's layout
    backward_args = (do, dol, q, k, v, o_s, lse, sums)
    grads = backward(*backward_args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in forward_args]
        assert strides(ops.sla_projected_forward(*fake)) == strides(outputs)
        fake = [mode.from_tensor(t) for t in backward_args]
        assert [(t.shape, t.stride(), t.dtype) for t in backward(*fake)] == [(t.shape, t.stride(), t.dtype)
                                                                           for t in grads]
    dq, do_kernel = grads[0], grads[4]
    dk, dv = gradient_views(grads[-1], k.shape[2])  # from summed key rows: a stack in k's layout
    if layout == "sliced":
        assert q.stride() != dq.stride()  # the backward did re-lay out q: the case is exercised
    else:
        assert v.stride() != k.stride() and dv.stride() == k.stride()
        assert do_kernel.stride() == q.stride()  # dO copied into q's layout once, by the first op
