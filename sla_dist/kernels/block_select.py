"""Triton kernels of block-map prediction on the GPU: pooling and the per-row ranking.

Same notation as block_map.py. Three jobs, three kernels, so that predicting a block map costs a few launches instead of
a dozen PyTorch ops (the ops, not the arithmetic, dominated the layer at short sequences):

1. ``_block_sums_kernel``: one program per (block, bh) sums the rows of one block of q or k straight from the
   input dtype (no upcast copy), accumulating in float32, and stores the sum in float64. One block's sum does not
   depend on how the sequence is sharded, so context-parallel ranks that gather block sums see the same values.
2. ``_classify_kernel``: one program per row (bh, query block) of the float32 scores s_i [Nk] classifies all key
   blocks without sorting. Scores map to integer keys that order like the floats; a radix select (32 rounds, one
   bit each, of a count over the row) finds the key at rank n_c - 1 (the last critical one) and the key at rank
   Nk - n_n (the first negligible one). A block's rank in a stable descending sort is the number of larger keys plus
   the number of equal keys at lower indices (a prefix count), so ties go to the lower index exactly as in the
   PyTorch path. The critical list (kv_indices) comes out in ascending order from a prefix count of the critical
   blocks. Two bitonic sorts of the padded row did this before: O(Nk log^2 Nk) work on 64-bit keys, which took
   2.98 ms at L 75600 (Nk 591 padded to 1024, H 12) against 0.06 ms at 32768 on an H200; the select is O(32 Nk).
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
def _key_at_rank(key, real, m):
    """The m-th largest (1-based) of the row's real keys (int64 in [0, 2^32)): the largest t with at least m keys
    >= t, built from the top bit down."""
    t = tl.zeros((), dtype=tl.int64)
    for i in range(32):
        candidate = t | (tl.full((), 1, tl.int64) << (31 - i))
        t = tl.where(tl.sum((real & (key >= candidate)).to(tl.int32), axis=0) >= m, candidate, t)
    return t


@triton.jit
def _rank_of_equals(key, real, t):
    """(number of real keys > t, for each key equal to t its place among the equal keys in index order)."""
    equal = real & (key == t)
    return tl.sum((real & (key > t)).to(tl.int32), axis=0), tl.cumsum(equal.to(tl.int32), axis=0) - 1


@triton.jit
def _classify_kernel(
    SCORES, CLASS, KV_IDX,                   # scores [R, NK] float32, class [R, NK] int8, kv_idx [R, N_C] int32
    NK, N_C, N_N,
    NK_POW2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NK_POW2)
    real = j < NK
    s = tl.load(SCORES + row * NK + j, mask=real, other=0.0)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as in a float comparison
    # Float bits -> int32 that orders like the float (negative floats flip their magnitude bits), shifted to a
    # non-negative int64 so that the radix select's candidates compare without sign games.
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648
    last_critical = _key_at_rank(key, real, N_C)
    above, place = _rank_of_equals(key, real, last_critical)
    critical = real & ((key > last_critical) | ((key == last_critical) & (place < N_C - above)))
    # Rank >= NK - N_N is negligible: keys below the key at that rank, and equal keys past it in index order.
    first_negligible = _key_at_rank(key, real, NK - N_N + 1)
    above, place = _rank_of_equals(key, real, first_negligible)
    negligible = real & (N_N > 0) & ((key < first_negligible) |
                                     ((key == first_negligible) & (above + place >= NK - N_N)))
    cls = tl.where(critical, 2, tl.where(negligible, 0, 1)).to(tl.int8)   # CRITICAL / NEGLIGIBLE / MARGINAL
    tl.store(CLASS + row * NK + j, cls, mask=real)
    slot = tl.cumsum(critical.to(tl.int32), axis=0) - 1
    tl.store(KV_IDX + row * N_C + slot, j.to(tl.int32), mask=critical)


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
