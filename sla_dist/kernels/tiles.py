"""Triton device functions for addressing tiles, shared by the forward and backward kernels.

Offsets are int64 so that B * H * L * D (and per-block summaries) may exceed 2^31 elements.

A row tile is loaded in one of two ways (the USE_TMA constexpr, per kernel launch): by pointer offsets, a [rows, D]
tile of int64 addresses in registers, or through a tensor descriptor over one head's [L, D] rows (on Hopper, the TMA
engine copies the tile to shared memory and only its starting row is computed; rows past L read as 0, as the masked
loads' ``other=0``). A descriptor needs its base 16-byte aligned and its row stride a multiple of 16 bytes, which
the launcher checks (op.py); its loop offsets then stay int32 row numbers.
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
def row_descriptor(X, head, L, stride_l, ROWS: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr):
    """With USE_TMA, a tensor descriptor over the [L, D] rows of one head (``head``: its offset from X) that loads
    [ROWS, D] tiles; without, X itself, so that :func:`load_rows` serves both paths from one call site."""
    if USE_TMA:
        rows = tl.make_tensor_descriptor(X + head, shape=[L, D], strides=[stride_l, 1], block_shape=[ROWS, D])
    else:
        rows = X
    return rows


@triton.jit
def load_rows(X, desc, head, start, rows, row_ok, stride_l, offs_d, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """The [len(rows), D] tile of ``rows`` = start + arange of one head: through ``desc`` (:func:`row_descriptor`)
    with USE_TMA, where rows past the head's L read as 0; else by pointer offsets, rows where not row_ok read as 0
    when MASKED (unmasked loads are for tiles known to be in bounds)."""
    if USE_TMA:
        x = desc.load([start, 0])
    elif MASKED:
        x = tl.load(X + row_tile(head, rows, stride_l, offs_d), mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(X + row_tile(head, rows, stride_l, offs_d))
    return x


@triton.jit
def block_item(bh, block, stride_bh, stride_block):
    """Offset of one block's entry in a per-block buffer [BH, blocks, ...] (stride_block 0: one shared entry)."""
    return bh.to(tl.int64) * stride_bh + block.to(tl.int64) * stride_block


@triton.jit
def square(offs_d, D: tl.constexpr):
    """Offsets of a row-major [D, D] matrix."""
    return offs_d[:, None] * D + offs_d[None, :]


@triton.jit
def square_in_slabs(offs_d, stride_slab, D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets of a [D, D] matrix whose rows come BLOCK_K at a time in slabs ``stride_slab`` apart, each slab's rows
    row-major (stride_slab BLOCK_K * D: the plain row-major matrix)."""
    rows = (offs_d // BLOCK_K).to(tl.int64) * stride_slab + (offs_d % BLOCK_K) * D
    return rows[:, None] + offs_d[None, :]


@triton.jit
def columns(offs_d, cols, D: tl.constexpr):
    """Offsets of the columns ``cols`` of a row-major [D, D] matrix."""
    return offs_d[:, None] * D + cols[None, :]


@triton.jit
def scratch_part(SCRATCH, slot, BLOCK_K: tl.constexpr, D: tl.constexpr):
    """Pointers to the dK half of slot ``slot`` of a split dK/dV launch's scratch [slots, 2, BLOCK_K, D] (float32,
    row-major; the dV half follows at + BLOCK_K * D)."""
    base = SCRATCH + slot.to(tl.int64) * (2 * BLOCK_K * D)
    return base + tl.arange(0, BLOCK_K)[:, None] * D + tl.arange(0, D)[None, :]


@triton.jit
def listed_index(IDX, position, count):
    """The block index listed at ``position`` of the block list at IDX, or 0 past its ``count`` entries. The forward
    and dK/dV loops load the next step's index one step ahead, so a step's tile loads are not issued behind the load
    of their own index: on an H200 (bf16, D 128, 95 %) dK/dV -2.3 % at L 32768 and the forward -1.9 % at 75600; dQ
    was level at 32768 and 1.6 % slower at 75600, so it loads its index in the step."""
    return tl.load(IDX + position, mask=position < count, other=0)


@triton.jit
def listed_rows(index, LK, BLOCK_K: tl.constexpr):
    """(first row, rows, which rows are real (< LK)) of key block ``index``, a scalar (:func:`listed_index`), so the
    key/value loads stay contiguous along D and rows."""
    start = index * BLOCK_K
    rows = start + tl.arange(0, BLOCK_K)
    return start, rows, rows < LK


@triton.jit
def query_rows(Q, DO, LSE, DELTA, q_desc, do_desc, q_head, bh, start, rows, stride_ql, offs_d, LQ,
               USE_TMA: tl.constexpr):
    """What the backward needs of the query ``rows`` = start + arange: (their tile offsets, which rows are < LQ, q,
    dO, lse, delta); rows past LQ read as 0. q and dO come through the descriptors with USE_TMA (see load_rows)."""
    row_ok = rows < LQ
    tile = row_tile(q_head, rows, stride_ql, offs_d)
    q = load_rows(Q, q_desc, q_head, start, rows, row_ok, stride_ql, offs_d, True, USE_TMA)
    do = load_rows(DO, do_desc, q_head, start, rows, row_ok, stride_ql, offs_d, True, USE_TMA)
    per_row = bh.to(tl.int64) * LQ + rows
    lse = tl.load(LSE + per_row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + per_row, mask=row_ok, other=0.0)
    return tile, row_ok, q, do, lse, delta


@triton.jit
def power_of_two_above(x_max):
    """2^ceil(log2 x_max) for x_max > 0, else 1: a scale that brings a tile whose largest magnitude is x_max into
    [-1, 1] without rounding it (the linear branch's float32 summaries and gradients as half-precision operands)."""
    return tl.exp2(tl.where(x_max > 0, tl.ceil(tl.log2(x_max)), 0.0))
