"""The median-of-runs timer that the small per-op benchmarks share."""

from __future__ import annotations

import time
from typing import Callable


def median_timer(on_gpu: bool) -> Callable[[Callable[[], object]], float]:
    """A function timing ``fn()`` in milliseconds: on a GPU the median of triton.testing.do_bench (25 ms warm-up,
    200 ms of runs); elsewhere (CPU smoke tests, the interpreter) one wall-clock call."""
    if not on_gpu:
        def wall(fn) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return wall
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
