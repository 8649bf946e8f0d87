"""SLA as a PyTorch operator: ``torch.library`` custom ops -> autograd -> one thin public function.

The custom ops (``sla_dist::sla_forward`` and ``sla_dist::sla_projected_forward``, which also applies the linear
branch's projection proj_l in the forward kernel's epilogue; the backward's three steps
``sla_dist::sla_backward_queries`` / ``sla_backward_key_rows`` / ``sla_backward_keys``, so that a compiled graph
frees each step's inputs after it) have fake implementations, so ``torch.compile`` traces through them without
running a kernel. Eager calls run the same implementations under one ``autograd.Function`` (``_EagerSLA``), which
skips torch.library's per-call dispatch (host time). Block-map prediction stays outside the op (it is not
differentiable and a compiler may fuse its PyTorch ops); its Triton launches are custom ops of their own, in
block_map.py, so that a compiled layer has no graph break.

Beside it: layout.py (launch constants, the tensors' memory layouts), summary_rows.py (the linear branch's per-block
rows and their 0/1 products), projection.py (proj_l's backward). The Triton kernel modules are imported on first
launch, not here: ``triton.jit`` picks compiled or interpreted mode when a kernel is defined, so
``TRITON_INTERPRET=1`` only has to be set before the first call.
"""

from __future__ import annotations

import functools
import math

import torch

from ..config import validate_branch_options, validate_linear_sums
from .block_map import BlockMap, check_block_map, compiled_or_eager, num_blocks, transposed_lists
from .configs import (PREPASS_LOOP_PROGRAMS_PER_SM, dkdv_chunked,
                      dkdv_order, dkdv_split, fwd_loop, get_kernel, interpreting, multiprocessors, prepass_launch,
                      read_switches)
from .descriptors import use_tma
from .dkdv_plan import dkdv_program_order, dkdv_split_plan, split_slots
from .layout import (Problem, block_strides, dot_precision, kernel_layout, key_value_layout, new_output, output_like,
                     problem, summary_dtype)
from .projection import projection_backward
from .reference import project_branches
from .summary_rows import marginal_matrix, no_sums, split_rows, sum_over_scope, summary_rows, sums_like

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (32, 64, 128)


def triton_runs_on(device: torch.device) -> bool:
    """True when Triton kernels can launch on ``device``: CUDA, or any device under TRITON_INTERPRET=1."""
    return device.type == "cuda" or interpreting()


def _linear_totals(k: torch.Tensor, v: torch.Tensor, marginal: torch.Tensor | None, p: Problem) -> torch.Tensor:
    """Rows [BH, Nq|1, D * D + D] of H_i and Z_i (see :func:`split_rows`): the linear branch's sums over each query
    block's scope."""
    rows = p.nk if marginal is None else marginal.shape[-1]  # M's padded key blocks
    hz = summary_rows(rows, k, p)
    if rows > p.nk:  # rows that M's zero columns meet: 0 x an unset value could be NaN
        hz[:, p.nk :].zero_()
    get_kernel("summaries")[(p.nk, p.bh)](
        k, v, hz, *p.kv_strides, p.H, p.Lk, rows,
        D=p.D, BLOCK_K=p.block_k, FEATURE_MAP=p.feature_map, PRECISION=p.precision,
    )
    return sum_over_scope(hz, marginal, p.precision)


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
        sums = _linear_totals(k, v, marginal_matrix(block_class, linear_scope, p.summary_dtype), p)
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
    block_q: int, block_k: int, feature_map: str, linear_scope: str, linear_sums: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O_s, O_l, lse, sums) of :func:`_forward`."""
    return _forward(q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope,
                    linear_sums)


def _sla_projected_forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    block_class: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    block_q: int, block_k: int, feature_map: str, linear_scope: str, linear_sums: str,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O_s + O_l W^T + b, O_s, O_l, lse, sums) of :func:`_forward`; linear_scope is not 'none'."""
    return _forward(q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope,
                    linear_sums, proj_weight, proj_bias)


sla_forward = torch.library.custom_op("sla_dist::sla_forward", mutates_args=())(_sla_forward_impl)
sla_projected_forward = torch.library.custom_op("sla_dist::sla_projected_forward",
                                                mutates_args=())(_sla_projected_forward_impl)


