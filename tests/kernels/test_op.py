"""The operator's contract beyond the numeric grid: cross lengths, strided inputs, the differentiable LSE of
sla_branches, the custom-op registration (fake kernels, torch.compile) and input errors."""

import dataclasses
import math

import pytest
import torch

from sla_dist.kernels.block_map import CRITICAL, MARGINAL, BlockMap, build_block_map, predict_block_map
from sla_dist.kernels import backward_ops, configs, layout, op, projection, summary_rows
from sla_dist.kernels.op import sla_branches, sla_forward, sla_projected_forward, sparse_linear_attention
from sla_dist.kernels.reference import sla_branches_ref, sla_reference
from tests.utils import DEVICE

from .harness import (GRAD_FACTOR, OUTPUT_FACTOR, KernelArgs, MatrixProducts, SLACase, assert_within_reference_error,
                      compare, patch_launchers, relative_error)


def _qkv(B, H, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, Lk, D, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().requires_grad_() for t in tensors]  # with the tensors' strides (a clone densifies a gap)
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def _assert_close_to_float64(got, want, tol=1e-5):
    for g, w in zip(got, want):
        assert relative_error(g, w) < tol


def _assert_kernel_matches_float64(q, k, v, bm, w, grad_out):
    """The kernels' output and input gradients against the float64 reference's (linear branch projected by w)."""
    got = _grads(lambda q, k, v: sparse_linear_attention(q, k, v, bm, w, None), (q, k, v), grad_out)
    want = _grads(lambda q, k, v: sla_reference(q, k, v, bm, w.double(), None), [t.double() for t in (q, k, v)],
                  grad_out.double())
    _assert_close_to_float64(got, want)


def test_query_and_key_lengths_may_differ(poison_outputs):
    q, k, v = _qkv(1, 2, 300, 777, 64)
    w = torch.randn(64, 64, device=DEVICE) * 0.1
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)
    g = torch.randn_like(q)
    _assert_kernel_matches_float64(q, k, v, bm, w, g)


def test_strided_views_are_read_in_place(poison_outputs):
    """A [B, L, H, D] projection viewed as [B, H, L, D], and the valid prefix of a padded sequence."""
    B, L, H, D = 1, 500, 2, 64
    base = [torch.randn(B, L + 76, H, D, device=DEVICE) for _ in range(3)]
    q, k, v = (t[:, :L].transpose(1, 2) for t in base)
    assert not q.is_contiguous()
    bm = predict_block_map(q, k, topk=0.25, negligible=0.1)
    w = torch.randn(D, D, device=DEVICE) * 0.1
    g = torch.randn(B, H, L, D, device=DEVICE)
    _assert_kernel_matches_float64(q, k, v, bm, w, g)


@pytest.mark.parametrize("layout, dtype, split", [("dit", torch.float32, False), ("sliced", torch.float16, False),
                                                  ("dit", torch.float16, True)])
def test_values_are_read_in_place(layout, dtype, split, monkeypatch, poison_outputs):
    """v is read with strides of its own whenever its last one is 1: every kernel that reads it (forward, summaries,
    dQ, dK/dV) is given the caller's tensor, not a copy, and the output and gradients stay within the harness
    factors of the float64 reference. dit: as in VideoDiT, q and k RoPE outputs ([B, L, H, D] viewed as [B, H, L, D])
    and v the last third of the fused qkv projection [B, L, 3 H D] (rows 3 H D apart); sliced: v the valid prefix of
    a padded [B, L + 7, H, D] sequence (not dense), k contiguous. Both were copied into k's layout before. ``split``:
    the forward in its split variant (two programs per 128-row query block)."""
    B, L, H, D = 2, 333, 2, 32
    g = torch.Generator().manual_seed(5)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    q, k, grad = (randn(B, L, H, D).transpose(1, 2) for _ in range(3))
    if layout == "dit":
        v = randn(B, L, 3 * H * D)[..., 2 * H * D:].unflatten(-1, (H, D)).transpose(1, 2)
    else:
        k, v = k.contiguous(), randn(B, L + 7, H, D)[:, :L].transpose(1, 2)
    assert v.stride() != k.stride() and v.stride(-1) == 1
    inputs = dict(q=q, k=k, v=v, w=randn(D, D, scale=D**-0.5), b=randn(D, scale=0.1), grad=grad)
    c = SLACase(B, H, L, D, dtype, topk=0.25, negligible=0.1, feature_map="softmax", linear_scope="marginal",
                block_q=128 if split else 64, device=DEVICE)
    if split:
        monkeypatch.setenv(configs.FWD_LOOP_ENV, "split+fma")
    launches = KernelArgs("V")
    patch_launchers(monkeypatch, launches)
    assert_within_reference_error(compare(c, inputs))
    assert {name for name, _ in launches.seen} == {"fwd_split" if split else "fwd", "summaries", "dq", "dkdv"}
    for name, value in launches.seen:
        assert (value.data_ptr(), value.stride()) == (v.data_ptr(), v.stride()), f"{name} read a copy of v"


