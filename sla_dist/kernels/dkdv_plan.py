"""Which work each dK/dV program takes: the order of the programs (SLA_DIST_DKDV_ORDER) and, with
SLA_DIST_DKDV_SPLIT=long, the split of long query-block lists over several programs.

dK/dV runs one program per (key block j, head), walking the query blocks that chose j (the transposed lists
q_num_blocks / q_indices). Their lengths follow the inputs: on i.i.d. q, k about n_c Nq / Nk each, but a block map
like a randomly initialised DiT's has a few key blocks chosen by nearly every query block. Ordering the programs
longest first starts those early; it cannot help once one list is longer than the launch's balanced share of work
per SM, or once there are more long lists than SMs. The split cuts such lists into parts, each a program of its own.

Both work on the lengths where they are (the GPU): the orders with PyTorch ops, the split's plan with one Triton
launch (kernels/dkdv_split_kernels.py); no host synchronisation, and shapes that depend on the problem's sizes only,
so CUDA graphs and torch.compile take them as they take the kernels. :func:`split_plan_reference` is the plan in
plain Python: its definition, and what the benchmarks' wave model schedules.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .configs import (DKDV_ORDERS, DKDV_PROGRAM_COST, DKDV_SPLIT_MIN_PART, DKDV_SPLIT_MIN_SLOTS,
                      DKDV_SPLIT_PARTS_PER_SM, DKDV_SPLIT_SLOT_FRACTION, LONG_FIRST_FACTOR)

WORK_FIELDS = 4
"""Columns of the split plan's work table: key block (bh' x Nk + j, -1: no work), first listed query block, count,
scratch slot (-1: the list is whole, the program writes dk, dv itself)."""
COMBINE_FIELDS = 3
"""Columns of the split plan's combine table: key block (-1: none), first scratch slot, parts."""