@sla_forward.register_fake
def _(q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope, linear_sums):
    return _forward_outputs_like(q, block_q, linear_scope, linear_sums)


@sla_projected_forward.register_fake
def _(q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope, linear_sums,
      proj_weight, proj_bias):
    outputs = _forward_outputs_like(q, block_q, linear_scope, linear_sums)
    return (output_like(outputs[0]), *outputs)  # out has O_s's layout


def _forward_outputs_like(q: torch.Tensor, block_q: int, linear_scope: str,
                          linear_sums: str) -> tuple[torch.Tensor, ...]:
    """Fake (O_s, O_l, lse, sums) with the strides :func:`_forward` gives them (inductor checks them)."""
    (q,) = kernel_layout(q)
    has_linear = linear_scope != "none"
    return (output_like(q), (output_like(q) if has_linear else torch.zeros_like(q)),
            q.new_empty(q.shape[:3], dtype=torch.float32), sums_like(q, block_q, linear_scope, linear_sums))


def _backward_layout(do, dol, q, k, v, o, linear_scope) -> tuple[torch.Tensor, ...]:
    """(q, k, v, o, do, dol) in the layouts the backward kernels index (dq takes q's, dk and dv k's): shared by the
    implementation and the fake, whose output strides must agree (inductor checks them). Without a stored dO_l,
    ``do`` stands in for it (never read), without a layout of its own: that would copy a gradient not in q's layout
    a second time."""
    if linear_scope != "none" and dol is not None:
        q, o, do, dol = kernel_layout(q, o, do, dol)
    else:
        q, o, do = kernel_layout(q, o, do)
        dol = do
    k, v = key_value_layout(k, v)
    return q, k, v, o, do, dol


def _has_linear(linear_scope: str, dol: torch.Tensor | None, proj_weight: torch.Tensor | None) -> bool:
    """The backward differentiates the linear branch: the projected op's (``proj_weight``; its scope is not 'none'),
    or one whose unprojected O_l got a gradient (``dol``). For the fakes and the compiled path; the eager path's
    :func:`_backward_queries` applies the rule inline."""
    return proj_weight is not None or (linear_scope != "none" and dol is not None)