def test_kernel_layout_keeps_a_dense_first_tensor():
    """The q-side tensors share one set of strides: a dense first tensor (q in a [B, L, H, D] layout) is kept and
    the others (a contiguous output gradient) are copied into its layout; a gapped first one makes all contiguous."""
    q = torch.randn(2, 9, 3, 4).transpose(1, 2)
    do = torch.randn(2, 3, 9, 4)
    kept, copied = layout.kernel_layout(q, do)
    assert kept is q and copied.stride() == q.stride() and torch.equal(copied, do)
    assert all(t.is_contiguous() for t in layout.kernel_layout(q[:, :, :5], do[:, :, :5]))


@pytest.mark.parametrize("has_dol", [False, True])
def test_backward_copies_the_output_gradient_once(has_dol):
    """q and O_s in a [B, L, H, D] layout, the output gradient contiguous (as Inductor may make it in a compiled DiT):
    the backward copies dO into q's layout once, and a dO_l only where one was given. Without one, dO stands in for
    it and was copied a second time (a q-sized copy no kernel read)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.copy_.default
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(1, 9, 2, 32).to(DEVICE).transpose(1, 2) for _ in range(3))
    o = layout.output_like(q)
    do, dol = (torch.randn(1, 2, 9, 32).to(DEVICE) for _ in range(2))
    with Copies() as copies:
        q_, _, _, o_, do_, dol_ = backward_ops.backward_layout(do, dol if has_dol else None, q, k, v, o, "marginal")
    assert copies.count == 1 + has_dol
    assert q_ is q and o_ is o and do_.stride() == q.stride() and torch.equal(do_, do)
    assert dol_.stride() == q.stride() and (torch.equal(dol_, dol) if has_dol else dol_ is do_)


def test_lse_is_differentiable_for_merging(poison_outputs):
    """Merge the sparse branch with a second attention part by LSE, as joint text+video attention does."""
    q, k, v = _qkv(1, 2, 200, 200, 32)
    k2, v2 = _qkv(1, 2, 40, 40, 32, seed=1)[1:]
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)

    def merged(branches, q, k, v, k2, v2):
        o_s, o_l, lse = branches(q, k, v, bm, feature_map="elu", linear_scope="marginal")
        s2 = q @ k2.transpose(-1, -2) / 32**0.5
        lse2 = torch.logsumexp(s2, -1)
        lse_all = torch.logaddexp(lse, lse2)
        o2 = torch.softmax(s2, -1) @ v2
        o = o_s * (lse - lse_all).exp()[..., None] + o2 * (lse2 - lse_all).exp()[..., None]
        return o + 0.5 * o_l + 0.1 * lse[..., None]

    g = torch.randn_like(q)
    got = _grads(lambda *t: merged(sla_branches, *t), (q, k, v, k2, v2), g)
    want = _grads(lambda *t: merged(sla_branches_ref, *t), [t.double() for t in (q, k, v, k2, v2)], g.double())
    _assert_close_to_float64(got, want)


@pytest.mark.parametrize("projected", [False, True])
def test_custom_op_registration(projected):
    q, k, v = _qkv(1, 1, 130, 130, 32)
    bm = predict_block_map(q, k, topk=0.5, negligible=0.0)
    args = (q, k, v, bm.block_class, bm.kv_num_blocks, bm.kv_indices, 64, 64, "softmax", "marginal", "save", "env")
    if projected:
        args += (torch.randn(32, 32, device=DEVICE), torch.randn(32, device=DEVICE))
    torch.library.opcheck(sla_projected_forward if projected else sla_forward, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bias, layout", [(True, "BHLD"), (False, "BLHD")])
def test_projection_in_the_forward_kernel(bias, layout, monkeypatch, poison_outputs):
    """With a weight, O_s + O_l W^T + b is made in the forward kernel's epilogue (the separate projection is not
    called); its output and the gradients of q, k, v, W and b match the float64 reference, also for tensors in a
    [B, L, H, D] layout viewed as [B, H, L, D] (the backward's products then run over rows in memory order)."""
    monkeypatch.setattr(op, "project_branches", None)  # the unfused path would fail
    q, k, v, grad_out = _qkv(1, 2, 150, 150, 32) + _qkv(1, 2, 150, 150, 32, seed=1)[:1]
    if layout == "BLHD":
        q, k, v, grad_out = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, grad_out))
    g = torch.Generator().manual_seed(2)
    proj = [(torch.randn(32, 32, generator=g) * 32**-0.5).to(DEVICE), (torch.randn(32, generator=g) * 0.1).to(DEVICE)]
    proj = proj if bias else proj[:1]
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)
    got = _grads(lambda q, k, v, *p: sparse_linear_attention(q, k, v, bm, *p), (q, k, v, *proj), grad_out)
    want = _grads(lambda q, k, v, *p: sla_reference(q, k, v, bm, *p), [t.double() for t in (q, k, v, *proj)],
                  grad_out.double())
    assert len(got) == len(want) == 5 + bias
    _assert_close_to_float64(got, want)


