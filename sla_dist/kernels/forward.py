"""Triton forward of Sparse-Linear Attention.

Notation: one program handles query block i (BLOCK_Q rows) of one (batch, head) pair ``bh``; key blocks hold
BLOCK_K rows; the head dim D is a power of two. Queries have LQ rows and keys LK (equal for self-attention; a
context-parallel rank attends its local queries to a gathered subset of keys). q, o and o_l share one set of
strides; k and v take one set each (a DiT's v is read in place from its fused qkv projection, rows 3 H D apart).
Scores are kept in base 2: with c = log2(e) / sqrt(D),

    s = c * q k^T,  m = running row max,  l = running sum of 2^(s - m),  lse = m + log2(l)

so that the backward recomputes P = 2^(s - lse) from the saved base-2 log-sum-exp.

Sparse branch: walk kv_indices[bh, i, :kv_num_blocks[bh, i]] with an online softmax (FlashAttention-2), one
listed key block per step. Loop variants (configs.FwdLoop, chosen per head dim and branch by the launcher): EVEN_K
drops the key masks when LK is a multiple of BLOCK_K; SCALE_IN_EXP keeps q k^T unscaled and applies c inside the
exponent (one FMA, 2^(c x - m)); SPLIT_Q > 1 has SPLIT_Q programs of BLOCK_Q / SPLIT_Q rows share one query block;
USE_TMA loads the key and value tiles through tensor descriptors (tiles.py).
Linear branch: the per-key-block summaries h_j = phi(K_j)^T V_j [D, D] and z_j = colsum phi(K_j) [D] are built by
``_linear_summaries_kernel`` into one [D * D + D] row per key block; the launcher sums the rows over each query
block's marginal blocks (one 0/1 matrix product, see op.py) into H_i, Z_i, and the forward kernel finishes with
O_l = phi(Q_i) H_i / (phi(Q_i) . Z_i), 0 where the denominator is 0. Addressing helpers live in tiles.py.

Projection (HAS_PROJ): the layer's output O_s + O_l W^T + b (proj_l, a [D, D] Linear shared by all heads) is made in
the epilogue as one more tile product accumulated onto O_s, so no separate GEMM and add read O_l and O_s back. W and b
are read in their stored dtype (the float32 master weights under autocast) and rounded like O_l, to the inputs'
dtype, for the product; the sum is rounded once, on the store. O_s and O_l are still stored: the backward needs them.
"""

import triton
import triton.language as tl

from .feature_maps import phi_fwd
from .tiles import (block_item, columns, head_offset, listed_index, listed_rows, load_rows, power_of_two_above,
                    row_descriptor, row_tile, square)


