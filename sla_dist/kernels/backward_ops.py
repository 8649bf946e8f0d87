"""SLA's backward as PyTorch operators: the launchers of the backward's kernels (backward.py) and the three custom ops
that a compiled graph runs them through.

:func:`sla_backward` is the eager path's whole backward (op._EagerSLA calls it); :func:`compiled_backward` runs the
same three steps as the custom ops ``sla_dist::sla_backward_queries`` (pre-pass and dQ), ``sla_backward_key_rows``
(the per-key-block rows dh_j, dz_j) and ``sla_backward_key_grads`` (dK/dV), so that a compiled graph frees each step's
inputs after it as the eager path does. Each op has a fake implementation for torch.compile.
"""

from __future__ import annotations

import torch

from .block_map import num_blocks, transposed_lists
from .configs import (PREPASS_LOOP_PROGRAMS_PER_SM, dkdv_chunked, dkdv_order, dkdv_split, dq_launch, get_kernel,
                      interpreting, multiprocessors, prepass_launch, read_switches, with_layer_split)
from .descriptors import use_tma
from .dkdv_plan import dkdv_program_order, dkdv_split_plan, split_slots
from .layout import (block_strides, dot_precision, kernel_layout, key_value_layout, new_output, output_like, problem,
                     stacked_outputs_like, summary_dtype)
from .summary_rows import (gradient_views, gradients_over_key_rows, key_rows_in_slabs, linear_totals, marginal_matrix,
                           no_sums, slabs_shape, split_rows, sum_over_scope, summary_rows)


def backward_layout(do, dol, q, k, v, o, linear_scope) -> tuple[torch.Tensor, ...]:
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


def backward_has_linear(linear_scope: str, dol: torch.Tensor | None, proj_weight: torch.Tensor | None) -> bool:
    """The backward differentiates the linear branch: the projected op's (``proj_weight``; its scope is not 'none'),
    or one whose unprojected O_l got a gradient (``dol``). For the fakes and the compiled path; the eager path's
    :func:`_backward_queries` applies the rule inline."""
    return proj_weight is not None or (linear_scope != "none" and dol is not None)


def sla_backward(
    do: torch.Tensor, dol: torch.Tensor | None, dlse: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    block_class: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    block_q: int, block_k: int, feature_map: str, linear_scope: str, proj_weight: torch.Tensor | None = None,
    linear_sums: torch.Tensor | None = None, release: tuple[torch.Tensor, ...] = (), dkdv_split: str = "env",
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
    and makes them again. ``dkdv_split``: the layer's choice (SLAConfig.dkdv_split) in SLA_DIST_DKDV_SPLIT's place,
    'env' for the switch.

    Three steps, each a custom op of its own on the compiled path (:func:`compiled_backward`), so that a compiled
    graph frees each step's inputs after it as this function does: the query side (pre-pass and dQ,
    :func:`_backward_queries`: O_s and the sums are read there only), the per-key-block rows dh_j, dz_j summed from
    the pre-pass' per-query-block rows (not held beside dk and dv), and dK/dV (:func:`_backward_keys`). Where dK/dV
    writes dk and dv over the rows it reads (summary_rows.gradients_over_key_rows), the last op sums them itself."""
    q, k, v, do, p, switches, dq, delta, rows, marginal = _backward_queries(
        do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map,
        linear_scope, proj_weight, linear_sums, release)
    over_rows, chunks, sum_first = _key_rows_plan(rows, marginal, q, v, block_k, switches)
    if sum_first:
        rows, marginal = sum_over_scope(rows, marginal, p.precision, transpose=True), None
    _, dk, dv = _backward_keys(q, k, v, do, lse, delta, block_class, rows, marginal, chunks, p,
                               with_layer_split(switches, dkdv_split), over_rows)
    return dq, dk, dv


def _backward_queries(do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k,
                      feature_map, linear_scope, proj_weight, linear_sums, release=()):
    """The backward's query side (:func:`sla_backward`'s arguments): the pre-pass, then dQ. Returns q, k, v and dO in
    the kernels' layouts, the launch constants and switches, dq, delta, and for the linear branch (else None) the
    pre-pass' rows of dH_i, dZ_i [BH, Nq, D * D + D] and the 0/1 matrix (None for scope 'all')."""
    has_proj = proj_weight is not None  # the projected forward, whose scope is not 'none'
    has_dol = linear_scope != "none" and dol is not None
    has_linear = has_dol or has_proj  # backward_has_linear's rule, inline (host time)
    q, k, v, o, do, dol_ = backward_layout(do, dol, q, k, v, o, linear_scope)
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
        hl, zl = split_rows(linear_sums if saved else linear_totals(k, v, marginal, p), p.D)
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
    entry, per_block = ("dq", 1) if switches.dq_split is None else dq_launch(block_q, switches)
    get_kernel(entry)[(p.nq * per_block, p.bh)](
        q, k, v, do, dq, lse, delta, kv_num_blocks, kv_indices,
        *p.q_strides, *p.kv_strides, p.H, p.Lq, p.Lk, p.nq, kv_indices.shape[-1], p.qk_scale, p.sm_scale,
        D=p.D, BLOCK_Q=block_q, BLOCK_K=block_k, HAS_LINEAR=has_linear, PRECISION=p.precision, V_LIKE_K=p.v_like_k,
        USE_TMA=use_tma("dq", k, v, switches=switches),
    )
    return q, k, v, do, p, switches, dq, delta, rows, marginal