def test_half_inputs_with_float32_projection(poison_outputs):
    """float16 q, k, v with float32 proj_l (autocast's master weights): the kernel reads W and b as stored and rounds
    W like O_l. Against float64, its output and gradients stay within the harness factors of the unfused path that
    casts W and b to float16 first (as autocast does), and dW, db come back in float32."""
    q, k, v, grad_out = (t.half() for t in _qkv(1, 2, 131, 131, 32) + _qkv(1, 2, 131, 131, 32, seed=1)[:1])
    g = torch.Generator().manual_seed(3)
    w, b = (torch.randn(32, 32, generator=g) * 32**-0.5).to(DEVICE), (torch.randn(32, generator=g) * 0.1).to(DEVICE)
    bm = predict_block_map(q, k, topk=0.25, negligible=0.1)

    def unfused(q, k, v, w, b):
        o_s, o_l, _ = sla_branches(q, k, v, bm)
        return o_s + torch.nn.functional.linear(o_l, w.half(), b.half())

    fused = _grads(lambda q, k, v, w, b: sparse_linear_attention(q, k, v, bm, w, b), (q, k, v, w, b), grad_out)
    unfused = _grads(unfused, (q, k, v, w, b), grad_out)
    exact = _grads(lambda q, k, v, w, b: sla_reference(q, k, v, bm, w, b), [t.double() for t in (q, k, v, w, b)],
                   grad_out.double())
    assert fused[0].dtype == torch.float16 and fused[4].dtype == fused[5].dtype == torch.float32
    for name, f, u, e in zip(("out", "dq", "dk", "dv", "dW", "db"), fused, unfused, exact):
        factor = OUTPUT_FACTOR if name == "out" else GRAD_FACTOR
        assert relative_error(f, e) <= factor * relative_error(u, e), (name, relative_error(f, e), relative_error(u, e))


