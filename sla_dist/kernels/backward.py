"""Triton backward of Sparse-Linear Attention.

Same notation as forward.py (base-2 scores s = c q k^T, saved lse, P = 2^(s - lse)). Three jobs, three kernels:

1. ``_bwd_prepass_kernel``: one program per query block i (or, PERSISTENT, programs looping over the blocks),
   everything that needs only block i's rows:
       delta = rowsum(dO_s * O_s) - log2(e) dlse
   (the softmax backward's correction term; dlse, the gradient of the saved base-2 lse, is nonzero when a caller
   merges partial attentions by their LSE), and the query side of the linear branch. With N = phi(Q_i) H_i,
   den = phi(Q_i) . Z_i, O_l = N / den and G = dO_l H_i^T:
       dN = dO_l / den,  dden = -rowsum(dO_l * N) / den^2 = -rowsum(G * phi(Q_i)) / den^2,
       dphi(Q) = dN H_i^T + dden Z_i^T = G / den + dden Z_i^T
   (G serves both, so N is never formed: one [BQ, D] x [D, D] product fewer than the forward's order). For the
   projected layer (HAS_PROJ) dO_l = dOut W is made here from dOut (then also dO_s) instead of being read from a
   q-sized buffer that a separate GEMM wrote; a stored dO_l (HAS_DOL) is added to it. It writes the linear
   branch's dQ into the dQ buffer (the sparse dQ kernel adds to it, so that kernel's registers hold only the
   FlashAttention loop: the linear tail made it spill at D = 128) and this block's contributions to the summaries'
   gradients, dH_i = phi(Q_i)^T dN and dZ_i = phi(Q_i)^T dden, which the launcher scatters back to
   key blocks (dh_j = sum over the query blocks for which j is marginal).
2. ``_bwd_dq_kernel``: one program per query block i (or SPLIT_Q per block, each over a slice of its rows), walking
   its critical list kv_indices (with USE_TMA, k and v come through tensor descriptors, tiles.py):
       dS = P * (dO_s V^T - delta),  dQ = dS K / sqrt(D)  (+ the linear branch's dQ from the pre-pass)
3. ``_bwd_dkdv_kernel``: one program per key block j, walking the transposed list q_indices (only the query blocks
   that chose j, never all of them), each query block in Q_STEPS loop steps of Q_SPLIT row slices (with ORDERED,
   program p takes the key block ORDER[p] names, e.g. the longest lists first; with USE_TMA, q and dO come through
   tensor descriptors):
       dV = P^T dO_s,  dK = dS^T Q / sqrt(D)
   plus the linear branch: dV += phi(K_j) dh_j,  dphi(K_j) = V_j dh_j^T + 1 dz_j^T. With SPLIT (SLA_DIST_DKDV_SPLIT)
   a program takes its key block and a stretch of its list from the split plan (dkdv_plan.py); a part of a split list
   stores float32 partial dK, dV for dkdv_split_kernels.py's combine, and only a list's first part adds the linear
   branch's terms. dh_j's rows may come in slabs of BLOCK_K rows (summary_rows.key_rows_in_slabs), over which the
   program for key block j then stores its own dV_j and dK_j: only after its products have read all of dh_j.
"""

import triton
import triton.language as tl

from .feature_maps import phi_bwd, phi_fwd
from .tiles import (block_item, columns, head_offset, listed_index, listed_rows, load_rows, power_of_two_above,
                    query_rows, row_descriptor, row_tile, scratch_part, square_in_slabs)


@triton.jit
def _w_columns(W, offs_d, cols, D: tl.constexpr, HAS_PROJ: tl.constexpr):
    """proj_l's W[:, cols] with HAS_PROJ (else 0, never read)."""
    if HAS_PROJ:
        w = tl.load(W + columns(offs_d, cols, D))
    else:
        w = 0.0
    return w