def _key_rows_plan(rows: torch.Tensor | None, marginal: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor,
                   block_k: int, switches) -> tuple[bool, tuple[tuple[int, int], ...] | None, bool]:
    """(over_rows, chunks, sum_first): how dK/dV gets the per-key-block rows dh_j, dz_j from the pre-pass'
    per-query-block ``rows``. ``over_rows`` (summary_rows.gradients_over_key_rows): summed inside, into the slabs
    that dk and dv then overwrite; else ``chunks`` of heads, each summed inside just before its launch
    (:func:`_dkdv_chunks`), or None and ``sum_first``: summed beforehand (the query blocks' rows freed before dk,
    dv exist). Summed inside, the query blocks' rows are held to the end, and the peak is at the sum in either case
    (559.6 MiB in chunks, 497.4 over the slabs at bf16 L 32768 D 128, counted on the CPU). Sizes only (fake tensors
    too)."""
    over_rows = gradients_over_key_rows(rows, marginal, v, block_k)
    chunks = None if over_rows else _dkdv_chunks(rows, marginal, q, switches)
    return over_rows, chunks, rows is not None and not over_rows and chunks is None


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


def _backward_keys(q, k, v, do, lse, delta, block_class, rows, marginal, chunks, p, switches, over_rows=False):
    """dK/dV: the kernel over the lists transposed from ``block_class``, q, k, v, dO in the kernels' layouts. Returns
    (dkv, dk, dv): dk and dv, views of the one buffer dkv (summary_rows.gradient_views). ``over_rows``
    (summary_rows.gradients_over_key_rows): ``rows`` are the pre-pass' per-query-block rows, summed here into slabs
    that the kernel overwrites with dk and dv (summary_rows.key_rows_in_slabs). Else ``chunks`` None: one launch,
    ``rows`` the per-key-block rows of dh_j, dz_j (None without the linear branch); or one launch per chunk of heads,
    each chunk's rows summed from the per-query-block ``rows`` with the 0/1 matrix ``marginal`` just before its
    launch; dk and dv then in k's layout. With SLA_DIST_DKDV_SPLIT=long each launch splits its long lists over extra
    programs (dkdv_plan.dkdv_split_plan) whose float32 parts the dkdv_combine kernel then sums."""
    q_num_blocks, q_indices = transposed_lists(block_class)
    dkv = scratch = None
    split = switches.dkdv_split is not None and dkdv_split(switches)
    for first, last in chunks or ((0, p.bh),):
        heads = q_num_blocks
        if over_rows:
            dkv, dzs = key_rows_in_slabs(rows, marginal, p)
            dhs, dh_strides = dkv, (dkv.stride(2), p.block_k * p.D, dkv.stride(0))  # over bh, key blocks, slabs
            key_rows = None
        else:
            if chunks is None:  # no slices then (host time: test_host_budget counts the ops)
                key_rows = rows
            else:
                scope = None if marginal is None else marginal[first:last]
                key_rows = sum_over_scope(rows[first:last], scope, p.precision, transpose=True)
                heads = q_num_blocks.view(p.bh, p.nk)[first:last]
            if key_rows is None:  # never read
                dhs = dzs = delta.view(p.bh, 1, -1)
            else:
                dhs, dzs = split_rows(key_rows, p.D)  # dhs is the rows themselves
            dh_strides = (*block_strides(dhs), p.block_k * p.D)  # one slab: row-major [D, D] summaries
            if dkv is None:  # after the first rows: not beside the per-query-block rows they are summed from
                dkv = stacked_outputs_like(k, 2)
        dk, dv = gradient_views(dkv, p.Lk)
        if split:
            slots = split_slots(heads.numel())
            plan = dkdv_split_plan(heads, dkdv_order(switches, split), multiprocessors(q.device, switches.interpreting), slots)
            if scratch is None:  # with dk, dv; as many slots as the widest chunk takes
                widest = max(end - start for start, end in chunks or ((0, p.bh),))
                scratch = new_output((split_slots(widest * p.nk), 2, p.block_k, p.D), q, torch.float32)
            order, grid = None, (plan.work.shape[0],)
        else:
            order, grid = dkdv_program_order(heads, dkdv_order(switches, split)), (p.nk, last - first)
        get_kernel("dkdv")[grid](
            q, k, v, do, dk, dv, lse, delta, q_num_blocks, q_indices, dhs, dzs,
            q_num_blocks if order is None else order,  # never read without ORDERED
            plan.work if split else q_num_blocks, dk if scratch is None else scratch,  # never read without SPLIT
            *p.q_strides, *p.kv_strides, *dk.stride()[:3], *dh_strides, *block_strides(dzs),
            p.H, p.Lq, p.Lk, p.nk, p.nq, first, p.qk_scale, p.sm_scale,
            **p.meta, ORDERED=order is not None, SPLIT=split, USE_TMA=use_tma("dkdv", q, do, switches=switches),
        )
        if split:
            get_kernel("dkdv_combine")[(plan.combine.shape[0],)](
                scratch, plan.combine, dk, dv, *dk.stride()[:3], p.H, p.Lk, p.nk, first, D=p.D, BLOCK_K=p.block_k)
        del key_rows, dhs, dzs  # this chunk's rows, before the next chunk's are made
    return dkv, dk, dv


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
    :func:`_backward_queries` (:func:`sla_backward`'s arguments). An output it does not make is an empty tensor (a
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
    block_q: int, block_k: int, feature_map: str, rows_summed: bool, dkdv_split: str = "env",
) -> torch.Tensor:
    """The backward's last custom op: dk and dv in one buffer (:func:`_backward_keys`; a custom op's outputs may not
    share storage, so summary_rows.gradient_views takes them apart outside). ``rows``: the key-block rows of the
    second op with ``rows_summed``, else the first op's query-block rows, summed here into the slabs that dk and dv
    overwrite (summary_rows.gradients_over_key_rows) or per chunk of heads (one chunk unless SLA_DIST_DKDV_CHUNKS
    makes more); None without the linear branch. ``do``: dO as the first op's kernels read it (its copy where it
    made one). q and dO are laid out as for the first op (a non-dense q, copied there, is copied again here, as k
    and v that the kernels cannot read in place are: the forward copies those too). ``dkdv_split``: as for
    :func:`sla_backward`."""
    q, do = kernel_layout(q, do)
    k, v = key_value_layout(k, v)
    switches = with_layer_split(read_switches(), dkdv_split)
    p = problem(q, k, v, block_q, block_k, feature_map, rows is not None, switches.interpreting)
    over_rows, chunks, _ = (False, None, False) if rows_summed else _key_rows_plan(rows, marginal, q, v, block_k,
                                                                                   switches)
    if rows is not None and not (rows_summed or over_rows):  # the first op's rows, summed here: one chunk at least
        chunks = chunks or ((0, p.bh),)
    return _backward_keys(q, k, v, do, lse, delta, block_class, rows, marginal, chunks, p, switches, over_rows)[0]