def test_projected_backward_makes_no_q_sized_product(poison_outputs):
    """dO_l = dOut W is made in the backward's pre-pass from dOut (one tile product per query block): the only
    PyTorch product left in the projected layer's backward is the [D, D] dW, none has a q-sized output."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 200, 200, 32))
    w = (torch.randn(32, 32, device=DEVICE) * 0.2).requires_grad_()
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)
    out = sparse_linear_attention(q, k, v, bm, w, None)
    with MatrixProducts() as products:
        out.backward(torch.randn_like(out))
    assert (32, 32) in products.shapes, products.shapes  # dW: the mode saw the backward's products
    assert all(math.prod(shape) < q.numel() for shape in products.shapes), products.shapes


@pytest.mark.parametrize("used", [("out", "o_l"), ("out", "o_s"), ("out", "o_s", "o_l", "lse")])
def test_projected_op_takes_gradients_of_every_output(used, poison_outputs):
    """The projected op's O_s, O_l and lse may take gradients besides its output: a stored dO_l is added to the
    pre-pass' dOut W, and a gradient of O_s (after which the kernels' dO_s is no longer dOut) moves dOut W back into
    a PyTorch product. Same gradients as the unprojected op with the projection in PyTorch."""
    q, k, v = _qkv(1, 2, 150, 150, 32)
    g = torch.Generator().manual_seed(4)
    w, b = (torch.randn(32, 32, generator=g) * 0.2).to(DEVICE), (torch.randn(32, generator=g) * 0.1).to(DEVICE)
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)
    lists = (bm.block_class, bm.kv_num_blocks, bm.kv_indices, bm.block_q, bm.block_k, "softmax", "marginal", "save",
             "env")
    weights = {name: torch.randn(q.shape, generator=g).to(DEVICE) for name in ("out", "o_s", "o_l", "lse")}

    def loss(outputs):
        return sum((outputs[name] * weights[name][..., : outputs[name].shape[-1]]).sum() for name in used)

    def projected(q, k, v, w, b):
        out, o_s, o_l, lse, _ = sla_projected_forward(q, k, v, *lists, w, b)
        return loss(dict(out=out, o_s=o_s, o_l=o_l, lse=lse[..., None]))

    def unprojected(q, k, v, w, b):
        o_s, o_l, lse, _ = sla_forward(q, k, v, *lists)
        out = o_s + torch.nn.functional.linear(o_l, w, b)
        return loss(dict(out=out, o_s=o_s, o_l=o_l, lse=lse[..., None]))

    grads = []
    for fn in (projected, unprojected):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, w, b)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(("dq", "dk", "dv", "dW", "db"), *grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n", [1, 255, 256, 300, 1024])
def test_column_sums_cover_every_row(n):
    """The bias gradient's two-stage sum (float32 partials over chunks of rows, then their sum) counts every row,
    the chunks' and the ones left over, once."""
    rows = torch.randn(n, 8, generator=torch.Generator().manual_seed(n)).to(DEVICE, torch.bfloat16)
    got = projection.column_sums(rows)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), rows.double().sum(0), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("nk, padded", [(7, 7), (64, 64), (67, 72)])
def test_sums_contract_over_aligned_key_blocks(nk, padded, poison_outputs):
    """From PAD_FROM_BLOCKS key blocks on, the 0/1 products contract over a multiple of SUM_BLOCK_ALIGN key blocks
    (what cuBLAS's aligned kernels need): M's extra columns are 0 and the summary rows they meet are 0, not unset,
    so the sums equal the unpadded ones; the transposed sum's extra rows are 0."""
    gen = torch.Generator().manual_seed(nk)
    block_class = torch.randint(0, 3, (1, 2, 5, nk), generator=gen, dtype=torch.int8).to(DEVICE)
    m = summary_rows.marginal_matrix(block_class, "marginal", torch.float32)
    assert m.shape[-1] == padded
    dense = (block_class == MARGINAL).flatten(0, 1).float()
    assert torch.equal(m[..., :nk], dense) and not m[..., nk:].any()
    L, D = nk * 16 - 3, 16
    k, v = (torch.randn(1, 2, L, D, generator=gen).to(DEVICE) for _ in range(2))
    p = layout.problem(k, k, v, 16, 16, "softmax", True, configs.interpreting())
    hz = summary_rows.summary_rows(nk, k, p)
    configs.get_kernel("summaries")[(nk, p.bh)](k, v, hz, *p.kv_strides, p.H, p.Lk, nk, D=D, BLOCK_K=16,
                                                  FEATURE_MAP=p.feature_map, PRECISION=p.precision)
    torch.testing.assert_close(summary_rows.linear_totals(k, v, m, p), dense @ hz, rtol=1e-5, atol=1e-5)
    y = torch.randn(2, 5, 3, generator=gen).to(DEVICE)
    back = summary_rows.sum_over_scope(y, m, p.precision, transpose=True)
    torch.testing.assert_close(back[:, :nk], dense.transpose(1, 2) @ y)
    assert not back[:, nk:].any()