@triton.jit
def _dol_columns(do, w, DOL, tile, row_ok, HAS_PROJ: tl.constexpr, HAS_DOL: tl.constexpr, PRECISION: tl.constexpr):
    """Columns of dO_l for the rows of ``do`` (``tile``: their offsets in DOL), in float32: dOut W[:, cols] with
    HAS_PROJ (``do`` is then dOut, ``w`` those columns of W), plus the gradient stored in DOL with HAS_DOL."""
    if HAS_PROJ:
        dol = tl.dot(do, w, input_precision=PRECISION)
        if HAS_DOL:
            dol += tl.load(DOL + tile, mask=row_ok[:, None], other=0.0).to(tl.float32)
    else:
        dol = tl.load(DOL + tile, mask=row_ok[:, None], other=0.0).to(tl.float32)
    return dol


@triton.jit
def _column_pointers(X, offs_d, cols, D: tl.constexpr, IN_LOOP: tl.constexpr):
    """Pointers to the columns ``cols`` of the row-major [D, D] matrix at X (a block's H_i or dH_i row). IN_LOOP (a
    program that loops over blocks, X changing per block): each row's pointer first, then its columns, so that no
    [D, len(cols)] offset tile is loop-invariant: hoisted out of the loop, such tiles were held in registers
    through it (sm_90, D 128, Triton 3.6: 120 B spilled per thread instead of 72)."""
    if IN_LOOP:
        ptrs = (X + offs_d * D)[:, None] + cols[None, :]
    else:
        ptrs = X + columns(offs_d, cols, D)
    return ptrs


@triton.jit
def _dh_columns(dol, inv, fq, hl, h_scale, out, g, offs_d, cols, D: tl.constexpr, HALF: tl.constexpr,
                SCALED: tl.constexpr, PRECISION: tl.constexpr, IN_LOOP: tl.constexpr):
    """For the columns ``cols`` of dO_l (``dol``, float32): store those columns of dH_i = phi(Q_i)^T dN at ``out``
    and return G + dO_l[:, cols] H_i[:, cols]^T (H_i at ``hl``). The products take their operands in the inputs'
    dtype (``fq``'s). Summaries in that dtype (bfloat16, float32) are taken as they are; SCALED: float32 summaries of
    float16 inputs, where each float32 factor that may leave float16's range is divided by a power of two first
    (rounding nothing) and the product multiplied back: dN = dO_l / den (tiny where den is large) by one above its
    largest magnitude, H_i by ``h_scale`` >= max Z_i (as the forward's _scaled_linear_output; G comes out divided by
    it). float32 operands ran the products at tf32 rate, took 128 KiB of shared memory at D 128 and spilled 280 B.
    From D 128 the columns are made as rows of dH_i^T = dN^T phi(Q_i): phi(Q_i) is then the second operand, which
    the tensor cores read from shared memory, where as the first it took a second register copy of phi(Q_i) for the
    whole loop (Triton 3.6 spilled up to 328 B). Below, D / 2 rows are too few for Hopper's warp-group MMA (64 per
    warp group): there the first form keeps wgmma and fits two 8-warp programs per SM. IN_LOOP: see
    :func:`_column_pointers`."""
    dn = dol * inv[:, None]
    if SCALED:
        dn_scale = power_of_two_above(tl.max(tl.max(tl.abs(dn), axis=1), axis=0))
        dn = dn * (1.0 / dn_scale)
    dn = dn.to(fq.dtype)
    if HALF >= 64:  # dH_i^T's rows
        dht = tl.dot(tl.trans(dn), fq, input_precision=PRECISION)
        if SCALED:
            dht = dht * dn_scale
        tl.store(tl.trans(_column_pointers(out, offs_d, cols, D, IN_LOOP)), dht.to(out.dtype.element_ty))
    else:
        dh = tl.dot(tl.trans(fq), dn, input_precision=PRECISION)
        if SCALED:
            dh = dh * dn_scale
        tl.store(_column_pointers(out, offs_d, cols, D, IN_LOOP), dh.to(out.dtype.element_ty))
    h = tl.load(_column_pointers(hl, offs_d, cols, D, IN_LOOP))
    if SCALED:
        h = (h.to(tl.float32) * (1.0 / h_scale)).to(fq.dtype)
    return tl.dot(dol.to(fq.dtype), tl.trans(h), g, input_precision=PRECISION)