@triton.jit
def _scores(q, k, col_ok, qk_scale, EVEN_K: tl.constexpr, SCALE_IN_EXP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of q against a key tile, in base 2 (s = c q k^T), or (SCALE_IN_EXP) q k^T with the scale left for the
    exponent; -inf for keys past LK (col_ok false)."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if not SCALE_IN_EXP:
        x = x * qk_scale
    if not EVEN_K:
        x = tl.where(col_ok[None, :], x, float("-inf"))
    return x


@triton.jit
def _probs(x, m, qk_scale, SCALE_IN_EXP: tl.constexpr):
    """2^(s - m) for the rows' max m, from x = s or (SCALE_IN_EXP) x = s / qk_scale."""
    if SCALE_IN_EXP:
        return tl.exp2(x * qk_scale - m[:, None])
    return tl.exp2(x - m[:, None])


@triton.jit
def _online_softmax_step(x, v, m_i, l_i, acc, qk_scale, SCALE_IN_EXP: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax (FlashAttention-2): (m_i, l_i, acc) updated with scores x (see _scores)
    and values v."""
    m_blk = tl.max(x, axis=1)
    if SCALE_IN_EXP:
        m_blk = m_blk * qk_scale
    m_new = tl.maximum(m_i, m_blk)
    alpha = tl.exp2(m_i - m_new)
    p = _probs(x, m_new, qk_scale, SCALE_IN_EXP)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _linear_output(fq, hl, zl, o, OL, W, tile, offs_d, row_ok, D: tl.constexpr, HAS_PROJ: tl.constexpr,
                   PRECISION: tl.constexpr):
    """O_l = phi(Q_i) H_i / (phi(Q_i) . Z_i) stored at OL's ``tile``, and with HAS_PROJ O_s + O_l W^T returned (``o``:
    O_s, float32); summaries (``hl``, ``zl``: the addresses of H_i and Z_i) in a dtype the products take as they are."""
    h = tl.load(hl + square(offs_d, D))
    zl = tl.load(zl)
    num = tl.dot(fq.to(h.dtype), h, input_precision=PRECISION)
    den = tl.sum(fq * zl[None, :], axis=1)
    o_l = num / tl.where(den != 0, den, 1.0)[:, None]
    o_l = tl.where((den != 0)[:, None], o_l, 0.0).to(OL.dtype.element_ty)
    tl.store(OL + tile, o_l, mask=row_ok[:, None])
    if HAS_PROJ:
        # W^T is read as a transposed tile (W_T[e, d] = W[d, e]) and O_s is the product's accumulator: no second
        # [BLOCK_Q, D] float32 tile is live beside it.
        w_t = tl.load(W + offs_d[None, :] * D + offs_d[:, None]).to(o_l.dtype)
        o = tl.dot(o_l, w_t, acc=o, input_precision=PRECISION)
    return o


@triton.jit
def _scaled_linear_output(fq, hl, zl, o, OL, W, q_base, offs_m, stride_ql, offs_d, row_ok, dtype: tl.constexpr,
                          D: tl.constexpr, HAS_PROJ: tl.constexpr, PRECISION: tl.constexpr):
    """:func:`_linear_output` for float32 summaries of half inputs (float16): the products take their operands in
    the inputs' ``dtype``, H_i divided by a power of two >= max Z_i first. phi >= 0, so |H_i[d, :]| <= Z_i[d]
    max|v| and the scaled H_i is at most max|v|, which the inputs' dtype holds; a power of two rounds nothing.
    float16 operands keep 11 significant bits where the bfloat16 summaries used before 2026-12-01 kept 8 (proj_l's
    weight gradient was then ~3.3x the float16 reference's error, PERF_NOTES); float32 operands would run at tf32
    rate and spilled. O_l is made in two column halves, each stored and multiplied by its rows of W^T: a whole
    float32 H_i tile (64 KiB at D 128) made the split forward spill 240 B."""
    zl = tl.load(zl).to(tl.float32)
    den = tl.sum(fq * zl[None, :], axis=1)
    scale = power_of_two_above(tl.max(zl, axis=0))
    out_scale = tl.where(den != 0, scale / tl.where(den != 0, den, 1.0), 0.0)  # 0 where den is 0
    fq = fq.to(dtype)
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)
    for c in tl.static_range(0, D, HALF):
        h = tl.load(hl + columns(offs_d, c + cols, D)).to(tl.float32) * (1.0 / scale)
        num = tl.dot(fq, h.to(dtype), input_precision=PRECISION)
        o_l = (num * out_scale[:, None]).to(OL.dtype.element_ty)
        tl.store(OL + row_tile(q_base, offs_m, stride_ql, c + cols), o_l, mask=row_ok[:, None])
        if HAS_PROJ:
            w_t = tl.load(W + offs_d[None, :] * D + (c + cols)[:, None]).to(o_l.dtype)  # rows c of W^T
            o = tl.dot(o_l, w_t, acc=o, input_precision=PRECISION)
    return o


@triton.jit
def _sla_fwd_kernel(
    Q, K, V, O, OL, LSE,                     # q/o/ol [B, H, LQ, D], k/v [B, H, LK, D], lse [BH, LQ] float32
    OUT, W, B,                               # out [B, H, LQ, D] (q strides), proj_l's W [D, D] and b [D] (HAS_PROJ)
    KV_NUM, KV_IDX,                          # [BH, Nq] int32, [BH, Nq, W] int32
    HL, ZL,                                  # H_i [BH, Nq or 1, D, D], Z_i [BH, Nq or 1, D] (float32 or bf16)
    stride_qb, stride_qh, stride_ql,         # strides of q/o/ol in elements
    stride_kb, stride_kh, stride_kl,         # strides of k
    stride_vb, stride_vh, stride_vl,         # strides of v
    stride_hl_bh, stride_hl_q, stride_zl_bh, stride_zl_q,
    H, LQ, LK, NQ, KV_WIDTH, qk_scale,       # qk_scale = log2(e) / sqrt(D)
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    FEATURE_MAP: tl.constexpr, HAS_LINEAR: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr = False, SCALE_IN_EXP: tl.constexpr = False,
    SPLIT_Q: tl.constexpr = 1, V_LIKE_K: tl.constexpr = True, USE_TMA: tl.constexpr = False,
):
    # SPLIT_Q programs share query block pid_q (its block list and H_i), each taking BLOCK_Q // SPLIT_Q of its rows.
    ROWS: tl.constexpr = BLOCK_Q // SPLIT_Q
    pid_q = tl.program_id(0) // SPLIT_Q
    bh = tl.program_id(1)
    q_base = head_offset(bh, H, stride_qb, stride_qh)
    k_base = head_offset(bh, H, stride_kb, stride_kh)
    # V_LIKE_K (v's strides are k's): one tile of offsets serves both loads, as many registers as one; a v in its own
    # layout costs a second [BLOCK_K, D] offset tile in the loop (~8 % on the forward kernel at D 128, H200).
    v_base = k_base if V_LIKE_K else head_offset(bh, H, stride_vb, stride_vh)
    stride_vl = stride_kl if V_LIKE_K else stride_vl
    offs_m = pid_q * BLOCK_Q + (tl.program_id(0) % SPLIT_Q) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < LQ
    tile = row_tile(q_base, offs_m, stride_ql, offs_d)
    q = tl.load(Q + tile, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    row = bh.to(tl.int64) * NQ + pid_q
    n_blocks = tl.load(KV_NUM + row)
    blocks = KV_IDX + row * KV_WIDTH
    # Rows past LK read as 0 (none exist when EVEN_K, so the pointer loads drop their masks).
    k_desc = row_descriptor(K, k_base, LK, stride_kl, BLOCK_K, D, USE_TMA)
    v_desc = row_descriptor(V, v_base, LK, stride_vl, BLOCK_K, D, USE_TMA)
    nxt = listed_index(blocks, 0, n_blocks)
    for it in range(0, n_blocks):
        index = nxt
        nxt = listed_index(blocks, it + 1, n_blocks)
        start, offs_k, col_ok = listed_rows(index, LK, BLOCK_K)
        k = load_rows(K, k_desc, k_base, start, offs_k, col_ok, stride_kl, offs_d, not EVEN_K, USE_TMA)
        v = load_rows(V, v_desc, v_base, start, offs_k, col_ok, stride_vl, offs_d, not EVEN_K, USE_TMA)
        x = _scores(q, k, col_ok, qk_scale, EVEN_K, SCALE_IN_EXP, PRECISION)
        m_i, l_i, acc = _online_softmax_step(x, v, m_i, l_i, acc, qk_scale, SCALE_IN_EXP, PRECISION)

    # A row with no critical block (possible only for hand-built maps) yields 0 and lse = -inf.
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(O + tile, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * LQ + offs_m, lse, mask=row_ok)

    if HAS_LINEAR:
        fq = phi_fwd(q.to(tl.float32), FEATURE_MAP)
        hl = HL + block_item(bh, pid_q, stride_hl_bh, stride_hl_q)
        zl = ZL + block_item(bh, pid_q, stride_zl_bh, stride_zl_q) + offs_d
        if HL.dtype.element_ty == Q.dtype.element_ty:  # bfloat16 or float32 inputs: summaries in their dtype
            o = _linear_output(fq, hl, zl, o, OL, W, tile, offs_d, row_ok, D, HAS_PROJ, PRECISION)
        else:  # float16 inputs, float32 summaries (layout.summary_dtype)
            o = _scaled_linear_output(fq, hl, zl, o, OL, W, q_base, offs_m, stride_ql, offs_d, row_ok, q.dtype, D,
                                      HAS_PROJ, PRECISION)
        if HAS_PROJ:
            if HAS_BIAS:  # (adding b before the product took 2-8 more registers)
                o += tl.load(B + offs_d).to(tl.float32)[None, :]
            tl.store(OUT + tile, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _linear_summaries_kernel(
    K, V, HZ,                                # [B, H, LK, D] x2; output [BH, NK, D * D + D]: h_j then z_j per block
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, LK, NK,
    D: tl.constexpr, BLOCK_K: tl.constexpr, FEATURE_MAP: tl.constexpr, PRECISION: tl.constexpr,
):
    """h_j = phi(K_j)^T V_j and z_j = colsum phi(K_j) for key block j; padded rows contribute nothing."""
    pid_k = tl.program_id(0)
    bh = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    row_ok = offs_k < LK
    k = tl.load(K + row_tile(head_offset(bh, H, stride_kb, stride_kh), offs_k, stride_kl, offs_d),
                mask=row_ok[:, None], other=0.0)
    v = tl.load(V + row_tile(head_offset(bh, H, stride_vb, stride_vh), offs_k, stride_vl, offs_d),
                mask=row_ok[:, None], other=0.0)
    fk = tl.where(row_ok[:, None], phi_fwd(k.to(tl.float32), FEATURE_MAP), 0.0)
    h = tl.dot(tl.trans(fk).to(v.dtype), v, input_precision=PRECISION)
    out = HZ + (bh.to(tl.int64) * NK + pid_k) * (D * D + D)
    tl.store(out + square(offs_d, D), h.to(HZ.dtype.element_ty))
    tl.store(out + D * D + offs_d, tl.sum(fk, axis=0).to(HZ.dtype.element_ty))