@pytest.mark.parametrize("weight, bias, match", [
    ((32, 16), None, r"proj_weight must be \[32, 32\] for head dim 32; got shape \(32, 16\)"),
    ((32, 32), (1, 32), r"proj_bias must be \[32\] for head dim 32; got shape \(1, 32\)"),
])
def test_bad_projection_names_the_shape(weight, bias, match):
    q, k, v = _qkv(1, 1, 130, 130, 32)
    bm = predict_block_map(q, k, topk=0.5, negligible=0.0)
    with pytest.raises(ValueError, match=match):
        sparse_linear_attention(q, k, v, bm, torch.ones(weight, device=DEVICE),
                                None if bias is None else torch.ones(bias, device=DEVICE))


def test_torch_compile_traces_through_the_op():
    q, k, v = _qkv(1, 2, 200, 200, 64)
    w = torch.randn(64, 64, device=DEVICE) * 0.1
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)

    def f(q, k, v):
        return sparse_linear_attention(q, k, v, bm, w, None)

    g = torch.randn_like(q)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, eager = _grads(compiled, (q, k, v), g), _grads(f, (q, k, v), g)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "shapes, dtype, error, match",
    [
        (((1, 2, 64, 32), (1, 2, 64, 32), (1, 2, 64)), torch.float32, ValueError, "rank 3"),
        (((1, 2, 64, 32), (1, 3, 64, 32), (1, 3, 64, 32)), torch.float32, ValueError, "shapes do not fit"),
        (((1, 2, 64, 48),) * 3, torch.float32, NotImplementedError, "head dim 48"),
        (((1, 2, 64, 32),) * 3, torch.float64, NotImplementedError, "float64"),
    ],
)
def test_bad_inputs(shapes, dtype, error, match):
    q, k, v = (torch.randn(*s, dtype=dtype, device=DEVICE) for s in shapes)
    bm = predict_block_map(q, q, topk=0.5, negligible=0.0) if q.dim() == 4 else None
    with pytest.raises(error, match=match):
        sparse_linear_attention(q, k, v, bm)


def test_block_map_must_fit():
    q, k, v = _qkv(1, 2, 200, 200, 32)
    bm = predict_block_map(q[:, :, :100], k[:, :, :100], topk=0.5, negligible=0.0)
    with pytest.raises(ValueError, match="does not fit"):
        sparse_linear_attention(q, k, v, bm)


def _variant_counts() -> int:
    from sla_dist.kernels.configs import _KERNELS

    return max(len(t.metas()) for t in _KERNELS.values())


@pytest.mark.parametrize("variant", range(1, _variant_counts()))
def test_other_tile_shapes(variant, monkeypatch, poison_outputs):
    """Every tile-shape choice the autotuner may pick must agree too (the fixed setting, tested everywhere else, is
    each kernel's first): run ``variant`` launches each kernel with its variant-th combination of choices (its last
    one when it has fewer). Covers two key blocks per step (odd list lengths leave the last step half empty), query
    blocks in row slices, dK/dV accumulated transposed."""
    from dataclasses import replace

    from sla_dist.kernels import configs

    for name, tuning in configs._KERNELS.items():
        metas = tuning.metas()
        chosen = metas[min(variant, len(metas) - 1)]
        monkeypatch.setitem(configs._KERNELS, name,
                            replace(tuning, choices=tuple((key, (value,)) for key, value in chosen.items())))
    configs.get_kernel.cache_clear()
    try:
        q, k, v = _qkv(1, 2, 1000, 1000, 64)
        bm = predict_block_map(q, k, topk=0.2, negligible=0.1, block_q=128)  # 3 critical blocks of 16
        w = torch.randn(64, 64, device=DEVICE) * 0.1
        g = torch.randn_like(q)
        _assert_kernel_matches_float64(q, k, v, bm, w, g)
    finally:
        configs.get_kernel.cache_clear()