sla_backward_queries = torch.library.custom_op("sla_dist::sla_backward_queries",
                                               mutates_args=())(_sla_backward_queries_impl)
sla_backward_key_rows = torch.library.custom_op("sla_dist::sla_backward_key_rows",
                                                mutates_args=())(_sla_backward_key_rows_impl)
# dK/dV's op returns its one buffer under a new name: a compiled backward cached by an older sla_dist (AOTAutograd's
# cache keys on the forward graph, not on these ops' Python) called "sla_backward_keys" for a (dk, dv) pair.
sla_backward_key_grads = torch.library.custom_op("sla_dist::sla_backward_key_grads",
                                                 mutates_args=())(_sla_backward_keys_impl)


@sla_backward_queries.register_fake
def _(do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map,
      linear_scope, proj_weight=None, linear_sums=None):
    q_kernel, _, _, _, do_kernel, _ = backward_layout(do, dol, q, k, v, o, linear_scope)
    dtype = summary_dtype(q.dtype, interpreting())
    B, H, Lq, D = q.shape
    if backward_has_linear(linear_scope, dol, proj_weight):
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


@sla_backward_key_grads.register_fake
def _(do, q, k, v, lse, delta, block_class, rows, marginal, block_q, block_k, feature_map, rows_summed,
      dkdv_split="env"):
    k, v = key_value_layout(k, v)
    if not rows_summed and gradients_over_key_rows(rows, marginal, v, block_k):
        B, H, _, D = k.shape
        return k.new_empty(slabs_shape(B, H, marginal.shape[-1], D, block_k))
    return stacked_outputs_like(k, 2)


