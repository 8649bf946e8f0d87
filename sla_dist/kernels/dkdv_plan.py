"""Which work each dK/dV program takes: the order of the programs (SLA_DIST_DKDV_ORDER) and, with
SLA_DIST_DKDV_SPLIT=long, the split of long query-block lists over several programs.

dK/dV runs one program per (key block j, head), walking the query blocks that chose j (the transposed lists
q_num_blocks / q_indices). Their lengths follow the inputs: on i.i.d. q, k about n_c Nq / Nk each, but a block map
like a randomly initialised DiT's has a few key blocks chosen by nearly every query block. Ordering the programs
longest first starts those early; it cannot help once one list is longer than the launch's balanced share of work
per SM, or once there are more long lists than SMs. The split cuts such lists into parts, each a program of its own.

Everything here is PyTorch on the lengths where they are (the GPU): no host synchronisation and shapes that depend
on the problem's sizes only, so CUDA graphs and torch.compile take it as they take the kernels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .configs import (DKDV_ORDERS, DKDV_PROGRAM_COST, DKDV_SPLIT_MIN_PART, DKDV_SPLIT_MIN_SLOTS,
                      DKDV_SPLIT_PARTS_PER_SM, DKDV_SPLIT_SLOT_FRACTION, LONG_FIRST_FACTOR)

WORK_FIELDS = 4
"""Columns of the split plan's work table: key block (bh' x Nk + j, -1: no work), first listed query block, count,
scratch slot (-1: the list is whole, the program writes dk, dv itself)."""
COMBINE_FIELDS = 3
"""Columns of the split plan's combine table: key block (-1: none), first scratch slot, parts."""


def dkdv_program_order(q_num_blocks: torch.Tensor, order: str, mean: torch.Tensor | None = None) -> torch.Tensor | None:
    """The key block, as bh * Nk + j, that each dK/dV program takes, by linear program id (key block fastest), for
    ``order`` (configs.DKDV_ORDERS): None for natural (program (j, bh) takes key block j of head bh); else int64
    [BH * Nk], the programs sorted by their list's length q_num_blocks [B, H, Nk], longest first, over the whole grid
    (lpt) or within each head (lpt-head), or only those longer than LONG_FIRST_FACTOR x the mean (``mean``, by
    default the lengths'), the rest after them in the grid's order (long-first). The sorts are stable: equal lengths
    keep the grid's order."""
    if order == "natural":
        return None
    flat = q_num_blocks.flatten()
    if order == "lpt":
        return torch.argsort(flat, descending=True, stable=True)
    if order == "long-first":
        long = flat > LONG_FIRST_FACTOR * (flat.float().mean() if mean is None else mean)
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
    """The part length T (int64 scalar): a list of n query blocks is taken as ceil(n / T) parts."""


def split_slots(programs: int) -> int:
    """Scratch slots (and extra programs) of a split launch over ``programs`` key blocks: a fixed share of the grid
    (configs.DKDV_SPLIT_SLOT_FRACTION), so the launch's shape does not depend on the block map."""
    return max(DKDV_SPLIT_MIN_SLOTS, -(-programs // DKDV_SPLIT_SLOT_FRACTION))


def dkdv_split_plan(q_num_blocks: torch.Tensor, num_query_blocks: int, order: str, sms: int,
                    slots: int | None = None) -> SplitPlan:
    """The split launch's plan for the lists of lengths ``q_num_blocks`` [..., Nk] (at most ``num_query_blocks``
    each; the leading dims are the launch's heads), on ``sms`` SMs, with ``slots`` scratch slots (default
    :func:`split_slots`) and as many extra programs.

    The part length T is the balanced work per SM ((listed pairs + DKDV_PROGRAM_COST x programs) / sms) over
    DKDV_SPLIT_PARTS_PER_SM, at least DKDV_SPLIT_MIN_PART, doubled until the split lists' parts fit the slots (the
    last candidate, T >= num_query_blocks, splits nothing). A list of n > T query blocks is taken by ceil(n / T)
    programs, each over T consecutive entries of its list (the last over the rest), in consecutive scratch slots;
    the first part adds the linear branch's term. Other lists keep one program, which writes dk, dv itself. The
    programs come in list order, each list's parts together, then reordered by their counts as ``order``
    (configs.DKDV_ORDERS) orders whole lists; the unused programs (no work) come last in every order."""
    nk = q_num_blocks.shape[-1]
    n = q_num_blocks.reshape(-1).long()
    lists, device = n.numel(), n.device
    slots = split_slots(lists) if slots is None else slots
    if slots < 2:
        raise ValueError(f"slots={slots}: a split list takes at least 2")
    balanced = (n.sum() + DKDV_PROGRAM_COST * lists) / sms
    base = torch.ceil(balanced / DKDV_SPLIT_PARTS_PER_SM).long().clamp(min=DKDV_SPLIT_MIN_PART)
    doublings = max(0, math.ceil(math.log2(max(num_query_blocks, 1) / DKDV_SPLIT_MIN_PART)))
    candidates = base * 2 ** torch.arange(doublings + 1, device=device)
    parts = -(-n // candidates[:, None])  # [candidates, lists]
    taken = torch.where(parts > 1, parts, 0).sum(1)  # slots each candidate needs
    part = candidates[(taken <= slots).int().argmax()]  # the first that fits (argmax: the first maximum)

    parts = (-(-n // part)).clamp(min=1)
    split = parts > 1
    ends = parts.cumsum(0)
    slot_ends = torch.where(split, parts, 0).cumsum(0)
    program = torch.arange(lists + slots, device=device)
    of = torch.searchsorted(ends, program, right=True)  # the list whose parts cover each program; lists: none
    real = of < lists
    of = of.clamp(max=lists - 1)
    index = program - (ends - parts)[of]  # the program's part of its list
    first = index * part
    count = torch.where(real, torch.minimum(n[of] - first, part), 0)
    slot = torch.where(real & split[of], slot_ends[of] - parts[of] + index, -1)
    work = torch.stack([torch.where(real, of, -1), first, count, slot], 1)  # an unused program's first: never read
    rank = _part_order(work[:, 2], torch.where(real, of // nk, lists), n.sum() / ends[-1], order)
    if rank is not None:
        work = work[rank]

    which = torch.searchsorted(split.long().cumsum(0), torch.arange(slots // 2, device=device), right=True)
    combined = which < lists
    which = which.clamp(max=lists - 1)
    combine = torch.stack([torch.where(combined, which, -1), slot_ends[which] - parts[which], parts[which]], 1)
    return SplitPlan(work.int(), combine.int(), part)


def _part_order(count: torch.Tensor, head: torch.Tensor, mean: torch.Tensor, order: str) -> torch.Tensor | None:
    """:func:`dkdv_program_order` for the split launch's programs: ``count`` their query blocks, ``head`` their head
    within the launch (past the last for the unused programs, which every order leaves last), ``mean`` the mean
    count of the programs with work. None: the list order as it is (natural)."""
    if order == "lpt-head":  # longest first within each head, the heads in turn (parts per head vary in number)
        return torch.argsort(head * (count.max() + 1) - count, stable=True)
    return dkdv_program_order(count, order, mean)
