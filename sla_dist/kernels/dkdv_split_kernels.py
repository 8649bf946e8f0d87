"""Triton kernel of the split dK/dV launch (SLA_DIST_DKDV_SPLIT=long, dkdv_plan.py): the sum of a split list's parts.

The dK/dV kernel with SPLIT takes a long query-block list of key block j as several programs, each writing its
float32 partial dK_j, dV_j (the first part with the linear branch's term) to consecutive slots of a scratch buffer.
``_dkdv_combine_kernel`` runs one program per row of the plan's combine table: it adds the list's parts in slot
order (deterministic) and stores dk, dv in k's layout, rounded once. Rows past the sequence's end (a partial last
key block) are in the scratch but not stored."""

import triton
import triton.language as tl

from .tiles import head_offset, row_tile, scratch_part


@triton.jit
def _dkdv_combine_kernel(
    SCRATCH, COMBINE,                        # float32 [slots, 2, BLOCK_K, D]; int32 [rows, 3] (dkdv_plan)
    DK, DV,                                  # [B, H, LK, D] in k's strides
    stride_kb, stride_kh, stride_kl,
    H, LK, NK, BH_FIRST,
    D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = COMBINE + tl.program_id(0) * 3     # key block bh' x Nk + j, first slot, parts
    item = tl.load(row)
    if item < 0:  # fewer lists were split than the table has rows
        return
    first = tl.load(row + 1)
    parts = tl.load(row + 2)
    dk = tl.load(scratch_part(SCRATCH, first, BLOCK_K, D))
    dv = tl.load(scratch_part(SCRATCH, first, BLOCK_K, D) + BLOCK_K * D)
    for r in range(1, parts):
        slot = scratch_part(SCRATCH, first + r, BLOCK_K, D)
        dk += tl.load(slot)
        dv += tl.load(slot + BLOCK_K * D)
    offs_k = (item % NK) * BLOCK_K + tl.arange(0, BLOCK_K)
    tile = row_tile(head_offset(BH_FIRST + item // NK, H, stride_kb, stride_kh), offs_k, stride_kl, tl.arange(0, D))
    tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=(offs_k < LK)[:, None])
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=(offs_k < LK)[:, None])
