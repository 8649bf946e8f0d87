"""Triton kernels of block-map prediction on the GPU: pooling and the per-row ranking.

Same notation as block_map.py. Three jobs, three kernels, so that predicting a block map costs a few launches instead of
a dozen PyTorch ops (the ops, not the arithmetic, dominated the layer at short sequences):

1. ``_block_sums_kernel``: one program per (block, bh) sums the rows of one block of q or k straight from the
   input dtype (no upcast copy), accumulating in float32, and stores the sum in float64. One block's sum does not
   depend on how the sequence is sharded, so context-parallel ranks that gather block sums see the same values.
2. ``_classify_kernel``: one program per row (bh, query block) of the float32 scores s_i [Nk] ranks all key blocks
   at once with a bitonic sort of 64-bit keys (high word: the score's bits mapped so that larger scores sort first;
   low word: the key-block index, so ties go to the lower index, as a stable descending sort would), writes the
   int8 class of every key block and the critical list (kv_indices) in ascending order, which a second sort of the
   n_c chosen indices gives.
3. ``_critical_columns_kernel``: one program per key block builds the transposed lists (q_num_blocks,
   q_indices) that the dK/dV kernel walks.
"""

import triton
import triton.language as tl

from .tiles import head_offset, row_tile


@triton.jit
def _block_sums_kernel(
    X, SUMS,                                 # x [B, H, L, D] (any dtype), sums [BH, NB, D] float64
    stride_b, stride_h, stride_l, H, L, NB, D,
    BLOCK: tl.constexpr, D_POW2: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_POW2)            # any head dim (the reference backend takes them all), padded
    x = tl.load(X + row_tile(head_offset(bh, H, stride_b, stride_h), rows, stride_l, offs_d),
                mask=(rows < L)[:, None] & (offs_d < D)[None, :], other=0.0)
    total = tl.sum(x.to(tl.float32), axis=0)
    tl.store(SUMS + (bh.to(tl.int64) * NB + blk) * D + offs_d, total.to(tl.float64), mask=offs_d < D)


@triton.jit
def _classify_kernel(
    SCORES, CLASS, KV_IDX,                   # scores [R, NK] float32, class [R, NK] int8, kv_idx [R, N_C] int32
    NK, N_C, N_N,
    NK_POW2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NK_POW2)
    real = j < NK
    s = tl.load(SCORES + row * NK + j, mask=real, other=float("-inf"))
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as in a float comparison
    # Float bits -> int32 that orders like the float (negative floats flip their magnitude bits), then ~ so that
    # ascending keys mean descending scores; padding (-inf) sorts last.
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = ((~ordered).to(tl.int64) << 32) | j.to(tl.int64)
    by_rank = (tl.sort(key) & 0xFFFFFFFF).to(tl.int32)   # key-block index at each rank
    rank = j
    cls = tl.where(rank < N_C, 2, tl.where(rank >= NK - N_N, 0, 1)).to(tl.int8)   # CRITICAL / NEGLIGIBLE / MARGINAL
    tl.store(CLASS + row * NK + by_rank, cls, mask=real)
    # The n_c critical indices, ascending: everything else is pushed past NK_POW2 before sorting again.
    critical = tl.sort(tl.where(rank < N_C, by_rank, NK_POW2 + rank))
    tl.store(KV_IDX + row * N_C + rank, critical, mask=rank < N_C)


@triton.jit
def _critical_columns_kernel(
    CLASS, Q_NUM, Q_IDX,                     # class [R, NQ, NK] int8, q_num [R, NK] int32, q_idx [R, NK, NQ] int32
    NQ, NK,
    NQ_POW2: tl.constexpr,
):
    """The transposed lists for dK/dV: for key block j, the query blocks that chose it, ascending (a prefix sum
    gives each critical entry its place; entries past q_num are left unwritten)."""
    col = tl.program_id(0).to(tl.int64)      # r * NK + j
    r = col // NK
    j = col % NK
    i = tl.arange(0, NQ_POW2)
    cls = tl.load(CLASS + (r * NQ + i) * NK + j, mask=i < NQ, other=0)
    critical = (cls == 2).to(tl.int32)
    place = tl.cumsum(critical, axis=0) - 1
    tl.store(Q_IDX + col * NQ + place, i, mask=critical != 0)
    tl.store(Q_NUM + col, tl.sum(critical, axis=0))
