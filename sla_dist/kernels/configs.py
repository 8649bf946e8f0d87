"""Launch settings per kernel: autotuned on a GPU, one fixed setting in the interpreter.

``get_kernel(name)`` returns something launched as ``kernel[grid](*args, **constexprs)``. On a GPU it is the Triton
kernel wrapped in ``triton.autotune`` over warps x pipeline stages, keyed on the constexprs that change the code (not
on sequence length, so a training run tunes once per layer shape, on its first real batch, never on zeros). Under
TRITON_INTERPRET=1 autotuning does not run and warps/stages mean nothing, so the kernel gets one fixed setting.
SLA_DIST_AUTOTUNE=0 turns tuning off on a GPU too (the ``fixed`` setting), e.g. for test suites that compile
hundreds of shape variants. Tuning results are cached on disk (Triton's cache directory) where Triton supports it
(3.4 and newer), so later runs and the other ranks of a node skip the search.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
from dataclasses import dataclass

import triton



@dataclass(frozen=True)
class _Tuning:
    module: str
    function: str
    key: tuple[str, ...]
    warps: tuple[int, ...]
    stages: tuple[int, ...]
    fixed: tuple[int, int]
    """(warps, stages) when not autotuning."""
    choices: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Tile-shape constexprs to tune, (name, options); the first option of each when not autotuning."""
    restore: tuple[str, ...] = ()
    """Arguments the kernel reads and writes (accumulates into): restored after every timed candidate run, or the
    first call of each shape would return a gradient summed over all the runs of the search."""

    def metas(self) -> list[dict]:
        names = [name for name, _ in self.choices]
        return [dict(zip(names, combo)) for combo in itertools.product(*(opts for _, opts in self.choices))]

    def candidates(self) -> list[tuple[dict, int, int]]:
        """Every autotune candidate as (tile-shape constexprs, warps, stages)."""
        return [(m, w, st) for m in self.metas() for w in self.warps for st in self.stages]


_CODE_KEY = ("D", "BLOCK_Q", "BLOCK_K", "FEATURE_MAP", "HAS_LINEAR")
# The candidates are what won or came close in `benchmarks/sweep_kernels.py` on an H200 (bf16, D = 128, BQ 128,
# results/2026-11-29-h200-sweep.md); the fixed setting is each kernel's winner there. Two key blocks per step in the
# forward and dQ lost everywhere (by 10-25 %), so those loops take one block per step; every candidate compiles on a
# layer shape's first call, so the list is kept short (the full search of 60 took 164 s).
_KERNELS = {
    "fwd": _Tuning("forward", "_sla_fwd_kernel", _CODE_KEY + ("HAS_PROJ", "HAS_BIAS"), (4, 8), (2, 3, 4),
                   fixed=(8, 3)),
    "summaries": _Tuning("forward", "_linear_summaries_kernel", ("D", "BLOCK_K", "FEATURE_MAP"), (4,), (1,),
                         fixed=(4, 1)),
    "block_sums": _Tuning("block_select", "_block_sums_kernel", ("D", "BLOCK"), (4,), (1,), fixed=(4, 1)),
    "classify": _Tuning("block_select", "_classify_kernel", ("NK_POW2",), (4,), (1,), fixed=(4, 1)),
    "critical_columns": _Tuning("block_select", "_critical_columns_kernel", ("NQ_POW2",), (4,), (1,), fixed=(4, 1)),
    "prepass": _Tuning("backward", "_bwd_prepass_kernel",
                       ("D", "BLOCK_Q", "FEATURE_MAP", "HAS_LINEAR", "HAS_PROJ", "HAS_DOL"), (8,), (1,), fixed=(8, 1)),
    # dQ adds to the linear branch's dQ that the pre-pass wrote.
    "dq": _Tuning("backward", "_bwd_dq_kernel", ("D", "BLOCK_Q", "BLOCK_K", "HAS_LINEAR"), (4, 8), (1, 2, 3),
                  fixed=(8, 3), restore=("DQ",)),
    "dkdv": _Tuning("backward", "_bwd_dkdv_kernel", _CODE_KEY, (4, 8), (1, 2), fixed=(8, 2),
                    choices=(("KEYS_AS_COLUMNS", (1, 0)), ("Q_SPLIT", (1, 2)))),
}


class _Fixed:
    """A kernel launched with one setting."""

    def __init__(self, fn, num_warps: int, num_stages: int, meta: dict) -> None:
        self.fn, self.num_warps, self.num_stages, self.meta = fn, num_warps, num_stages, meta

    def __getitem__(self, grid):
        return functools.partial(self.fn[grid], num_warps=self.num_warps, num_stages=self.num_stages, **self.meta)


def jit_function(name: str):
    """The bare ``triton.jit`` function of kernel ``name``, launched as ``fn[grid](..., num_warps=, num_stages=)``."""
    t = _KERNELS[name]
    return getattr(__import__(f"{__package__}.{t.module}", fromlist=[t.function]), t.function)


@functools.cache
def get_kernel(name: str):
    t = _KERNELS[name]
    fn = jit_function(name)
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("SLA_DIST_AUTOTUNE") == "0":
        return _Fixed(fn, *t.fixed, meta=t.metas()[0])
    configs = [triton.Config(m, num_warps=w, num_stages=st) for m, w, st in t.candidates()]
    cache = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=list(t.key), restore_value=list(t.restore), **cache)(fn)
