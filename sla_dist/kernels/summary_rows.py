"""The linear branch's per-block summary rows and the 0/1 products that sum them over a query block's scope.

A row holds one block's [D, D] summary (h_j = phi(K_j)^T V_j, or a gradient of H_i) followed by its [D] vector (z_j,
or of Z_i), so that one product with the 0/1 matrix M (M_ij = key block j is in query block i's linear scope) sums
both: H_i, Z_i = sum_j M_ij (h_j, z_j) in the forward, dh_j = sum_i M_ij dH_i in the backward.
"""

from __future__ import annotations

import contextlib

import torch

from .block_map import MARGINAL, num_blocks
from .configs import get_kernel, interpreting
from .layout import Problem, new_output, summary_dtype

SUM_BLOCK_ALIGN = 8
"""The 0/1 products' contraction over key blocks is padded to a multiple of this many blocks (16 bytes of bfloat16),
from PAD_FROM_BLOCKS key blocks on (below, the padding would add up to 7/8 to products that take microseconds)."""
PAD_FROM_BLOCKS = 64


def marginal_matrix(block_class: torch.Tensor, scope: str, dtype: torch.dtype) -> torch.Tensor | None:
    """M [BH, Nq, Nk'] in ``dtype``, M_ij = [key block j is in query block i's linear scope], Nk' = Nk rounded up to
    SUM_BLOCK_ALIGN from PAD_FROM_BLOCKS key blocks on, the extra columns 0; None for scope 'all', where every query
    block shares one total. Built once per pass and used for every sum below; the comparison writes its 0 / 1 straight
    into ``dtype`` (one kernel, no boolean temporary to cast). cuBLAS picks its vectorised (16-byte aligned) kernels
    only when the contraction length is aligned too: with Nk 591 (L 75600) the products ran in sm80 ``align2`` /
    ``align1`` kernels on an H200, 1.25 ms forward and 1.4-2.1 ms backward at H 12."""
    if scope == "all":
        return None
    *lead, nk = block_class.shape
    pad = -nk % SUM_BLOCK_ALIGN if nk >= PAD_FROM_BLOCKS else 0
    marginal = torch.empty((*lead, nk + pad), dtype=dtype, device=block_class.device)
    torch.eq(block_class, MARGINAL, out=marginal[..., :nk] if pad else marginal)
    if pad:
        marginal[..., nk:].zero_()
    return marginal.flatten(0, 1)