def compiled_backward(do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k,
                       feature_map, linear_scope, proj_weight=None, linear_sums=None, dkdv_split="env"):
    """:func:`sla_backward` through its three custom ops, what torch.compile traces. A compiled graph frees a tensor
    after the last op that reads it (an op cannot free its inputs): O_s and the saved sums after the query side, the
    pre-pass' per-query-block rows after the key rows are summed from them, so neither is held beside dk, dv and
    dh_j, the backward's peak (one op held them all: +2 q-sizes at L 32768, D 128). Whether dK/dV runs in chunks
    of heads (SLA_DIST_DKDV_CHUNKS) is decided when the graph is traced; each op reads its other switches when it
    runs, as the eager path does."""
    dq, delta, rows, marginal, do_kernel = sla_backward_queries(
        do, dol, dlse, q, k, v, o, lse, block_class, kv_num_blocks, kv_indices, block_q, block_k, feature_map,
        linear_scope, proj_weight, linear_sums)
    if not backward_has_linear(linear_scope, dol, proj_weight):
        rows = marginal = None
    elif linear_scope == "all":
        marginal = None
    summed = _key_rows_plan(rows, marginal, q, v, block_k, read_switches())[2]
    if summed:
        rows, marginal = sla_backward_key_rows(rows, marginal, dot_precision(q.dtype)), None
    dkv = sla_backward_key_grads(do_kernel if do_kernel.numel() else do, q, k, v, lse, delta, block_class, rows,
                                 marginal, block_q, block_k, feature_map, summed, dkdv_split)
    dk, dv = gradient_views(dkv, k.shape[2])
    return dq, dk, dv
