"""Triton device functions for addressing tiles, shared by the forward and backward kernels.

Offsets are int64 so that B * H * L * D (and per-block summaries) may exceed 2^31 elements.
"""

import triton
import triton.language as tl


@triton.jit
def head_offset(bh, H, stride_b, stride_h):
    """Offset of (batch, head) = divmod(bh, H) in a [B, H, L, D] tensor."""
    return (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def row_tile(head, rows, stride_l, offs_d):
    """Offsets of the [len(rows), D] tile of ``rows`` of one head."""
    return head + rows[:, None].to(tl.int64) * stride_l + offs_d[None, :]


@triton.jit
def block_item(bh, block, stride_bh, stride_block):
    """Offset of one block's entry in a per-block buffer [BH, blocks, ...] (stride_block 0: one shared entry)."""
    return bh.to(tl.int64) * stride_bh + block.to(tl.int64) * stride_block


@triton.jit
def square(offs_d, D: tl.constexpr):
    """Offsets of a row-major [D, D] matrix."""
    return offs_d[:, None] * D + offs_d[None, :]


@triton.jit
def columns(offs_d, cols, D: tl.constexpr):
    """Offsets of the columns ``cols`` of a row-major [D, D] matrix."""
    return offs_d[:, None] * D + cols[None, :]


@triton.jit
def listed_rows(IDX, position, LK, BLOCK_K: tl.constexpr):
    """Rows of the key block listed at ``position`` of the block list at IDX, and which of them are real (< LK). The
    index is loaded once, as a scalar, so the key/value loads stay contiguous along D and rows."""
    rows = tl.load(IDX + position) * BLOCK_K + tl.arange(0, BLOCK_K)
    return rows, rows < LK


@triton.jit
def query_rows(Q, DO, LSE, DELTA, q_head, bh, rows, stride_ql, offs_d, LQ):
    """What the backward needs of some query rows: (their tile offsets, which rows are < LQ, q, dO, lse, delta);
    rows past LQ read as 0."""
    row_ok = rows < LQ
    tile = row_tile(q_head, rows, stride_ql, offs_d)
    q = tl.load(Q + tile, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + tile, mask=row_ok[:, None], other=0.0)
    per_row = bh.to(tl.int64) * LQ + rows
    lse = tl.load(LSE + per_row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + per_row, mask=row_ok, other=0.0)
    return tile, row_ok, q, do, lse, delta
