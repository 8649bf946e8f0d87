"""SLA as a PyTorch operator: ``torch.library`` custom ops -> autograd -> one thin public function.

The custom ops (``sla_dist::sla_forward`` and ``sla_dist::sla_projected_forward``, which also applies the linear
branch's projection proj_l in the forward kernel's epilogue; the backward's three steps, in backward_ops.py, so
that a compiled graph frees each step's inputs after it) have fake implementations, so ``torch.compile`` traces through them without
running a kernel. Eager calls run the same implementations under one ``autograd.Function`` (``_EagerSLA``), which
skips torch.library's per-call dispatch (host time). Block-map prediction stays outside the op (it is not
differentiable and a compiler may fuse its PyTorch ops); its Triton launches are custom ops of their own, in
block_map.py, so that a compiled layer has no graph break.

Beside it: backward_ops.py (the backward's launchers and custom ops), layout.py (launch constants, the tensors'
memory layouts), summary_rows.py (the linear branch's per-block rows, their sums and 0/1 products), projection.py
(proj_l's backward). The Triton kernel modules are imported on first
launch, not here: ``triton.jit`` picks compiled or interpreted mode when a kernel is defined, so
``TRITON_INTERPRET=1`` only has to be set before the first call.
"""

from __future__ import annotations

import functools
import math

import torch

from ..config import validate_branch_options, validate_dkdv_split, validate_linear_sums
from .backward_ops import compiled_backward, sla_backward
from .block_map import BlockMap, check_block_map
from .configs import fwd_loop, get_kernel, interpreting, read_switches
from .descriptors import use_tma
from .layout import block_strides, kernel_layout, key_value_layout, new_output, output_like, problem
from .projection import projection_backward
from .reference import project_branches
from .revision import REVISION
from .summary_rows import linear_totals, marginal_matrix, no_sums, split_rows, sums_like

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (32, 64, 128)


def triton_runs_on(device: torch.device) -> bool:
    """True when Triton kernels can launch on ``device``: CUDA, or any device under TRITON_INTERPRET=1."""
    return device.type == "cuda" or interpreting()


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    block_class: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    block_q: int, block_k: int, feature_map: str, linear_scope: str, linear_sums: str,
    proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(O_s, O_l, lse, sums): sparse-branch output, unprojected linear-branch output (zeros for scope 'none'), the
    sparse branch's base-2 log-sum-exp [B, H, Lq] float32 and, for ``linear_sums`` 'save', the rows of H_i and Z_i
    [BH, Nq|1, D * D + D] the backward takes instead of making them again (else an empty tensor); with
    ``proj_weight`` (scope not 'none') preceded by the layer output O_s + O_l W^T + b, made in the forward kernel's
    epilogue."""
    (q,) = kernel_layout(q)
    k, v = key_value_layout(k, v)
    has_linear = linear_scope != "none"
    has_proj = proj_weight is not None
    if has_proj and not has_linear:
        raise ValueError("linear_scope='none' has no linear branch for proj_weight to project")
    switches = read_switches()
    p = problem(q, k, v, block_q, block_k, feature_map, has_linear, switches.interpreting)
    o = output_like(q)
    o_l = output_like(q) if has_linear else torch.zeros_like(q)
    lse = new_output((p.B, p.H, p.Lq), q, torch.float32)
    if has_linear:
        sums = linear_totals(k, v, marginal_matrix(block_class, linear_scope, p.summary_dtype), p)
        hl, zl = split_rows(sums, p.D)
    else:  # never read: HAS_LINEAR=False compiles the branch away
        hl = zl = lse.view(p.bh, 1, -1)
    if not has_linear or linear_sums != "save":
        sums = no_sums(q, p.summary_dtype)
    # Never read without HAS_PROJ / HAS_BIAS: o stands in for the missing tensors.
    out = output_like(q) if has_proj else o
    weight = proj_weight.contiguous() if has_proj else o
    bias = proj_bias.contiguous() if proj_bias is not None and has_proj else o
    loop = fwd_loop(p.D, has_linear, block_q, switches)
    name, programs_per_block = loop.launch(block_q)
    get_kernel(name)[(p.nq * programs_per_block, p.bh)](
        q, k, v, o, o_l, lse, out, weight, bias, kv_num_blocks, kv_indices, hl, zl,
        *p.q_strides, *p.kv_strides, *block_strides(hl), *block_strides(zl),
        p.H, p.Lq, p.Lk, p.nq, kv_indices.shape[-1], p.qk_scale,
        **p.meta, HAS_PROJ=has_proj, HAS_BIAS=has_proj and proj_bias is not None,
        **loop.constexprs(even_keys=p.Lk % block_k == 0), V_LIKE_K=p.v_like_k,
        USE_TMA=use_tma("fwd", k, v, switches=switches),
    )
    return (out, o, o_l, lse, sums) if has_proj else (o, o_l, lse, sums)


def _sla_forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    block_class: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    block_q: int, block_k: int, feature_map: str, linear_scope: str, linear_sums: str, dkdv_split: str,
    revision: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O_s, O_l, lse, sums) of :func:`_forward`. ``dkdv_split`` is the backward's (SLAConfig.dkdv_split), kept by
    the autograd context; ``revision`` is not read (revision.py: the compiled graph's key)."""
    return _forward(q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope,
                    linear_sums)


