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