@triton.jit
def _prepass_block(
    pid_q, bh, Q, O, DO, DOL, W, w_lo, w_hi, DQ, DLSE, DELTA, HL, ZL, DHZ,
    stride_qb, stride_qh, stride_ql, stride_hl_bh, stride_hl_q, stride_zl_bh, stride_zl_q,
    H, LQ, NQ,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_DLSE: tl.constexpr,
    FEATURE_MAP: tl.constexpr, HAS_LINEAR: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_DOL: tl.constexpr, IN_LOOP: tl.constexpr,
):
    """The pre-pass of query block ``pid_q`` of head ``bh`` (see the module's docstring). IN_LOOP: one of several
    blocks of a program's loop, W's column halves then ``w_lo`` and ``w_hi`` (loaded once per program), else loaded
    here."""
    base = head_offset(bh, H, stride_qb, stride_qh)
    offs_m = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < LQ
    tile = row_tile(base, offs_m, stride_ql, offs_d)
    # Loaded tiles stay in their storage dtype (half the registers of float32) and are widened where they are used.
    do = tl.load(DO + tile, mask=row_ok[:, None], other=0.0)
    o = tl.load(O + tile, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    rows = bh.to(tl.int64) * LQ + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    tl.store(DELTA + rows, delta, mask=row_ok)

    if HAS_LINEAR:
        x = tl.load(Q + tile, mask=row_ok[:, None], other=0.0)
        fq = phi_fwd(x.to(tl.float32), FEATURE_MAP)
        # Z_i is loaded again after the loop (a [D] vector, from L1/L2) instead of being held across it: broadcast in
        # the products' register layout it took 32 registers per thread (Triton 3.6 then spilled).
        zl_ptrs = ZL + block_item(bh, pid_q, stride_zl_bh, stride_zl_q) + offs_d
        den = tl.sum(fq * tl.load(zl_ptrs).to(tl.float32)[None, :], axis=1)
        inv = tl.where(den != 0, 1.0 / tl.where(den != 0, den, 1.0), 0.0)
        fq = fq.to(x.dtype)  # phi(Q_i) in the inputs' dtype from here on: it stays live to the end
        out = DHZ + (bh.to(tl.int64) * NQ + pid_q) * (D * D + D)
        hl = HL + block_item(bh, pid_q, stride_hl_bh, stride_hl_q)
        SCALED: tl.constexpr = HL.dtype.element_ty != Q.dtype.element_ty  # float32 summaries, float16 inputs
        h_scale = power_of_two_above(tl.max(tl.load(zl_ptrs).to(tl.float32), axis=0)) if SCALED else 1.0
        # dO_l is taken in two column halves: each half gives its columns of dH_i = phi(Q_i)^T dN (a [D, D / 2]
        # accumulator) and its share of G = dO_l H_i^T (a sum over dO_l's columns), so no [D, D] accumulator and
        # no whole dO_l tile is ever live. Rows past LQ carry dO_l = 0 and add nothing to dH_i or dZ_i.
        HALF: tl.constexpr = D // 2
        cols = tl.arange(0, HALF)
        g = tl.zeros([BLOCK_Q, D], dtype=tl.float32)
        for c in tl.static_range(0, D, HALF):
            if not IN_LOOP:
                w = _w_columns(W, offs_d, c + cols, D, HAS_PROJ)
            elif c == 0:
                w = w_lo
            else:
                w = w_hi
            dol = _dol_columns(do, w, DOL, row_tile(base, offs_m, stride_ql, c + cols), row_ok, HAS_PROJ, HAS_DOL,
                               PRECISION)
            g = _dh_columns(dol, inv, fq, hl, h_scale, out, g, offs_d, c + cols, D, HALF, SCALED, PRECISION, IN_LOOP)
        if SCALED:
            g = g * h_scale
        fq = fq.to(tl.float32)
        dden = -tl.sum(g * fq, axis=1) * inv * inv
        tl.store(out + D * D + offs_d, tl.sum(fq * dden[:, None], axis=0).to(DHZ.dtype.element_ty))
        dfq = g * inv[:, None] + dden[:, None] * tl.load(zl_ptrs).to(tl.float32)[None, :]
        tl.store(DQ + tile, phi_bwd(fq, dfq, FEATURE_MAP).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_prepass_kernel(
    Q, O, DO, DOL, W, DQ, DLSE, DELTA,       # q/o/do/dol/dq [B, H, LQ, D] (q strides), W [D, D], dlse/delta [BH, LQ]
    HL, ZL, DHZ,                             # H_i, Z_i (may be broadcast over Nq); dH_i then dZ_i, [BH, Nq, D * D + D]
    stride_qb, stride_qh, stride_ql,
    stride_hl_bh, stride_hl_q, stride_zl_bh, stride_zl_q,
    H, LQ, NQ, BH,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_DLSE: tl.constexpr,
    FEATURE_MAP: tl.constexpr, HAS_LINEAR: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PROJ: tl.constexpr, HAS_DOL: tl.constexpr, PERSISTENT: tl.constexpr = False,
):
    # PERSISTENT (SLA_DIST_PREPASS=loop, the prepass_loop launch entry): a 1-D grid of configs'
    # PREPASS_LOOP_PROGRAMS_PER_SM programs per SM, each taking the items pid, pid + programs, ... of the query
    # blocks of all heads (query block fastest, so the programs running at once share a head). The body has no
    # loop of its own and one 8-warp program fills an SM's registers, so one block per program leaves the SM idle
    # on each block's loads; in a loop over blocks the software pipeliner (the launch's num_stages) can copy the
    # next block's tiles to shared memory while this block's products run.
    # W is loaded once per program, before the loop: as a loop-invariant dot operand it then stays in shared memory
    # (in the loop the pipeliner gave each column half two buffers: 64 KiB at D 128, past Hopper's 227 KiB).
    if PERSISTENT:
        offs_d = tl.arange(0, D)
        cols = tl.arange(0, D // 2)
        w_lo = _w_columns(W, offs_d, cols, D, HAS_PROJ and HAS_LINEAR)
        w_hi = _w_columns(W, offs_d, D // 2 + cols, D, HAS_PROJ and HAS_LINEAR)
        for item in tl.range(tl.program_id(0), NQ * BH, tl.num_programs(0)):
            _prepass_block(item % NQ, item // NQ, Q, O, DO, DOL, W, w_lo, w_hi, DQ, DLSE, DELTA, HL, ZL, DHZ,
                           stride_qb, stride_qh, stride_ql, stride_hl_bh, stride_hl_q, stride_zl_bh, stride_zl_q,
                           H, LQ, NQ, D, BLOCK_Q, HAS_DLSE, FEATURE_MAP, HAS_LINEAR, PRECISION, HAS_PROJ, HAS_DOL,
                           True)
    else:
        _prepass_block(tl.program_id(0), tl.program_id(1), Q, O, DO, DOL, W, 0.0, 0.0, DQ, DLSE, DELTA, HL, ZL, DHZ,
                       stride_qb, stride_qh, stride_ql, stride_hl_bh, stride_hl_q, stride_zl_bh, stride_zl_q,
                       H, LQ, NQ, D, BLOCK_Q, HAS_DLSE, FEATURE_MAP, HAS_LINEAR, PRECISION, HAS_PROJ, HAS_DOL,
                       False)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ,                         # q/do/dq [B, H, LQ, D] (q strides), k/v [B, H, LK, D]
    LSE, DELTA,                              # [BH, LQ] float32
    KV_NUM, KV_IDX,                          # [BH, Nq] int32, [BH, Nq, W] int32
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, LQ, LK, NQ, KV_WIDTH, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_LINEAR: tl.constexpr, PRECISION: tl.constexpr, V_LIKE_K: tl.constexpr = True,
    USE_TMA: tl.constexpr = False, SPLIT_Q: tl.constexpr = 1,
):
    # SPLIT_Q programs per query block (the dq_split launch entry), each taking BLOCK_Q / SPLIT_Q of its rows over
    # the block's whole key list: smaller programs, several per SM, each re-reading the list's K / V tiles.
    if SPLIT_Q > 1:
        pid_q = tl.program_id(0) // SPLIT_Q
        first_row = pid_q * BLOCK_Q + (tl.program_id(0) % SPLIT_Q) * (BLOCK_Q // SPLIT_Q)
    else:
        pid_q = tl.program_id(0)
        first_row = pid_q * BLOCK_Q
    ROWS: tl.constexpr = BLOCK_Q // SPLIT_Q
    bh = tl.program_id(1)
    q_base = head_offset(bh, H, stride_qb, stride_qh)
    k_base = head_offset(bh, H, stride_kb, stride_kh)
    v_base = k_base if V_LIKE_K else head_offset(bh, H, stride_vb, stride_vh)  # as in the forward's loop
    stride_vl = stride_kl if V_LIKE_K else stride_vl
    offs_m = first_row + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    # q and dO are loaded once, by pointers (USE_TMA is for the loop's tiles).
    tile, row_ok, q, do, lse, delta = query_rows(Q, DO, LSE, DELTA, Q, DO, q_base, bh, first_row, offs_m,
                                                 stride_ql, offs_d, LQ, False)

    dq = tl.zeros([ROWS, D], dtype=tl.float32)
    row = bh.to(tl.int64) * NQ + pid_q
    n_blocks = tl.load(KV_NUM + row)
    k_desc = row_descriptor(K, k_base, LK, stride_kl, BLOCK_K, D, USE_TMA)
    v_desc = row_descriptor(V, v_base, LK, stride_vl, BLOCK_K, D, USE_TMA)
    blocks = KV_IDX + row * KV_WIDTH
    for it in range(0, n_blocks):
        # The index in the step that uses it: loaded one step ahead, as forward and dK/dV do, dQ measured 1.6 %
        # slower at L 75600 on an H200 (level at 32768).
        start, offs_k, col_ok = listed_rows(tl.load(blocks + it), LK, BLOCK_K)
        k = load_rows(K, k_desc, k_base, start, offs_k, col_ok, stride_kl, offs_d, True, USE_TMA)
        v = load_rows(V, v_desc, v_base, start, offs_k, col_ok, stride_vl, offs_d, True, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    if HAS_LINEAR:  # the linear branch's dQ, written by the pre-pass
        dq += tl.load(DQ + tile, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _linear_keys(k, v, dk, dv, col_ok, DHS, DZS, chunk_bh, pid_k, stride_dh_bh, stride_dh_k, stride_dh_slab,
                 stride_dz_bh, stride_dz_k, offs_d, D: tl.constexpr, BLOCK_K: tl.constexpr,
                 FEATURE_MAP: tl.constexpr, PRECISION: tl.constexpr):
    """(dk, dv) of key block ``pid_k`` (rows ``col_ok`` real) plus the linear branch's terms: dV += phi(K_j) dh_j,
    dK += phi'(K_j) (V_j dh_j^T + 1 dz_j^T)."""
    x = k.to(tl.float32)
    fk = tl.where(col_ok[:, None], phi_fwd(x, FEATURE_MAP), 0.0)
    dh = tl.load(DHS + block_item(chunk_bh, pid_k, stride_dh_bh, stride_dh_k)
                 + square_in_slabs(offs_d, stride_dh_slab, D, BLOCK_K))
    dz = tl.load(DZS + block_item(chunk_bh, pid_k, stride_dz_bh, stride_dz_k) + offs_d)
    if DHS.dtype.element_ty == v.dtype:  # summaries in the inputs' dtype (bfloat16, float32)
        dv += tl.dot(fk.to(dh.dtype), dh, input_precision=PRECISION)
        dfk = tl.dot(v.to(dh.dtype), tl.trans(dh), input_precision=PRECISION) + dz[None, :]
    else:
        # float32 summaries of float16 inputs: dh_j as a float16 operand, divided by a power of two above its
        # largest magnitude (rounding nothing; as the pre-pass takes H_i); float32 operands would run the
        # products at tf32 rate (and spilled 144 B at D 128).
        dh = dh.to(tl.float32)
        dh_scale = power_of_two_above(tl.max(tl.max(tl.abs(dh), axis=1), axis=0))
        dh = (dh * (1.0 / dh_scale)).to(v.dtype)
        dv = tl.dot(fk.to(v.dtype), dh, dv * (1.0 / dh_scale), input_precision=PRECISION) * dh_scale
        dfk = tl.dot(v, tl.trans(dh), input_precision=PRECISION) * dh_scale + dz.to(tl.float32)[None, :]
    dk += tl.where(col_ok[:, None], phi_bwd(fk, dfk, FEATURE_MAP), 0.0)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,                     # q/do [B, H, LQ, D] (q strides), k/v/dk/dv [B, H, LK, D]
    LSE, DELTA,                              # [BH, LQ] float32
    Q_NUM, Q_IDX,                            # [BH, Nk] int32, [BH, Nk, Nq] int32
    DHS, DZS,                                # dh_j (rows in slabs), dz_j of the launch's heads (may be broadcast over Nk)
    ORDER,                                   # [BH' * Nk] int64, read with ORDERED: bh' * Nk + j per program
    WORK, SCRATCH,                           # with SPLIT: int32 [programs, 4] (dkdv_plan), float32 [slots, 2, BK, D]
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,         # strides of k
    stride_vb, stride_vh, stride_vl,         # strides of v
    stride_gb, stride_gh, stride_gl,         # strides of dk and dv
    stride_dh_bh, stride_dh_k, stride_dh_slab, stride_dz_bh, stride_dz_k,
    H, LQ, LK, NK, NQ, BH_FIRST, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    FEATURE_MAP: tl.constexpr, HAS_LINEAR: tl.constexpr, PRECISION: tl.constexpr,
    KEYS_AS_COLUMNS: tl.constexpr, ORDERED: tl.constexpr, SPLIT: tl.constexpr = False,
    USE_TMA: tl.constexpr = False, Q_STEPS: tl.constexpr = 1, Q_SPLIT: tl.constexpr = 1,
):
    # A launch covers the BH' heads (of B x H) from BH_FIRST on: the launcher may take the heads in chunks, so that
    # the dh_j rows of only one chunk are held at a time. bh' counts within the launch, bh over all heads.
    pid_k = tl.program_id(0)
    chunk_bh = tl.program_id(1)
    if ORDERED:  # the key block that the launcher's order (configs.DKDV_ORDERS) puts at this program's linear id
        item = tl.load(ORDER + chunk_bh * NK + pid_k).to(tl.int32)
        chunk_bh = item // NK
        pid_k = item % NK
    if SPLIT:  # (not with ORDERED) a 1-D grid; the program's row of the plan: key block, first entry, count, slot
        work = WORK + pid_k * 4
        item = tl.load(work)
        if item < 0:  # one of the launch's spare programs that the plan left unused
            return
        chunk_bh = item // NK
        pid_k = item % NK
        first = tl.load(work + 1)
        slot = tl.load(work + 3)
    bh = BH_FIRST + chunk_bh
    q_base = head_offset(bh, H, stride_qb, stride_qh)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ROWS: tl.constexpr = BLOCK_Q // (Q_SPLIT * Q_STEPS)
    offs_m0 = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    col_ok = offs_k < LK
    k = tl.load(K + row_tile(head_offset(bh, H, stride_kb, stride_kh), offs_k, stride_kl, offs_d),
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + row_tile(head_offset(bh, H, stride_vb, stride_vh), offs_k, stride_vl, offs_d),
                mask=col_ok[:, None], other=0.0)

    # KEYS_AS_COLUMNS (autotuned) accumulates dK^T and dV^T [D, BLOCK_K]: the products then split the rows of D
    # between the warp groups, so with 8 warps no warp group needs another's part of P^T or dS^T in its registers
    # (keys as rows put only 64 rows under two warp groups, which must then exchange those operands every step).
    if KEYS_AS_COLUMNS:
        dkt = tl.zeros([D, BLOCK_K], dtype=tl.float32)
        dvt = tl.zeros([D, BLOCK_K], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_K, D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_K, D], dtype=tl.float32)
    col = bh.to(tl.int64) * NK + pid_k
    if SPLIT:  # a part of the list: count entries from its first
        n_blocks = tl.load(work + 2)
    else:
        n_blocks = tl.load(Q_NUM + col)
    q_desc = row_descriptor(Q, q_base, LQ, stride_ql, ROWS, D, USE_TMA)
    do_desc = row_descriptor(DO, q_base, LQ, stride_ql, ROWS, D, USE_TMA)
    blocks = Q_IDX + col * NQ
    if SPLIT:
        blocks += first
    nxt = listed_index(blocks, 0, n_blocks)
    # A query block is taken in Q_STEPS loop steps of Q_SPLIT row slices each. Slices of one step are loaded
    # together (one pipeline stage holds them all); steps are pipelined one after the other, so with Q_STEPS > 1 a
    # stage holds 1 / Q_STEPS of a block's q and dO, and more stages (more copies in flight) fit in shared memory.
    for it in range(0, n_blocks * Q_STEPS):
        i = nxt
        if Q_STEPS > 1:
            first_slice = (it % Q_STEPS) * Q_SPLIT
            nxt = listed_index(blocks, (it + 1) // Q_STEPS, n_blocks)
        else:
            first_slice = 0
            nxt = listed_index(blocks, it + 1, n_blocks)
        for part in tl.static_range(Q_SPLIT):
            start = i * BLOCK_Q + (first_slice + part) * ROWS
            _, row_ok, q, do, lse, delta = query_rows(Q, DO, LSE, DELTA, q_desc, do_desc, q_base, bh, start,
                                                      start + offs_m0, stride_ql, offs_d, LQ, USE_TMA)
            if KEYS_AS_COLUMNS:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
                dvt += tl.dot(tl.trans(do), p.to(do.dtype), input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dkt += tl.dot(tl.trans(q), ds.to(q.dtype), input_precision=PRECISION)
            else:
                st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                pt = tl.where(col_ok[:, None] & row_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
                dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    if KEYS_AS_COLUMNS:
        dk = tl.trans(dkt)
        dv = tl.trans(dvt)
    dk = dk * sm_scale

    if HAS_LINEAR:
        if SPLIT:
            if first == 0:  # the list's first part adds the linear branch's term
                dk, dv = _linear_keys(k, v, dk, dv, col_ok, DHS, DZS, chunk_bh, pid_k, stride_dh_bh, stride_dh_k,
                                      stride_dh_slab, stride_dz_bh, stride_dz_k, offs_d, D, BLOCK_K, FEATURE_MAP,
                                      PRECISION)
        else:
            dk, dv = _linear_keys(k, v, dk, dv, col_ok, DHS, DZS, chunk_bh, pid_k, stride_dh_bh, stride_dh_k,
                                  stride_dh_slab, stride_dz_bh, stride_dz_k, offs_d, D, BLOCK_K, FEATURE_MAP,
                                  PRECISION)

    # dk, dv may take dh_j's place (the launcher's slab layout): stored only after the products that read all of dh_j.
    kv_tile = row_tile(head_offset(bh, H, stride_gb, stride_gh), offs_k, stride_gl, offs_d)
    if SPLIT:
        if slot >= 0:  # a part of a split list: float32, for the combine kernel to sum
            slot_dk = scratch_part(SCRATCH, slot, BLOCK_K, D)
            tl.store(slot_dk, dk)
            tl.store(slot_dk + BLOCK_K * D, dv)
        else:
            tl.store(DK + kv_tile, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
            tl.store(DV + kv_tile, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
    else:
        tl.store(DK + kv_tile, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + kv_tile, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