def _sla_projected_forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    block_class: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    block_q: int, block_k: int, feature_map: str, linear_scope: str, linear_sums: str, dkdv_split: str,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, revision: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O_s + O_l W^T + b, O_s, O_l, lse, sums) of :func:`_forward`; linear_scope is not 'none'. ``dkdv_split`` and
    ``revision`` as for :func:`_sla_forward_impl`."""
    return _forward(q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope,
                    linear_sums, proj_weight, proj_bias)


sla_forward = torch.library.custom_op("sla_dist::sla_forward", mutates_args=())(_sla_forward_impl)
sla_projected_forward = torch.library.custom_op("sla_dist::sla_projected_forward",
                                                mutates_args=())(_sla_projected_forward_impl)


@sla_forward.register_fake
def _(q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope, linear_sums,
      dkdv_split, revision=""):
    return _forward_outputs_like(q, block_q, linear_scope, linear_sums)


@sla_projected_forward.register_fake
def _(q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope, linear_sums,
      dkdv_split, proj_weight, proj_bias, revision=""):
    outputs = _forward_outputs_like(q, block_q, linear_scope, linear_sums)
    return (output_like(outputs[0]), *outputs)  # out has O_s's layout


def _forward_outputs_like(q: torch.Tensor, block_q: int, linear_scope: str,
                          linear_sums: str) -> tuple[torch.Tensor, ...]:
    """Fake (O_s, O_l, lse, sums) with the strides :func:`_forward` gives them (inductor checks them)."""
    (q,) = kernel_layout(q)
    has_linear = linear_scope != "none"
    return (output_like(q), (output_like(q) if has_linear else torch.zeros_like(q)),
            q.new_empty(q.shape[:3], dtype=torch.float32), sums_like(q, block_q, linear_scope, linear_sums))


DKDV_SPLIT_ARG = 11
"""Position of ``dkdv_split`` among the forward ops' arguments (after linear_sums)."""


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope, _, dkdv_split,
     *rest) = inputs
    proj = [x for x in rest if not isinstance(x, str)]  # (W, b) of the projected op; not the revision
    ctx.inputs = len(inputs)  # one gradient (or None) per input, the revision's included where it was passed
    o, o_l, lse, sums = output[-4:]
    ctx.mark_non_differentiable(sums)
    # The sums (empty unless linear_sums is 'save') are saved like the inputs, so that saved-tensor hooks see them:
    # activation checkpointing drops them with the rest and its recomputed forward makes them again. The projected
    # op also keeps O_l (dW = sum dOut^T O_l) and W (dO_l = dOut W, made in the backward's pre-pass); of the bias
    # only its dtype.
    ctx.save_for_backward(q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, sums,
                          *((o_l, proj[0]) if proj else ()))
    ctx.static = (block_q, block_k, feature_map, linear_scope)
    ctx.dkdv_split = dkdv_split
    # Unused outputs' gradients stay None, not zeros, in eager mode and in a compiled graph alike: with zeros the
    # kernels would read a dO_l / dlse of zeros, and the projected op would make dO_l = dOut W in PyTorch (IEEE float32
    # on a GPU) instead of in the pre-pass (tf32), so compiled and eager gradients would differ.
    ctx.set_materialize_grads(False)
    ctx.bias_dtype = proj[1].dtype if proj and proj[1] is not None else None