def dkdv_program_order(q_num_blocks: torch.Tensor, order: str) -> torch.Tensor | None:
    """The key block, as bh * Nk + j, that each dK/dV program takes, by linear program id (key block fastest), for
    ``order`` (configs.DKDV_ORDERS): what :func:`program_order_ref` defines, long-first (the default) made by one
    Triton launch, the others by PyTorch ops. ``q_num_blocks`` [..., Nk]: the launch's list lengths."""
    if order != "long-first":
        return program_order_ref(q_num_blocks, order)
    from .configs import get_kernel

    lengths = q_num_blocks.reshape(-1)
    lists = lengths.numel()
    programs = torch.empty(lists, dtype=torch.int64, device=lengths.device)
    get_kernel("long_first_order")[(-(-lists // ORDER_ROWS),)](
        lengths, programs, lists, LONG_FACTOR=LONG_FIRST_FACTOR, BLOCK=_lengths_block(lists), ROWS=ORDER_ROWS,
        COLS=ORDER_COLS)
    return programs


def _lengths_block(lists: int) -> int:
    """Lengths the order and plan kernels load per step when they sum all ``lists`` lists' lengths: a power of two
    covering them, from 16 up to 4096."""
    return min(4096, max(16, 1 << (lists - 1).bit_length()))


ORDER_ROWS, ORDER_COLS = 16, 512
"""Lists per program of the long-first order kernel (384 programs at L 32768, H 12), and the other lists it
compares them with per step (12 steps there). 128 lists a program and 32 a step (48 programs of 192 dependent
steps) took 72 us on an H200, against ~25 us for the PyTorch ops (2026-12-02)."""


def program_order_ref(q_num_blocks: torch.Tensor, order: str) -> torch.Tensor | None:
    """The dK/dV program orders in PyTorch ops: None for natural (program (j, bh) takes key block j of head bh); else
    int64 [BH * Nk], the programs sorted by their list's length q_num_blocks [B, H, Nk], longest first, over the
    whole grid (lpt) or within each head (lpt-head), or only those longer than LONG_FIRST_FACTOR x the mean (exactly:
    length x lists > LONG_FIRST_FACTOR x total length), the rest after them in the grid's order (long-first). The
    sorts are stable: equal lengths keep the grid's order."""
    if order == "natural":
        return None
    flat = q_num_blocks.flatten()
    if order == "lpt":
        return torch.argsort(flat, descending=True, stable=True)
    if order == "long-first":
        long = flat.double() * flat.numel() > LONG_FIRST_FACTOR * flat.sum().double()
        return torch.argsort(flat * long, descending=True, stable=True)  # the short ones' lengths zeroed
    if order == "lpt-head":
        counts = q_num_blocks.flatten(0, -2)
        within = torch.argsort(counts, dim=-1, descending=True, stable=True)
        return (within + torch.arange(0, counts.numel(), counts.shape[-1], device=counts.device)[:, None]).flatten()
    raise ValueError(f"dK/dV order {order!r}; choose one of {DKDV_ORDERS}")


class SplitPlan(NamedTuple):
    """What each program of a split dK/dV launch does (:func:`dkdv_split_plan`)."""

    work: torch.Tensor
    """int32 [programs, WORK_FIELDS], one row per program in launch order."""
    combine: torch.Tensor
    """int32 [slots // 2, COMBINE_FIELDS], one row per split list (a split list takes at least two slots)."""
    part: torch.Tensor
    """The part length T (int32 scalar): a list of n query blocks is taken as ceil(n / T) parts."""


def split_slots(programs: int) -> int:
    """Scratch slots (and extra programs) of a split launch over ``programs`` key blocks: a fixed share of the grid
    (configs.DKDV_SPLIT_SLOT_FRACTION), so the launch's shape does not depend on the block map."""
    return max(DKDV_SPLIT_MIN_SLOTS, -(-programs // DKDV_SPLIT_SLOT_FRACTION))


SPLIT_ORDERS = {"natural": 0, "lpt-head": 1, "long-first": 2}
"""The split launch's program orders (configs.DKDV_ORDERS; SPLIT_ORDERS[order] is the plan kernel's MODE), as
:func:`dkdv_program_order` orders whole lists, applied to the parts: natural, the lists in turn (each list's parts
together); lpt-head, the heads in turn, within each the parts longest first (stable); long-first, the parts longer
than LONG_FIRST_FACTOR x the mean part of all heads first, then the others, each class in the lists' order (the
whole-list order sorts its long class by length; here all long parts but the lists' last are T long). lpt, a sort
over all heads, has no split form: it would rank every part against every other, and it measured slower than
long-first on i.i.d. maps (PERF_NOTES 2026-11-30)."""


def split_windows(order: str, heads: int) -> int:
    """What the part length's starting value divides the balanced work per SM by, for ``order`` over ``heads``
    (configs.DKDV_SPLIT_PARTS_PER_SM says why)."""
    if order not in SPLIT_ORDERS:
        raise ValueError(f"dK/dV order {order!r} with the split (SLA_DIST_DKDV_SPLIT=long); choose one of "
                         f"{tuple(SPLIT_ORDERS)}")
    return max(heads, DKDV_SPLIT_PARTS_PER_SM) if SPLIT_ORDERS[order] < 2 else DKDV_SPLIT_PARTS_PER_SM


def dkdv_split_plan(q_num_blocks: torch.Tensor, order: str, sms: int, slots: int | None = None) -> SplitPlan:
    """The split launch's plan (what :func:`split_plan_reference` describes), made on the device by one Triton
    launch (programs of PLAN_ROWS lists of one head) from the lengths ``q_num_blocks`` [..., Nk] (contiguous; the
    leading dims are the launch's heads), on ``sms`` SMs, with ``slots`` scratch slots (default
    :func:`split_slots`)."""
    from .configs import get_kernel

    nk = q_num_blocks.shape[-1]
    lists = q_num_blocks.numel()
    slots = _check_slots(split_slots(lists) if slots is None else slots)
    device = q_num_blocks.device
    work = torch.empty((lists + slots, WORK_FIELDS), dtype=torch.int32, device=device)
    combine = torch.empty((slots // 2, COMBINE_FIELDS), dtype=torch.int32, device=device)
    part = torch.empty((1,), dtype=torch.int32, device=device)
    get_kernel("dkdv_split_plan")[(lists // nk, -(-nk // PLAN_ROWS))](
        q_num_blocks, work, combine, part, lists, nk, slots, sms * split_windows(order, lists // nk),
        MODE=SPLIT_ORDERS[order], COST=DKDV_PROGRAM_COST, MIN_PART=DKDV_SPLIT_MIN_PART,
        LONG_FACTOR=LONG_FIRST_FACTOR, BLOCK=_lengths_block(lists), ROWS=PLAN_ROWS,
        COLS=PLAN_COLS)
    return SplitPlan(work, combine, part[0])


PLAN_ROWS, PLAN_COLS = 128, 32
"""Lists per program of the plan kernel (48 programs at L 32768, H 12; each also reads all lists' lengths a few
times, up to 4096 a step), and the other lists per step of its lpt-head comparisons ([ROWS, COLS] tiles: no
spills on sm_90, 104-128 registers)."""


def _check_slots(slots: int) -> int:
    if slots < 2:
        raise ValueError(f"slots={slots}: a split list takes at least 2")
    return slots


def split_plan_reference(q_num_blocks: torch.Tensor, order: str, sms: int, slots: int | None = None) -> SplitPlan:
    """The split launch's plan in plain Python (the definition the plan kernel is tested against, and what the
    benchmarks' wave model schedules; it reads the lengths back to the host). ``q_num_blocks`` [..., Nk]: the list
    lengths of the launch's heads; ``sms``: the GPU's SMs; ``slots``: scratch slots, and as many extra programs
    (default :func:`split_slots`).

    The part length T starts at the balanced work per SM ((listed pairs + DKDV_PROGRAM_COST x lists) / sms) over
    :func:`split_windows`, at least DKDV_SPLIT_MIN_PART, and grows by a quarter (rounded up) while the split lists'
    parts need more than ``slots`` slots (it ends at the longest list at most, where nothing is split). A list of
    n > T query blocks is taken by ceil(n / T) programs, each over T consecutive entries of its list (the last over
    the rest), which write consecutive scratch slots; the first adds the linear branch's term. Other lists keep one
    program, which writes dk, dv itself. The programs come in the order SPLIT_ORDERS gives ``order``; the unused
    ones (no work) come last."""
    nk = q_num_blocks.shape[-1]
    n = [int(x) for x in q_num_blocks.reshape(-1).tolist()]
    lists, slots = len(n), _check_slots(split_slots(len(n)) if slots is None else slots)
    total = sum(n)
    spread = sms * split_windows(order, lists // nk)
    part = max(DKDV_SPLIT_MIN_PART, -(-(total + DKDV_PROGRAM_COST * lists) // spread))
    while sum(p for p in (-(-x // part) for x in n) if p > 1) > slots:
        part += -(-part // 4)
    parts = [max(1, -(-x // part)) for x in n]
    items = sum(parts)
    rows, combine, slot = [], [], 0
    for i, (x, p) in enumerate(zip(n, parts)):
        for r in range(p):
            count = min(part, x - r * part)
            long = count * items > LONG_FIRST_FACTOR * total
            key = ((), (i // nk, -count), (not long,))[SPLIT_ORDERS[order]]
            rows.append((key, len(rows), [i, r * part, count, slot + r if p > 1 else -1]))
        if p > 1:
            combine.append([i, slot, p])
            slot += p
    work = [row for _, _, row in sorted(rows)] + [[-1, 0, 0, -1]] * (lists + slots - items)
    combine += [[-1, 0, 0]] * (slots // 2 - len(combine))
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=q_num_blocks.device)
    return SplitPlan(as_tensor(work), as_tensor(combine), as_tensor(part))
