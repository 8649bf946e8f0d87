"""The kernel test grid: every combination on a GPU, a covering sample on CPU (the interpreter is slow)."""

from __future__ import annotations

import itertools
import os
import random
from typing import Any, Callable

Case = dict[str, Any]


def product(axes: dict[str, list[Any]], keep: Callable[[Case], bool]) -> list[Case]:
    return [c for c in (dict(zip(axes, combo)) for combo in itertools.product(*axes.values())) if keep(c)]


def covering_sample(axes: dict[str, list[Any]], size: int, keep: Callable[[Case], bool], seed: int = 0) -> list[Case]:
    """A deterministic sample of the kept cartesian product in which every value of every axis appears at least once
    (greedy: take the case that covers the most unseen (axis, value) pairs), topped up at random to ``size``."""
    names = list(axes)
    cases = product(axes, keep)
    random.Random(seed).shuffle(cases)
    unseen = {(n, repr(v)) for n in names for v in axes[n]}
    chosen: list[Case] = []
    while unseen:
        best = max(cases, key=lambda c: sum((n, repr(c[n])) in unseen for n in names))
        chosen.append(best)
        cases.remove(best)
        unseen -= {(n, repr(best[n])) for n in names}
    chosen += cases[: max(0, size - len(chosen))]
    return chosen


def grid(axes: dict[str, list[Any]], cpu_size: int, on_gpu: bool, keep: Callable[[Case], bool]) -> list[Case]:
    """All kept combinations on a GPU or with SLA_FULL_GRID=1; otherwise a covering sample of ``cpu_size``."""
    if on_gpu or os.environ.get("SLA_FULL_GRID") == "1":
        return product(axes, keep)
    return covering_sample(axes, cpu_size, keep)


def case_id(case: Case) -> str:
    return "-".join(str(v).replace("torch.", "") for v in case.values())
