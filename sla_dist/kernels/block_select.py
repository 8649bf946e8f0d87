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
   With PACKED (the default; SLA_DIST_CLASSIFY, configs.classify_packed) both selects run in one loop on 32-bit keys:
   each round's two counts share one reduction, the critical one in the low 16 bits and the negligible one in the
   high bits (a row of fewer than 2^15 blocks cannot carry between them). The rounds are a serial chain of
   reductions, each a warp reduction and three barriers across the program's warps (sm_90 SASS, Triton 3.6: the
   separate selects' 64 rounds of 46-47 instructions at Nk 512, the packed select's 32 of 49; at 2048 115 / 122),
   and 64-bit keys take two compares and two registers per element, 32-bit keys one. Same thresholds, so the same
   classes and lists, bit for bit.
3. ``_critical_columns_kernel``: one program per key block builds the transposed lists (q_num_blocks,
   q_indices) that the dK/dV kernel walks.

Between 1 and 2, ``_block_scores_kernel`` turns the block sums into the float32 scores s_ij in one launch: one
program per [BLOCK_M, BLOCK_N] tile of a head's scores, all in float64 (smooth-K against the sequence mean of K,
whose total one torch sum makes beforehand, the products on float64 dot units), each score rounded to float32 on the
store. In PyTorch this was ten ops and a float64 batched GEMM per forward, ~0.5 ms of host time on the H200's host
against ~45 us of GPU time; the kernel and the sum take ~23 + ~20 us at L 32768, H 12 (2026-12-02).
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
def _block_scores_kernel(
    Q_SUMS, K_SUMS, K_TOTAL, SCORES,         # q_sums [BH, NQ, D], k_sums [BH, NK, D], k_total [BH, D] float64;
    NQ, NK, D, q_len, kv_len, block_q, block_k,  # scores [BH, NQ, NK] float32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_POW2: tl.constexpr,
):
    # One program per [BLOCK_M, BLOCK_N] tile of one head's scores: no loop, so that the launch is as wide as the
    # scores (1536 programs at L 32768, H 12). A program per row of tiles walking the key blocks (96 programs there)
    # took 86 us on an H200, each step waiting on its loads; the sequence total of K comes from one small sum
    # beforehand, as every tile needs it. The means are never formed: with r_i and c_j the valid rows of query
    # block i and key block j, s_ij = q_sums_i . (k_sums_j - c_j mu) / (r_i c_j sqrt(D)), one float64 division per
    # score (dividing both [BLOCK, D] tiles first took 55 us at L 32768: float64 division is a long sequence).
    bh = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, D_POW2)
    d_ok = offs_d < D
    k_mean = tl.load(K_TOTAL + bh * D + offs_d, mask=d_ok, other=0.0) / kv_len
    sqrt_d = tl.sqrt(tl.cast(D, tl.float64))  # correctly rounded as math.sqrt (a float argument would be float32)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    q_sums = tl.load(Q_SUMS + (bh * NQ + m[:, None]) * D + offs_d[None, :], mask=(m < NQ)[:, None] & d_ok[None, :],
                     other=0.0)
    k_sums = tl.load(K_SUMS + (bh * NK + n[:, None]) * D + offs_d[None, :], mask=(n < NK)[:, None] & d_ok[None, :],
                     other=0.0)
    # Valid rows per block: the last block of a sequence may be partial.
    q_rows = tl.maximum(tl.minimum(q_len - m * block_q, block_q), 1).to(tl.float64)
    k_rows = tl.maximum(tl.minimum(kv_len - n * block_k, block_k), 1).to(tl.float64)
    products = tl.dot(q_sums, tl.trans(k_sums - k_rows[:, None] * k_mean[None, :]), out_dtype=tl.float64)
    scores = products / (q_rows[:, None] * k_rows[None, :] * sqrt_d)
    tl.store(SCORES + (bh * NQ + m[:, None]) * NK + n[None, :], scores.to(tl.float32),
             mask=(m < NQ)[:, None] & (n < NK)[None, :])


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
def _keys_at_two_ranks(key, m_low, m_high):
    """(the m_low-th, the m_high-th) largest of the row's keys (uint32; padding 0, which no candidate reaches), each
    as in :func:`_key_at_rank`, from one reduction per bit: the counts for m_low in the low 16 bits of the packed
    sum, those for m_high above them. m_high may exceed the row (N_N 0): its key then stays 0."""
    t_low = tl.zeros((), dtype=tl.uint32)
    t_high = tl.zeros((), dtype=tl.uint32)
    bit = tl.full((), 1 << 31, tl.uint32)
    for _ in range(32):
        low = t_low | bit
        high = t_high | bit
        packed = tl.sum((key >= low).to(tl.int32) + tl.where(key >= high, 65536, 0), axis=0)
        t_low = tl.where((packed & 65535) >= m_low, low, t_low)
        t_high = tl.where((packed >> 16) >= m_high, high, t_high)
        bit = bit >> 1
    return t_low, t_high


@triton.jit
def _rank_of_equals(key, real, t):
    """(number of real keys > t, for each key equal to t its place among the equal keys in index order)."""
    equal = real & (key == t)
    return tl.sum((real & (key > t)).to(tl.int32), axis=0), tl.cumsum(equal.to(tl.int32), axis=0) - 1


@triton.jit
def _classify_kernel(
    SCORES, CLASS, KV_IDX,                   # scores [R, NK] float32, class [R, NK] int8, kv_idx [R, N_C] int32
    NK, N_C, N_N,
    NK_POW2: tl.constexpr, PACKED: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NK_POW2)
    real = j < NK
    s = tl.load(SCORES + row * NK + j, mask=real, other=0.0)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as in a float comparison
    # Float bits -> int32 that orders like the float (negative floats flip their magnitude bits), then shifted by
    # 2^31 to a non-negative key, so that the radix select's candidates compare without sign games: uint32 (the
    # sign bit flipped; padding 0) for the packed select, int64 for the separate ones.
    bits = s.to(tl.int32, bitcast=True)
    signed = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    # The keys at rank N_C - 1 (the last critical one) and at rank NK - N_N (the first negligible one); the
    # separate selects in their order from before the packed one (the second after the critical mask), which keeps
    # their compiled code as it was.
    if PACKED:
        flipped = (signed ^ (-2147483648)).to(tl.uint32, bitcast=True)
        key = tl.where(real, flipped, tl.zeros_like(flipped))
        last_critical, first_negligible = _keys_at_two_ranks(key, N_C, NK - N_N + 1)
    else:
        key = signed.to(tl.int64) + 2147483648
        last_critical = _key_at_rank(key, real, N_C)
    above, place = _rank_of_equals(key, real, last_critical)
    critical = real & ((key > last_critical) | ((key == last_critical) & (place < N_C - above)))
    if not PACKED:
        first_negligible = _key_at_rank(key, real, NK - N_N + 1)
    # Rank >= NK - N_N is negligible: keys below the key at that rank, and equal keys past it in index order.
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