def _gradients(backward, ctx, *grads, release: bool = False):
    """Gradients of the forward's inputs through ``backward`` (:func:`compiled_backward`, the custom ops, or
    :func:`sla_backward`, their implementation) from those of its outputs, None standing for a zero gradient: (dq, dk,
    dv, None x 8) from (dO_s, dO_l, dlse, None for the sums), and for the projected forward (..., dW, db) from (dOut,
    dO_s, dO_l, dlse, None).

    ``release`` (the eager path, ``backward`` the implementation): free saved buffers that no later step reads
    right after their last reader, since the autograd node holds them until the whole backward returns. Always the
    saved sums (after the pre-pass; a second backward makes them again). For the projected forward also O_s (after
    the pre-pass, which makes delta from it) and O_l (after dW): its caller, sparse_linear_attention, returns the
    layer output alone, so these are internal, while sla_branches returns O_s and O_l and keeps them. A second
    backward through the same graph (retain_graph, e.g. two losses) finds them freed and makes them again with the
    forward kernel (bit for bit: they do not depend on the bias, and the kernels are deterministic)."""
    q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, sums, *proj = ctx.saved_tensors
    do, dol, dlse = grads[-4:-1]
    dproj, weight, after_prepass = (), None, (sums,)
    if proj:
        if release:
            if not (o.untyped_storage().nbytes() and proj[0].untyped_storage().nbytes()):
                # The sums, freed too, are made again by the backward: 'recompute' keeps none here.
                _, o, o_l, _, _ = _forward(q, k, v, block_class, kv_num_blocks, kv_indices, *ctx.static, "recompute",
                                           proj[1])
                proj = (o_l, proj[1])
            after_prepass = (sums, o)
        do, dol, weight, dproj = projection_backward(grads[0], do, dol, *proj, ctx.bias_dtype)
        if release:  # O_l's last reader is dW, queued above
            proj[0].untyped_storage().resize_(0)
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = backward(do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, *ctx.static,
                          weight, sums, *((after_prepass,) if release else ()), dkdv_split=ctx.dkdv_split)
    return dq, dk, dv, *(None,) * 9, *dproj, *(None,) * (ctx.inputs - 12 - len(dproj))


for _op in ("sla_forward", "sla_projected_forward"):
    torch.library.register_autograd(f"sla_dist::{_op}", functools.partial(_gradients, compiled_backward),
                                    setup_context=_setup_context)