def _backward(
    do: torch.Tensor, dol: torch.Tensor | None, dlse: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    block_class: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    block_q: int, block_k: int, feature_map: str, linear_scope: str, proj_weight: torch.Tensor | None = None,
    linear_sums: torch.Tensor | None = None, release: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the gradients of O_s (``do``), of the unprojected O_l (``dol``) and of the base-2 lse
    (``dlse``); None stands for a zero gradient. With ``proj_weight`` (proj_l's W in ``do``'s dtype, from the
    projected forward, whose output's gradient ``do`` is), the pre-pass adds dOut W to dO_l itself: the q-sized
    dO_l = dOut W is never stored.

    ``linear_sums``: the forward's rows of H_i and Z_i (its linear_sums 'save'), read by the pre-pass instead of
    making them again; None, empty or released (see below): made here, from k and v. ``release``: saved tensors
    whose last reader is the pre-pass (the eager path's, whose autograd node holds them until the whole backward
    returns; see :func:`_gradients`), their memory freed right after it: they are then not held beside dq, dk, dv
    and dh_j, the backward's peak. A second backward through the same graph (retain_graph) finds released sums
    and makes them again.

    Three steps, each a custom op of its own on the compiled path (:func:`_compiled_backward`), so that a compiled
    graph frees each step's inputs after it as this function does: the query side (pre-pass and dQ,
    :func:`_backward_queries`: O_s and the sums are read there only), the per-key-block rows dh_j, dz_j summed from
    the pre-pass' per-query-block rows (not held beside dk and dv), and dK/dV (:func:`_backward_keys`)."""
    q, k, v, do, p, switches, dq, delta, rows, marginal = _backward_queries(
        do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map,
        linear_scope, proj_weight, linear_sums, release)
    chunks = _dkdv_chunks(rows, marginal, q, switches)
    # One dK/dV launch: the query blocks' rows freed before dk, dv exist. In chunks, each chunk's key-block rows are
    # summed from them just before its launch, so they are held through the last one too (as through every earlier
    # one: the peak, 559.6 MiB at bf16 L 32768 D 128 counted on the CPU, is unchanged).
    if rows is not None and chunks is None:
        rows, marginal = sum_over_scope(rows, marginal, p.precision, transpose=True), None
    dk, dv = _backward_keys(q, k, v, do, lse, delta, block_class, rows, marginal, chunks, p, switches)
    return dq, dk, dv


def _backward_queries(do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k,
                      feature_map, linear_scope, proj_weight, linear_sums, release=()):
    """The backward's query side (:func:`_backward`'s arguments): the pre-pass, then dQ. Returns q, k, v and dO in
    the kernels' layouts, the launch constants and switches, dq, delta, and for the linear branch (else None) the
    pre-pass' rows of dH_i, dZ_i [BH, Nq, D * D + D] and the 0/1 matrix (None for scope 'all')."""
    has_proj = proj_weight is not None  # the projected forward, whose scope is not 'none'
    has_dol = linear_scope != "none" and dol is not None
    has_linear = has_dol or has_proj  # _has_linear's rule, inline (host time)
    q, k, v, o, do, dol_ = _backward_layout(do, dol, q, k, v, o, linear_scope)
    switches = read_switches()
    p = problem(q, k, v, block_q, block_k, feature_map, has_linear, switches.interpreting)

    # Buffers live only as long as a kernel needs them, and dK / dV are made last: the per-block summary rows
    # (H_i, dH_i: 97 MiB each, dh_j: 194 MiB at L 32768, H 12, D 128) are then never all held beside dq, dk and dv.
    # Freeing a buffer right after launching its last reader is safe: the caching allocator hands it on only to
    # work queued after that kernel on the same stream.
    delta = new_output((p.B, p.H, p.Lq), q, torch.float32)
    dlse = dlse.contiguous() if dlse is not None else None
    saved = has_linear and linear_sums is not None and linear_sums.untyped_storage().nbytes() > 0
    if has_linear:
        marginal = marginal_matrix(block_class, linear_scope, p.summary_dtype)
        hl, zl = split_rows(linear_sums if saved else _linear_totals(k, v, marginal, p), p.D)
        rows = summary_rows(p.nq, q, p)
    else:  # never read
        hl = zl = delta.view(p.bh, 1, -1)
        rows = marginal = None
    dq = output_like(q)  # after the sums: not beside the per-key-block rows they are made from
    if prepass_launch(q.device, switches, q.dtype) == "loop":  # programs that loop over the query blocks
        programs = min(p.nq * p.bh, PREPASS_LOOP_PROGRAMS_PER_SM * multiprocessors(q.device, switches.interpreting))
        entry, grid = "prepass_loop", (programs,)
    else:
        entry, grid = "prepass", (p.nq, p.bh)
    get_kernel(entry)[grid](
        q, o, do, dol_, proj_weight.contiguous() if has_proj else delta, dq, dlse if dlse is not None else delta,
        delta, hl, zl, delta if rows is None else rows, *p.q_strides, *block_strides(hl), *block_strides(zl),
        p.H, p.Lq, p.nq, p.bh,
        D=p.D, BLOCK_Q=block_q, HAS_DLSE=dlse is not None, FEATURE_MAP=p.feature_map, HAS_LINEAR=has_linear,
        PRECISION=p.precision, HAS_PROJ=has_proj, HAS_DOL=has_dol,
    )
    del hl, zl, o, dol_  # read by the pre-pass only
    for tensor in release:
        # The autograd node's reference outlives this function: free the storage itself (as FSDP frees parameters).
        tensor.untyped_storage().resize_(0)
    get_kernel("dq")[(p.nq, p.bh)](
        q, k, v, do, dq, lse, delta, kv_num_blocks, kv_indices,
        *p.q_strides, *p.kv_strides, p.H, p.Lq, p.Lk, p.nq, kv_indices.shape[-1], p.qk_scale, p.sm_scale,
        D=p.D, BLOCK_Q=block_q, BLOCK_K=block_k, HAS_LINEAR=has_linear, PRECISION=p.precision, V_LIKE_K=p.v_like_k,
        USE_TMA=use_tma("dq", k, v, switches=switches),
    )
    return q, k, v, do, p, switches, dq, delta, rows, marginal


def _dkdv_chunks(rows: torch.Tensor | None, marginal: torch.Tensor | None, q: torch.Tensor,
                 switches) -> tuple[tuple[int, int], ...] | None:
    """The heads of each dK/dV launch (see :func:`dkdv_head_chunks`) where SLA_DIST_DKDV_CHUNKS asks for chunks
    (configs.DKDV_CHUNKINGS) and more than one lowers the peak; None for one launch. Sizes only: the pre-pass' rows
    ``rows`` (None without the linear branch) and the 0/1 matrix, also of fake tensors (the compiled path decides
    when it is traced)."""
    if rows is None or switches.dkdv_chunks is None or not dkdv_chunked(switches):
        return None
    bh, query_rows, width = rows.shape
    key_rows = 1 if marginal is None else marginal.shape[-1]  # scope 'all': one total row per head
    chunks = dkdv_head_chunks(bh, query_rows, key_rows, width * rows.element_size(),
                              q.shape[2] * q.shape[3] * q.element_size())
    return chunks if len(chunks) > 1 else None


def _backward_keys(q, k, v, do, lse, delta, block_class, rows, marginal, chunks, p, switches):
    """(dk, dv): the dK/dV kernel over the lists transposed from ``block_class``, q, k, v, dO in the kernels'
    layouts. ``chunks`` None: one launch, ``rows`` the per-key-block rows of dh_j, dz_j (None without the linear
    branch); else one launch per chunk of heads, each chunk's rows summed from the per-query-block ``rows`` with the
    0/1 matrix ``marginal`` just before its launch. With SLA_DIST_DKDV_SPLIT=long each launch splits its long lists
    over extra programs (dkdv_plan.dkdv_split_plan) whose float32 parts the dkdv_combine kernel then sums."""
    q_num_blocks, q_indices = transposed_lists(block_class)
    dk = dv = scratch = None
    split = switches.dkdv_split is not None and dkdv_split(switches)
    for first, last in chunks or ((0, p.bh),):
        if chunks is None:  # no slices then (host time: test_host_budget counts the ops)
            key_rows, heads = rows, q_num_blocks
        else:
            scope = None if marginal is None else marginal[first:last]
            key_rows = sum_over_scope(rows[first:last], scope, p.precision, transpose=True)
            heads = q_num_blocks.view(p.bh, p.nk)[first:last]
        if key_rows is None:  # never read
            dhs = dzs = delta.view(p.bh, 1, -1)
        else:
            dhs, dzs = split_rows(key_rows, p.D)  # dhs is the rows themselves
        if dk is None:  # after the first rows: not beside the per-query-block rows they are summed from
            dk, dv = output_like(k), output_like(k)
        if split:
            slots = split_slots(heads.numel())
            plan = dkdv_split_plan(heads, dkdv_order(switches), multiprocessors(q.device, switches.interpreting), slots)
            if scratch is None:  # with dk, dv; as many slots as the widest chunk takes
                widest = max(end - start for start, end in chunks or ((0, p.bh),))
                scratch = new_output((split_slots(widest * p.nk), 2, p.block_k, p.D), q, torch.float32)
            order, grid = None, (plan.work.shape[0],)
        else:
            order, grid = dkdv_program_order(heads, dkdv_order(switches)), (p.nk, last - first)
        get_kernel("dkdv")[grid](
            q, k, v, do, dk, dv, lse, delta, q_num_blocks, q_indices, dhs, dzs,
            q_num_blocks if order is None else order,  # never read without ORDERED
            plan.work if split else q_num_blocks, dk if scratch is None else scratch,  # never read without SPLIT
            *p.q_strides, *p.kv_strides, *block_strides(dhs), *block_strides(dzs),
            p.H, p.Lq, p.Lk, p.nk, p.nq, first, p.qk_scale, p.sm_scale,
            **p.meta, ORDERED=order is not None, SPLIT=split, USE_TMA=use_tma("dkdv", q, do, switches=switches),
        )
        if split:
            get_kernel("dkdv_combine")[(plan.combine.shape[0],)](
                scratch, plan.combine, dk, dv, *p.k_strides, p.H, p.Lk, p.nk, first, D=p.D, BLOCK_K=p.block_k)
        del key_rows, dhs, dzs  # this chunk's rows, before the next chunk's are made
    return dk, dv


def dkdv_head_chunks(bh: int, query_rows: int, key_rows: int, row_bytes: int,
                     q_bytes: int) -> tuple[tuple[int, int], ...]:
    """The heads (of B x H) of each dK/dV launch, as [first, last) ranges; the other sizes are per head. A launch
    reads the dh_j rows of its own heads (``key_rows`` rows of ``row_bytes``), made just before it from the
    pre-pass' ``query_rows`` rows, which stay held until the last chunk's rows are made. One launch holds all key
    rows beside dq, dk and dv, the backward's peak; chunks hold a chunk's rows plus the query rows. Chunks, then,
    when that is less: as many as bring a chunk's rows down to q's bytes (``q_bytes``). bfloat16 at D 128 (BLOCK_Q
    128, BLOCK_K 64): key rows 2.02 and query rows 1.01 q-sizes, 3 chunks, the peak 6.02 -> 5.69 q-sizes (dense cuDNN
    holds ~6, dq accumulated in float32); at D 64 (1.02, 0.51) one launch is already the lower."""
    rows = key_rows * row_bytes
    chunks = min(bh, -(-rows // q_bytes))
    if chunks <= 1 or query_rows * row_bytes + rows / chunks >= rows:
        return ((0, bh),)
    bounds = [round(i * bh / chunks) for i in range(chunks + 1)]
    return tuple(zip(bounds[:-1], bounds[1:]))


def _sla_backward_queries_impl(
    do: torch.Tensor, dol: torch.Tensor | None, dlse: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    block_class: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    block_q: int, block_k: int, feature_map: str, linear_scope: str, proj_weight: torch.Tensor | None = None,
    linear_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's first custom op, the query side: (dq, delta, rows, marginal, dO) of
    :func:`_backward_queries` (:func:`_backward`'s arguments). An output it does not make is an empty tensor (a
    custom op's output can be neither None nor one of its inputs): the rows and the 0/1 matrix without the linear
    branch, the matrix for scope 'all', and dO when the kernels read the caller's in place."""
    _, _, _, do_kernel, p, _, dq, delta, rows, marginal = _backward_queries(
        do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map,
        linear_scope, proj_weight, linear_sums)
    return (dq, delta, no_sums(q, p.summary_dtype) if rows is None else rows,
            no_sums(q, p.summary_dtype) if marginal is None else marginal,
            do.new_empty((0,)) if do_kernel is do else do_kernel)


def _sla_backward_key_rows_impl(rows: torch.Tensor, marginal: torch.Tensor | None, precision: str) -> torch.Tensor:
    """The backward's second custom op: the per-key-block rows of dh_j, dz_j [BH, Nk'|1, D * D + D] from the
    pre-pass' per-query-block ``rows`` (see :func:`sum_over_scope`; ``marginal`` None for scope 'all')."""
    return sum_over_scope(rows, marginal, precision, transpose=True)


def _sla_backward_keys_impl(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
    block_class: torch.Tensor, rows: torch.Tensor | None, marginal: torch.Tensor | None,
    block_q: int, block_k: int, feature_map: str, rows_summed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's last custom op: (dk, dv) of :func:`_backward_keys`. ``rows``: the key-block rows of the
    second op with ``rows_summed``, else the first op's query-block rows, summed here per chunk of heads (one chunk
    unless SLA_DIST_DKDV_CHUNKS makes more); None without the linear branch. ``do``: dO as the first op's kernels
    read it (its copy where it made one). q and dO are laid out as for the first op (a non-dense q, copied there,
    is copied again here, as k and v that the kernels cannot read in place are: the forward copies those too)."""
    q, do = kernel_layout(q, do)
    k, v = key_value_layout(k, v)
    switches = read_switches()
    p = problem(q, k, v, block_q, block_k, feature_map, rows is not None, switches.interpreting)
    chunks = None if rows_summed or rows is None else (_dkdv_chunks(rows, marginal, q, switches) or ((0, p.bh),))
    return _backward_keys(q, k, v, do, lse, delta, block_class, rows, marginal, chunks, p, switches)


sla_backward_queries = torch.library.custom_op("sla_dist::sla_backward_queries",
                                               mutates_args=())(_sla_backward_queries_impl)
sla_backward_key_rows = torch.library.custom_op("sla_dist::sla_backward_key_rows",
                                                mutates_args=())(_sla_backward_key_rows_impl)
sla_backward_keys = torch.library.custom_op("sla_dist::sla_backward_keys", mutates_args=())(_sla_backward_keys_impl)


@sla_backward_queries.register_fake
def _(do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map,
      linear_scope, proj_weight=None, linear_sums=None):
    q_kernel, _, _, _, do_kernel, _ = _backward_layout(do, dol, q, k, v, o, linear_scope)
    dtype = summary_dtype(q.dtype, interpreting())
    B, H, Lq, D = q.shape
    if _has_linear(linear_scope, dol, proj_weight):
        rows = q.new_empty((B * H, num_blocks(Lq, block_q), D * D + D), dtype=dtype)
        marginal = marginal_matrix(block_class, linear_scope, dtype)
    else:
        rows = marginal = None
    return (output_like(q_kernel), q.new_empty((B, H, Lq), dtype=torch.float32),
            no_sums(q, dtype) if rows is None else rows, no_sums(q, dtype) if marginal is None else marginal,
            do.new_empty((0,)) if do_kernel is do else do_kernel)


@sla_backward_key_rows.register_fake
def _(rows, marginal, precision):
    return rows.new_empty((rows.shape[0], 1 if marginal is None else marginal.shape[-1], rows.shape[-1]))


@sla_backward_keys.register_fake
def _(do, q, k, v, lse, delta, block_class, rows, marginal, block_q, block_k, feature_map, rows_summed):
    k, _ = key_value_layout(k, v)
    return output_like(k), output_like(k)


def _compiled_backward(do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k,
                       feature_map, linear_scope, proj_weight=None, linear_sums=None):
    """:func:`_backward` through its three custom ops, what torch.compile traces. A compiled graph frees a tensor
    after the last op that reads it (an op cannot free its inputs): O_s and the saved sums after the query side, the
    pre-pass' per-query-block rows after the key rows are summed from them, so neither is held beside dk, dv and
    dh_j, the backward's peak (one op held them all: +2 q-sizes at L 32768, D 128). Whether dK/dV runs in chunks
    of heads (SLA_DIST_DKDV_CHUNKS) is decided when the graph is traced; each op reads its other switches when it
    runs, as the eager path does."""
    dq, delta, rows, marginal, do_kernel = sla_backward_queries(
        do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map,
        linear_scope, proj_weight, linear_sums)
    if not _has_linear(linear_scope, dol, proj_weight):
        rows = marginal = None
    elif linear_scope == "all":
        marginal = None
    summed = _dkdv_chunks(rows, marginal, q, read_switches()) is None
    if rows is not None and summed:
        rows, marginal = sla_backward_key_rows(rows, marginal, dot_precision(q.dtype)), None
    dk, dv = sla_backward_keys(do_kernel if do_kernel.numel() else do, q, k, v, lse, delta, block_class, rows,
                               marginal, block_q, block_k, feature_map, summed)
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map, linear_scope, _, *proj = inputs
    o, o_l, lse, sums = output[-4:]
    ctx.mark_non_differentiable(sums)
    # The sums (empty unless linear_sums is 'save') are saved like the inputs, so that saved-tensor hooks see them:
    # activation checkpointing drops them with the rest and its recomputed forward makes them again. The projected
    # op also keeps O_l (dW = sum dOut^T O_l) and W (dO_l = dOut W, made in the backward's pre-pass); of the bias
    # only its dtype.
    ctx.save_for_backward(q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, sums,
                          *((o_l, proj[0]) if proj else ()))
    ctx.static = (block_q, block_k, feature_map, linear_scope)
    # Unused outputs' gradients stay None, not zeros, in eager mode and in a compiled graph alike: with zeros the
    # kernels would read a dO_l / dlse of zeros, and the projected op would make dO_l = dOut W in PyTorch (IEEE float32
    # on a GPU) instead of in the pre-pass (tf32), so compiled and eager gradients would differ.
    ctx.set_materialize_grads(False)
    ctx.bias_dtype = proj[1].dtype if proj and proj[1] is not None else None


def _gradients(backward, ctx, *grads, release: bool = False):
    """Gradients of the forward's inputs through ``backward`` (:func:`_compiled_backward`, the custom ops, or
    :func:`_backward`, their implementation) from those of its outputs, None standing for a zero gradient: (dq, dk,
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
                          weight, sums, *((after_prepass,) if release else ()))
    return dq, dk, dv, None, None, None, None, None, None, None, None, *dproj


for _op in ("sla_forward", "sla_projected_forward"):
    torch.library.register_autograd(f"sla_dist::{_op}", functools.partial(_gradients, _compiled_backward),
                                    setup_context=_setup_context)


class _EagerSLA(torch.autograd.Function):
    """The eager path: the custom ops' own implementations under one autograd.Function. ``torch.library``'s per-call
    dispatch (schema defaults, alias checks, the autograd wrapper) costs ~200 µs of host time per call with
    autograd (measured on a CPU host with an empty body, against ~15 µs for the function; on an H200's host the
    forward costs 351 µs through the dispatcher and 238 µs called directly), and at sequences up to ~16K the layer
    is bound by host time. torch.compile traces the custom ops instead (see sla_branches)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _gradients(_backward, ctx, *grads, release=True)


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
        inputs_checked: the caller has run :func:`check_inputs` with ``kernel=True`` on these very q, k, v (as
            SparseLinearAttention does before predicting the map), so they are not checked again (host time).

    Returns:
        o_s [B, H, Lq, D]: softmax attention over each query block's critical key blocks;
        o_l [B, H, Lq, D] or None for scope 'none': the unprojected linear branch;
        lse [B, H, Lq] float32: natural-log log-sum-exp of the sparse branch's scaled scores. All three are
        differentiable, so two partial attentions merge exactly as (o1 e^lse1 + o2 e^lse2) / (e^lse1 + e^lse2).
    """
    o, o_l, lse2 = _apply(sla_forward, q, k, v, block_map, feature_map, linear_scope, linear_sums,
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
        inputs_checked: as for :func:`sla_branches`.

    Returns:
        [B, H, Lq, D] in q's dtype: O_s + proj_l(O_l), the projection made in the forward kernel (O_l W^T + b is
        rounded once, with the sum).
    """
    if proj_weight is None or linear_scope == "none":  # both paths validate the options; no branch, no sums
        validate_linear_sums(linear_sums)
        branches = functools.partial(sla_branches, inputs_checked=inputs_checked)
        return project_branches(branches, q, k, v, block_map, proj_weight, proj_bias, feature_map, linear_scope)
    # The output alone: O_s and O_l stay internal, and the eager backward frees them early (see _gradients).
    return _apply(sla_projected_forward, q, k, v, block_map, feature_map, linear_scope, linear_sums, proj_weight,
                  proj_bias, inputs_checked=inputs_checked)[0]


def _apply(op, q, k, v, block_map, feature_map, linear_scope, linear_sums, *proj,
           inputs_checked: bool = False) -> tuple[torch.Tensor, ...]:
    """``op``'s outputs but the sums (internal to the backward) after the input checks (those of q, k, v unless
    ``inputs_checked``): the custom op under torch.compile, its implementation under ``_EagerSLA`` in eager mode."""
    if not inputs_checked:
        check_inputs(q, k, v, kernel=True)
    validate_branch_options(feature_map, linear_scope)
    validate_linear_sums(linear_sums)
    check_block_map(q, k, block_map, kernel=True)
    if proj:
        check_projection(q, *proj)
    forward = compiled_or_eager(op, _EagerSLA.apply)
    # The kernels index the lists as dense [B * H, Nq(, W)] arrays; a no-op for maps built by block_map.py.
    return forward(q, k, v, block_map.block_class, block_map.kv_num_blocks.contiguous(),
                   block_map.kv_indices.contiguous(), block_map.block_q, block_map.block_k, feature_map, linear_scope,
                   linear_sums, *proj)[:-1]


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
