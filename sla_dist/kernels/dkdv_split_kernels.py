"""Triton kernels of dK/dV's work plan (dkdv_plan.py): the long-first program order, and for the split launch
(SLA_DIST_DKDV_SPLIT=long) its plan and the sum of a split list's parts.

``_long_first_order_kernel`` ranks the key blocks' lists for the default program order on the device, in one
launch where PyTorch took a mean, three elementwise ops and a radix sort (~0.2 ms of host time a backward on the
H200's host, ~25 us on the GPU; the kernel ~19 us at L 32768, H 12, 2026-12-02).

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


@triton.jit
def _list_parts(Q_NUM, start, offs, end, part):
    """(lengths, parts: at least 1 per list, 0 past ``end``) of the lists ``start + offs``."""
    ok = start + offs < end
    n = tl.load(Q_NUM + start + offs, mask=ok, other=0)
    return n, tl.where(ok, tl.maximum((n + part - 1) // part, 1), 0)


@triton.jit
def _plan_totals(Q_NUM, LISTS, part, BLOCK: tl.constexpr):
    """(scratch slots the split lists take, programs with work) for part length ``part``."""
    offs = tl.arange(0, BLOCK)
    slots = tl.zeros((), dtype=tl.int32)
    items = tl.zeros((), dtype=tl.int32)
    for start in range(0, LISTS, BLOCK):
        _, parts = _list_parts(Q_NUM, start, offs, LISTS, part)
        slots += tl.sum(tl.where(parts > 1, parts, 0), axis=0)
        items += tl.sum(parts, axis=0)
    return slots, items


@triton.jit
def _long(count, items, total, LONG_FACTOR: tl.constexpr):
    """Whether a part of ``count`` query blocks is long: above LONG_FACTOR x the mean part (``total`` listed pairs
    over ``items`` parts), compared as the reference does, in float64 (exact at these sizes)."""
    return count.to(tl.float64) * items > LONG_FACTOR * total.to(tl.float64)


@triton.jit
def _list_classes(n, parts, part, items, total, LONG_FACTOR: tl.constexpr):
    """(whether a list's full parts (T long) are long, whether its last part is, its long parts)."""
    full_long = _long(part, items, total, LONG_FACTOR)
    last_long = _long(n - (parts - 1) * part, items, total, LONG_FACTOR) & (parts > 0)
    return full_long, last_long, tl.where(parts > 0, (parts - 1) * full_long.to(tl.int32) + last_long.to(tl.int32), 0)


@triton.jit
def _long_first_order_kernel(
    Q_NUM, ORDER,                            # int32 [LISTS] list lengths (bh' x Nk + j); int64 [LISTS] key blocks
    LISTS,
    LONG_FACTOR: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """dkdv_plan.program_order_ref's long-first order, one program per ROWS lists: a list's program is its stable
    descending rank by key (its length when long, above LONG_FACTOR x the mean length; else 0), the number of
    lists with a larger key plus those with an equal key before it. Each program sums all lengths (BLOCK a step),
    then compares its lists with every other (COLS a step), and stores each list's key block at its rank."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((), dtype=tl.int32)
    for start in range(0, LISTS, BLOCK):
        total += tl.sum(tl.load(Q_NUM + start + offs, mask=start + offs < LISTS, other=0), axis=0)
    mine = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n = tl.load(Q_NUM + mine, mask=mine < LISTS, other=0)
    key = tl.where(_long(n, LISTS, total, LONG_FACTOR), n, 0)
    rank = tl.zeros([ROWS], dtype=tl.int32)
    cols = tl.arange(0, COLS)
    for start in range(0, LISTS, COLS):
        other = start + cols
        m = tl.load(Q_NUM + other, mask=other < LISTS, other=0)
        other_key = tl.where(other < LISTS, tl.where(_long(m, LISTS, total, LONG_FACTOR), m, 0), -1)
        ahead = (other_key[None, :] > key[:, None]) | (
            (other_key[None, :] == key[:, None]) & (other[None, :] < mine[:, None]))
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    tl.store(ORDER + rank, mine.to(tl.int64), mask=mine < LISTS)


@triton.jit
def _last_parts(Q_NUM, start, offs, end, part):
    """(lengths, parts, the last part's length: -1 past ``end``) of the lists ``start + offs``."""
    n, parts = _list_parts(Q_NUM, start, offs, end, part)
    return n, parts, tl.where(parts > 0, n - (parts - 1) * part, -1)


@triton.jit
def _dkdv_split_plan_kernel(
    Q_NUM,                                   # int32 [LISTS]: the launch's list lengths, head by head (NK each)
    WORK, COMBINE, PART,                     # int32 [LISTS + SLOTS, 4], [SLOTS // 2, 3], [1] (dkdv_plan.SplitPlan)
    LISTS, NK, SLOTS, SPREAD,                # SPREAD: SMs x dkdv_plan.split_windows
    MODE: tl.constexpr, COST: tl.constexpr, MIN_PART: tl.constexpr, LONG_FACTOR: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """dkdv_plan.split_plan_reference, one program per ROWS lists of one head (grid: heads x ceil(NK / ROWS)).
    Each program makes the part length and the counts it needs from all lists, BLOCK a step (the programs share
    nothing; they are few and the lists small), then writes its lists' rows: each list's r-th part at the position
    the order (MODE, dkdv_plan.SPLIT_ORDERS) gives it, from prefix counts of parts, long parts and T-long parts
    (all parts of a list but the last are T long, and none is longer), and for lpt-head the stable descending rank
    of its last part among the head's, by comparing it with every other (COLS a step)."""
    head = tl.program_id(0)
    first_list = head * NK
    row_start = first_list + tl.program_id(1) * ROWS
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((), dtype=tl.int32)
    for start in range(0, LISTS, BLOCK):
        n, _ = _list_parts(Q_NUM, start, offs, LISTS, 1)
        total += tl.sum(n, axis=0)
    part = tl.maximum((total + COST * LISTS + SPREAD - 1) // SPREAD, MIN_PART)
    slots, items = _plan_totals(Q_NUM, LISTS, part, BLOCK)
    while slots > SLOTS:  # ends where nothing is split (slots 0) at the latest
        part += (part + 3) // 4
        slots, items = _plan_totals(Q_NUM, LISTS, part, BLOCK)

    # Counts over the lists before this program's first (all heads'), over this head's lists before it, this head's
    # and all lists.
    items_before = tl.zeros((), dtype=tl.int32)
    items_head = tl.zeros((), dtype=tl.int32)  # parts of the heads before this one
    long_before = tl.zeros((), dtype=tl.int32)
    long_all = tl.zeros((), dtype=tl.int32)
    fulls_before = tl.zeros((), dtype=tl.int32)  # T-long parts of this head's lists before this program's
    full_own = tl.zeros((), dtype=tl.int32)  # full parts (all but each list's last) of this head
    slots_before = tl.zeros((), dtype=tl.int32)
    splits_before = tl.zeros((), dtype=tl.int32)
    splits_all = tl.zeros((), dtype=tl.int32)
    for start in range(0, LISTS, BLOCK):
        index = start + offs
        n, parts, last = _last_parts(Q_NUM, start, offs, LISTS, part)
        _, _, longs = _list_classes(n, parts, part, items, total, LONG_FACTOR)
        before = index < row_start
        own = (index >= first_list) & (index < first_list + NK)
        split = parts > 1
        items_before += tl.sum(tl.where(before, parts, 0), axis=0)
        items_head += tl.sum(tl.where(index < first_list, parts, 0), axis=0)
        long_before += tl.sum(tl.where(before, longs, 0), axis=0)
        long_all += tl.sum(longs, axis=0)
        fulls_before += tl.sum(tl.where(before & own, parts - 1 + (last == part).to(tl.int32), 0), axis=0)
        full_own += tl.sum(tl.where(own, parts - 1, 0), axis=0)
        slots_before += tl.sum(tl.where(before & split, parts, 0), axis=0)
        splits_before += tl.sum((before & split).to(tl.int32), axis=0)
        splits_all += tl.sum(split.to(tl.int32), axis=0)

    # This program's lists: exclusive prefix counts, from the counts before them.
    rows = tl.arange(0, ROWS)
    n, parts, last = _last_parts(Q_NUM, row_start, rows, first_list + NK, part)
    full_long, last_long, longs = _list_classes(n, parts, part, items, total, LONG_FACTOR)
    split = parts > 1
    placed = items_before + tl.cumsum(parts, axis=0) - parts
    long_rank = long_before + tl.cumsum(longs, axis=0) - longs
    fulls = tl.where(parts > 0, parts - 1 + (last == part).to(tl.int32), 0)  # the list's T-long parts
    full_rank = fulls_before + tl.cumsum(fulls, axis=0) - fulls
    split_parts = tl.where(split, parts, 0)
    slot = slots_before + tl.cumsum(split_parts, axis=0) - split_parts
    row = splits_before + tl.cumsum(split.to(tl.int32), axis=0) - split.to(tl.int32)
    tl.store(COMBINE + row * 3, row_start + rows, mask=split)
    tl.store(COMBINE + row * 3 + 1, slot, mask=split)
    tl.store(COMBINE + row * 3 + 2, parts, mask=split)
    if MODE == 1:  # a last part shorter than T: after the head's T-long parts, by its stable descending rank
        last_rank = tl.zeros([ROWS], dtype=tl.int32)
        cols = tl.arange(0, COLS)
        for other in range(first_list, first_list + NK, COLS):
            _, _, others = _last_parts(Q_NUM, other, cols, first_list + NK, part)
            ahead = (others[None, :] > last[:, None]) | (
                (others[None, :] == last[:, None]) & ((other + cols)[None, :] < (row_start + rows)[:, None]))
            last_rank += tl.sum(ahead.to(tl.int32), axis=1)
    for r in range(0, tl.max(parts, axis=0)):
        if MODE == 0:  # the lists in turn
            pos = placed + r
        elif MODE == 1:  # the heads in turn, the parts longest first within each (T-long ones first)
            pos = items_head + tl.where((r < parts - 1) | (last == part), full_rank + r, full_own + last_rank)
        else:  # the long parts of all heads first, then the others, each in the lists' order
            is_long = tl.where(r < parts - 1, full_long, last_long)
            long_at = long_rank + r * full_long.to(tl.int32)  # the parts before r are full ones
            short_at = placed - long_rank + r * (1 - full_long.to(tl.int32))
            pos = tl.where(is_long, long_at, long_all + short_at)
        ok = r < parts
        tl.store(WORK + pos * 4, row_start + rows, mask=ok)
        tl.store(WORK + pos * 4 + 1, r * part, mask=ok)
        tl.store(WORK + pos * 4 + 2, tl.minimum(n - r * part, part), mask=ok)
        tl.store(WORK + pos * 4 + 3, tl.where(split, slot + r, -1), mask=ok)

    if (head == 0) & (tl.program_id(1) == 0):  # the rows no list took, and the part length
        for start in range(items, LISTS + SLOTS, BLOCK):
            unused = start + offs < LISTS + SLOTS
            tl.store(WORK + (start + offs) * 4, tl.full([BLOCK], -1, tl.int32), mask=unused)
            tl.store(WORK + (start + offs) * 4 + 1, tl.zeros([BLOCK], tl.int32), mask=unused)
            tl.store(WORK + (start + offs) * 4 + 2, tl.zeros([BLOCK], tl.int32), mask=unused)
            tl.store(WORK + (start + offs) * 4 + 3, tl.full([BLOCK], -1, tl.int32), mask=unused)
        for start in range(splits_all, SLOTS // 2, BLOCK):
            unused = start + offs < SLOTS // 2
            tl.store(COMBINE + (start + offs) * 3, tl.full([BLOCK], -1, tl.int32), mask=unused)
            tl.store(COMBINE + (start + offs) * 3 + 1, tl.zeros([BLOCK], tl.int32), mask=unused)
            tl.store(COMBINE + (start + offs) * 3 + 2, tl.zeros([BLOCK], tl.int32), mask=unused)
        tl.store(PART, part)