class _EagerSLA(torch.autograd.Function):
    """The eager path: the custom ops' own implementations under one autograd.Function. ``torch.library``'s per-call
    dispatch (schema defaults, alias checks, the autograd wrapper) costs ~200 µs of host time per call with
    autograd (measured on a CPU host with an empty body, against ~15 µs for the function; on an H200's host the
    forward costs 351 µs through the dispatcher and 238 µs called directly), and at sequences up to ~16K the layer
    is bound by host time. torch.compile traces the custom ops instead (see sla_branches)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs[:DKDV_SPLIT_ARG], *inputs[DKDV_SPLIT_ARG + 1:])  # the split is the backward's
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _gradients(sla_backward, ctx, *grads, release=True)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel: bool) -> None:
    """Raise ValueError / NotImplementedError naming the offending value for inputs SLA cannot take.

    q is [B, H, Lq, D]; k and v are [B, H, Lk, D] (Lk == Lq for self-attention)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, D]; got rank {t.dim()} with shape {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k, v shapes do not fit: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not q.dtype.is_floating_point:
        raise NotImplementedError(f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if kernel:
        if q.dtype not in KERNEL_DTYPES:
            raise NotImplementedError(f"dtype {q.dtype} is not supported by the Triton kernels; use one of "
                                      f"{KERNEL_DTYPES} (float64 runs on the reference backend)")
        if q.shape[-1] not in KERNEL_HEAD_DIMS:
            raise NotImplementedError(f"head dim {q.shape[-1]} is not supported by the Triton kernels; "
                                      f"supported: {KERNEL_HEAD_DIMS}")
        if not triton_runs_on(q.device):
            raise NotImplementedError(f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1); got {q.device}")


def sla_branches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    *,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    linear_sums: str = "save",
    dkdv_split: str = "env",
    inputs_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """SLA's two branches before projection, for callers that merge attention parts themselves.

    Args:
        q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; float16 / bfloat16 / float32, D in (32, 64, 128).
        block_map: built for (Lq, Lk), e.g. by :func:`sla_dist.kernels.block_map.predict_block_map`. A map built
            by hand has its values checked first (one device synchronisation).
        feature_map: 'softmax' | 'elu' | 'relu'.
        linear_scope: 'marginal' (paper) | 'all' | 'none'.
        linear_sums: 'save' (the backward reads the linear branch's per-query-block sums the forward made) |
            'recompute' (the backward makes them again; they are not held in between). See SLAConfig.linear_sums.
        dkdv_split: 'env' (SLA_DIST_DKDV_SPLIT decides) | 'long' | 'off': whether the backward's dK/dV splits long
            query-block lists over extra programs. See SLAConfig.dkdv_split.
        inputs_checked: the caller has run :func:`check_inputs` with ``kernel=True`` on these very q, k, v (as
            SparseLinearAttention does before predicting the map), so they are not checked again (host time).

    Returns:
        o_s [B, H, Lq, D]: softmax attention over each query block's critical key blocks;
        o_l [B, H, Lq, D] or None for scope 'none': the unprojected linear branch;
        lse [B, H, Lq] float32: natural-log log-sum-exp of the sparse branch's scaled scores. All three are
        differentiable, so two partial attentions merge exactly as (o1 e^lse1 + o2 e^lse2) / (e^lse1 + e^lse2).
    """
    o, o_l, lse2 = _apply(sla_forward, q, k, v, block_map, feature_map, linear_scope, linear_sums, dkdv_split,
                          inputs_checked=inputs_checked)
    return o, (o_l if linear_scope != "none" else None), lse2 * math.log(2.0)


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    *,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    linear_sums: str = "save",
    dkdv_split: str = "env",
    inputs_checked: bool = False,
) -> torch.Tensor:
    """Sparse-Linear Attention with the fused Triton kernels.

    Args:
        q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; float16 / bfloat16 / float32, D in (32, 64, 128); any strides with
            a unit last one (e.g. a [B, L, H, D] projection viewed as [B, H, L, D] is read in place).
        block_map: from :func:`sla_dist.kernels.block_map.predict_block_map` for the same shapes.
        proj_weight, proj_bias: proj_l, [D, D] and [D]. Without a weight the linear branch is skipped.
        feature_map: 'softmax' | 'elu' | 'relu'.
        linear_scope: 'marginal' (paper) | 'all' | 'none'.
        linear_sums: 'save' | 'recompute', as for :func:`sla_branches`.
        dkdv_split: 'env' | 'long' | 'off', as for :func:`sla_branches`.
        inputs_checked: as for :func:`sla_branches`.

    Returns:
        [B, H, Lq, D] in q's dtype: O_s + proj_l(O_l), the projection made in the forward kernel (O_l W^T + b is
        rounded once, with the sum).
    """
    if proj_weight is None or linear_scope == "none":  # both paths validate the options; no branch, no sums
        validate_linear_sums(linear_sums)
        branches = functools.partial(sla_branches, dkdv_split=dkdv_split, inputs_checked=inputs_checked)
        return project_branches(branches, q, k, v, block_map, proj_weight, proj_bias, feature_map, linear_scope)
    # The output alone: O_s and O_l stay internal, and the eager backward frees them early (see _gradients).
    return _apply(sla_projected_forward, q, k, v, block_map, feature_map, linear_scope, linear_sums, dkdv_split,
                  proj_weight, proj_bias, inputs_checked=inputs_checked)[0]


def _apply(op, q, k, v, block_map, feature_map, linear_scope, linear_sums, dkdv_split, *proj,
           inputs_checked: bool = False) -> tuple[torch.Tensor, ...]:
    """``op``'s outputs but the sums (internal to the backward) after the input checks (those of q, k, v unless
    ``inputs_checked``): the custom op under torch.compile, its implementation under ``_EagerSLA`` in eager mode."""
    if not inputs_checked:
        check_inputs(q, k, v, kernel=True)
    validate_branch_options(feature_map, linear_scope)
    validate_linear_sums(linear_sums)
    validate_dkdv_split(dkdv_split)
    check_block_map(q, k, block_map, kernel=True)
    if proj:
        check_projection(q, *proj)
    # The kernels index the lists as dense [B * H, Nq(, W)] arrays; a no-op for maps built by block_map.py.
    args = (q, k, v, block_map.block_class, block_map.kv_num_blocks.contiguous(), block_map.kv_indices.contiguous(),
            block_map.block_q, block_map.block_k, feature_map, linear_scope, linear_sums, dkdv_split, *proj)
    if torch.compiler.is_compiling():  # the custom op, with this package's revision in the captured graph
        return op(*args, REVISION)[:-1]
    return _EagerSLA.apply(*args)[:-1]


def check_projection(q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ValueError naming the offending value unless proj_l's weight [D, D] and bias [D] fit q [B, H, L, D]."""
    D = q.shape[-1]
    for name, t, shape in (("proj_weight", weight, (D, D)), ("proj_bias", bias, (D,))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for head dim {D}; got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} has dtype {t.dtype}; it must be floating point")