@pytest.mark.parametrize("linear_sums", ["save", "recompute"])
def test_backward_saves_no_per_key_block_summaries(linear_sums):
    """The linear branch's per-key-block [D, D] summaries grow with L: nothing of that shape is kept alive between
    forward and backward (the [D, D] proj_l weight itself is 2-D). Of the per-query-block sums, linear_sums 'save'
    keeps their one [BH, Nq, D D + D] buffer of rows, 'recompute' nothing."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 300, 300, 32))
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sparse_linear_attention(q, k, v, bm, torch.randn(32, 32, device=DEVICE), None,
                                linear_sums=linear_sums).sum().backward()
    assert saved  # the hooks saw the forward's saved tensors
    per_block = [s for s in saved if len(s) >= 3 and s[-2:] == (32, 32)]
    assert not per_block, f"saved per-block [D, D] tensors of shapes {per_block}"
    rows = [s for s in saved if len(s) >= 3 and s[-1] == 32 * 32 + 32]
    assert rows == ([(2, bm.block_class.shape[2], 32 * 32 + 32)] if linear_sums == "save" else []), saved


@pytest.mark.parametrize("D, dtype, linear_scope, in_rows", [
    (64, torch.float32, "marginal", True),  # rows in v's dtype, D a multiple of BLOCK_K 64
    (128, torch.float32, "marginal", True),
    (32, torch.float32, "marginal", False),  # D < BLOCK_K: dh_j does not fill a slab
    (64, torch.float16, "marginal", False),  # float32 summaries of float16 inputs
    (64, torch.float32, "all", False),  # one total row per head
])
def test_dk_and_dv_take_the_key_rows_place(D, dtype, linear_scope, in_rows, poison_outputs):
    """dK/dV stores dk and dv over the key-block rows it reads (summary_rows.key_rows_in_slabs) where those rows are
    in v's dtype, one per key block, D a multiple of BLOCK_K: the two gradients then share that one buffer, which
    is laid out heads-first with the padded key blocks' rows; elsewhere they are a stack in k's layout. Values: the
    numeric grid."""
    leaves = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in _qkv(1, 2, 200, 333, D, dtype)]
    q, k, v = (t.clone() for t in leaves)  # [B, L, H, D] memory; not leaves, whose .grad autograd re-lays out
    grads = {}
    k.register_hook(lambda g: grads.__setitem__("dk", g))
    v.register_hook(lambda g: grads.__setitem__("dv", g))
    bm = predict_block_map(q, k, topk=0.3, negligible=0.1)
    w = torch.randn(D, D, device=DEVICE, dtype=dtype) * 0.1
    sparse_linear_attention(q, k, v, bm, w, linear_scope=linear_scope).float().sum().backward()
    dk, dv = grads["dk"], grads["dv"]
    assert dk.untyped_storage().data_ptr() == dv.untyped_storage().data_ptr()
    assert dk.isfinite().all() and dv.isfinite().all()
    if in_rows:  # heads-first over the slabs' 6 key blocks of 64 rows: not k's [B, L, H, D] strides
        assert dv.stride() == (2 * 6 * 64 * D, 6 * 64 * D, D, 1) and dk.stride() == dv.stride()
        assert dk.untyped_storage().nbytes() == max(D // 64, 2) * dv.stride(0) * dv.element_size()
    else:
        assert dk.stride() == dv.stride() == k.stride()


def _map_with_critical_rows(rows: list[list[int]], L: int = 130) -> BlockMap:
    """A hand-built map over L tokens in blocks of 64: rows[i] lists query block i's critical key blocks, the others
    are marginal; the lists are built from the classes, so the map is valid."""
    n = -(-L // 64)
    block_class = torch.full((1, 1, n, n), MARGINAL, dtype=torch.int8)
    for i, row in enumerate(rows):
        block_class[0, 0, i, row] = CRITICAL
    return build_block_map(block_class.to(DEVICE), L, L, 64, 64)


def test_row_without_critical_block_gives_zero_in_kernel_and_reference(poison_outputs):
    """Only a hand-built map can leave a query block without critical blocks: O_s = 0 and lse = -inf there in both
    backends, and the gradients agree."""
    q, k, v = _qkv(1, 1, 130, 130, 32)
    bm = _map_with_critical_rows([[0, 2], [], [1]])
    for branches, dtype in ((sla_branches, torch.float32), (sla_branches_ref, torch.float64)):
        o_s, _, lse = branches(*(t.to(dtype) for t in (q, k, v)), bm)
        assert (o_s[0, 0, 64:128] == 0).all() and (lse[0, 0, 64:128] == float("-inf")).all(), branches.__name__
        assert torch.isfinite(o_s).all() and torch.isfinite(lse[0, 0, :64]).all()
    w = torch.randn(32, 32, device=DEVICE) * 0.1
    g = torch.randn_like(q)
    _assert_kernel_matches_float64(q, k, v, bm, w, g)


def _broken(bm: BlockMap, which: str) -> BlockMap:
    kv_num, kv_idx = bm.kv_num_blocks.clone(), bm.kv_indices.clone()
    if which == "out of range":
        kv_idx[0, 0, 2, 0] = 3  # query block 2 lists key block 3 of 0..2 instead of 1
    elif which == "negative":
        kv_idx[0, 0, 0, 1] = -1
    elif which == "too narrow":
        kv_num[0, 0, 0] = kv_idx.shape[-1] + 1
    elif which == "not critical":
        kv_idx[0, 0, 2, 0] = 0
    return dataclasses.replace(bm, kv_num_blocks=kv_num, kv_indices=kv_idx)


@pytest.mark.parametrize("fn", [sparse_linear_attention, sla_reference])
@pytest.mark.parametrize("which, match", [
    ("out of range", r"kv_indices\(0, 0, 2, 0\) = 3 is outside \[0, Nk=3\)"),
    ("negative", r"kv_indices\(0, 0, 0, 1\) = -1 is outside"),
    ("too narrow", r"kv_num_blocks\(0, 0, 0\) = 3 is outside \[0, W=2\]"),
    ("not critical", r"kv_indices\(0, 0, 2\)\[:1\] = \[0\] must list each CRITICAL key block"),
])
def test_hand_built_map_values_are_checked(fn, which, match):
    q, k, v = _qkv(1, 1, 130, 130, 32)
    bm = _broken(_map_with_critical_rows([[0, 2], [1], [1]]), which)
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, bm, torch.eye(32, device=DEVICE))


def test_maps_from_the_factories_are_not_read_back(monkeypatch):
    """Checking values synchronises with the GPU: maps made by predict_block_map / build_block_map skip it."""
    calls = []
    monkeypatch.setattr(BlockMap, "check_values", lambda self: calls.append(self))
    q, k, v = _qkv(1, 1, 130, 130, 32)
    predicted = predict_block_map(q, k, topk=0.5, negligible=0.0)
    for bm in (predicted, _map_with_critical_rows([[0], [1], [2]])):
        sparse_linear_attention(q, k, v, bm)
        sla_reference(q, k, v, bm)
    assert not calls
    derived = dataclasses.replace(predicted, kv_indices=predicted.kv_indices.clone())
    sla_reference(q, k, v, derived)
    assert calls == [derived]


def test_kernel_block_sizes():
    """The kernels take block_q 64 / 128 and block_k 64; the reference takes any block size of a hand-built map."""
    q, k, v = _qkv(1, 1, 100, 100, 32)
    block_class = torch.full((1, 1, 4, 2), CRITICAL, dtype=torch.int8, device=DEVICE)
    bm = build_block_map(block_class, 100, 100, 32, 64)  # every pair critical: dense attention
    with pytest.raises(ValueError, match=r"block_q=32 is not supported; choose one of \(64, 128\)"):
        sla_branches(q, k, v, bm)
    torch.testing.assert_close(sla_reference(q, k, v, bm), torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("fn, with_weight", [(sparse_linear_attention, True), (sparse_linear_attention, False),
                                             (sla_reference, True), (sla_reference, False), (sla_branches, False),
                                             (sla_branches_ref, False)])
@pytest.mark.parametrize("options, match", [
    (dict(feature_map="gelu"), "feature_map='gelu' is not one of"),
    (dict(linear_scope="foo"), "linear_scope='foo' is not one of"),  # also without a weight, which skips the branch
])
def test_bad_branch_options_name_the_value(fn, with_weight, options, match):
    q, k, v = _qkv(1, 1, 130, 130, 32)
    bm = predict_block_map(q, k, topk=0.5, negligible=0.0)
    weight = (torch.eye(32, device=DEVICE),) if with_weight else ()
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, bm, *weight, **options)


def test_block_map_on_another_device():
    q, k, v = _qkv(1, 1, 130, 130, 32)
    bm = predict_block_map(q.to("meta"), k.to("meta"), topk=0.5, negligible=0.0)
    for fn in (sparse_linear_attention, sla_reference):
        with pytest.raises(ValueError, match=f"the block map is on meta but q is on {DEVICE}"):
            fn(q, k, v, bm)