def sum_over_scope(x: torch.Tensor, marginal: torch.Tensor | None, precision: str,
                    transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j M_ij x_j: [BH, Nk', F] -> [BH, Nq or 1, F]; with ``transpose``, sum_i M_ij x_i: [BH, Nq, F] ->
    [BH, Nk' or 1, F] (Nk': M's padded key blocks; the padding's rows come out 0). A product with the 0/1 matrix
    runs on tensor cores and accumulates in float32; a broadcast total keeps a size-1 block dimension. float32 rows
    of half inputs (``precision`` 'tf32': float16's summaries) are multiplied at tf32, as the kernels' products: a
    float32 GEMM of this size runs on the CUDA cores, several times slower than the bfloat16 one it replaced.
    ``out``: a contiguous buffer for the product (x may be a column slice of its rows: cuBLAS reads it in place)."""
    if marginal is None:
        return x.sum(1, keepdim=True)
    matrix = marginal.transpose(1, 2) if transpose else marginal
    if precision == "ieee" or x.dtype != torch.float32:
        return torch.matmul(matrix, x, out=out)
    with _tf32_matmuls():
        return torch.matmul(matrix, x, out=out)


@contextlib.contextmanager
def _tf32_matmuls():
    """cuBLAS float32 products at tf32 inside the block. torch has no per-product setting, so the process-wide flag
    is set and restored (another thread's float32 products in between would run at tf32 too)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def summary_rows(n: int, like: torch.Tensor, p: Problem) -> torch.Tensor:
    """A buffer of one row per block, [BH, n, D * D + D]: a [D, D] summary (h_j, or a gradient of H_i) followed by
    its [D] vector (z_j, or of Z_i), so that one 0/1 product sums both."""
    return new_output((p.bh, n, p.D * p.D + p.D), like, p.summary_dtype)


def split_rows(rows: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The [D, D] summaries and the [D] vectors of a [BH, n, D * D + D] buffer of summary rows as the kernels take
    them, a base address and the strides over bh and blocks each: the rows themselves (a summary is the first D * D
    elements of its row, read from there) and the view of the vectors, D * D elements in. One view, not three (a
    [BH, n, D, D] view of the summaries gives the kernels the same address and strides)."""
    return rows, rows[..., D * D :]


def gradients_over_key_rows(rows: torch.Tensor | None, marginal: torch.Tensor | None, v: torch.Tensor,
                            block_k: int) -> bool:
    """Whether dK/dV writes dk and dv over the per-key-block rows dh_j that it reads (:func:`key_rows_in_slabs`):
    rows of the linear branch in v's dtype (not float16's float32 summaries), one per key block (not scope 'all''s
    one total), and D a multiple of BLOCK_K. Sizes and dtypes only (fake tensors too)."""
    return rows is not None and marginal is not None and rows.dtype == v.dtype and v.shape[-1] % block_k == 0


def slabs_shape(B: int, H: int, key_blocks: int, D: int, block_k: int) -> tuple[int, ...]:
    """Shape of :func:`key_rows_in_slabs`' buffer for ``key_blocks`` (M's padded count) key blocks of ``block_k``."""
    return max(D // block_k, 2), B, H, key_blocks * block_k, D


def key_rows_in_slabs(rows: torch.Tensor, marginal: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(dkv, dz): dh_j, dz_j = sum_i M_ij (dH_i, dZ_i) from the pre-pass' per-query-block ``rows`` [BH, Nq,
    D * D + D], dh_j's D rows cut in slabs of BLOCK_K: dkv [S, B, H, Nk' * BLOCK_K, D], S = max(D / BLOCK_K, 2), whose
    slab s holds rows s BLOCK_K .. (s + 1) BLOCK_K - 1 of every dh_j, key block j's at rows j BLOCK_K .., so that a
    slab is laid out as a gradient of k. dK/dV's program for key block j reads dh_j, then stores dv_j over its rows
    in slab 0 and dk_j over those in slab 1 (:func:`gradient_views`): dk and dv need no memory of their own. ``rows``
    are held until the slabs are summed, so this takes one q-size off the backward's peak at D 128 (589 -> 497 MiB at
    bf16 L 32768 H 12 on an H200), half a q-size at D 64. dz [BH, Nk', D]."""
    slabs, width, nk = p.D // p.block_k, p.block_k * p.D, marginal.shape[-1]
    dkv = new_output(slabs_shape(p.B, p.H, nk, p.D, p.block_k), rows, rows.dtype)
    per_block = dkv.view(dkv.shape[0], p.bh, nk, width)
    # One product per slab and one for dz_j, each reading its columns of the rows in place (host time: one transpose
    # and one split for all of them).
    matrix, columns = marginal.mT, rows.split([width] * slabs + [p.D], dim=-1)
    for s in range(slabs):
        sum_over_scope(columns[s], matrix, p.precision, out=per_block[s])
    return dkv, sum_over_scope(columns[-1], matrix, p.precision)


def gradient_views(dkv: torch.Tensor, Lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk, dv) [B, H, Lk, D] of dK/dV's output buffer ``dkv``: its slabs 1 and 0 (:func:`key_rows_in_slabs`), or a
    stack of dv and dk in k's layout (layout.stacked_outputs_like)."""
    dv, dk = dkv.unbind(0)[:2]
    if dk.shape[2] != Lk:  # the slabs' padded key blocks
        return dk.narrow(2, 0, Lk), dv.narrow(2, 0, Lk)
    return dk, dv


def no_sums(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The forward's ``sums`` output when it keeps none (linear_sums 'recompute' or scope 'none'): empty."""
    return like.new_empty((0,), dtype=dtype)


def sums_like(q: torch.Tensor, block_q: int, linear_scope: str, linear_sums: str) -> torch.Tensor:
    """The forward's ``sums`` output as op._forward makes it, for the fake: rows [BH, Nq|1, D * D + D] in the
    summaries' dtype (contiguous, as a product or a sum makes them), or empty."""
    dtype = summary_dtype(q.dtype, interpreting())
    if linear_sums != "save" or linear_scope == "none":
        return no_sums(q, dtype)
    B, H, Lq, D = q.shape
    n = 1 if linear_scope == "all" else num_blocks(Lq, block_q)
    return q.new_empty((B * H, n, D * D + D), dtype=dtype)


def linear_totals(k: torch.Tensor, v: torch.Tensor, marginal: torch.Tensor | None, p: Problem) -> torch.Tensor:
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
