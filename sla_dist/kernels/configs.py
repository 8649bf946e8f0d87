"""Launch settings per kernel: autotuned on a GPU, one fixed setting in the interpreter.

``get_kernel(name)`` returns something launched as ``kernel[grid](*args, **constexprs)``. On a GPU it is the Triton
kernel wrapped in ``triton.autotune`` over warps x pipeline stages, keyed on the constexprs that change the code (not
on sequence length, so a training run tunes once per layer shape, on its first real batch, never on zeros). Under
TRITON_INTERPRET=1 autotuning does not run and warps/stages mean nothing, so the kernel gets one fixed setting.
"""

from __future__ import annotations

import functools
import os

import triton

# kernel name -> (module, function, autotune key, warps options, stages options)
_KERNELS = {
    "fwd": ("forward", "_sla_fwd_kernel", ("D", "BLOCK_Q", "BLOCK_K", "FEATURE_MAP", "HAS_LINEAR"), (4, 8), (2, 3, 4)),
    "summaries": ("forward", "_linear_summaries_kernel", ("D", "BLOCK_K", "FEATURE_MAP"), (4, 8), (1, 2)),
    "delta": ("backward", "_bwd_delta_kernel", ("D", "BLOCK_Q"), (4,), (1,)),
    "dq": ("backward", "_bwd_dq_kernel", ("D", "BLOCK_Q", "BLOCK_K", "FEATURE_MAP", "HAS_LINEAR"), (4, 8), (1, 2, 3)),
    "dkdv": ("backward", "_bwd_dkdv_kernel", ("D", "BLOCK_Q", "BLOCK_K", "FEATURE_MAP", "HAS_LINEAR"), (4, 8),
             (1, 2, 3)),
}


class _Fixed:
    """A kernel launched with one setting (the interpreter ignores it; it only has to be valid)."""

    def __init__(self, fn, num_warps: int, num_stages: int) -> None:
        self.fn, self.num_warps, self.num_stages = fn, num_warps, num_stages

    def __getitem__(self, grid):
        return functools.partial(self.fn[grid], num_warps=self.num_warps, num_stages=self.num_stages)


@functools.cache
def get_kernel(name: str):
    module, attr, key, warps, stages = _KERNELS[name]
    fn = getattr(__import__(f"{__package__}.{module}", fromlist=[attr]), attr)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _Fixed(fn, warps[0], stages[0])
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]
    return triton.autotune(configs=configs, key=list(key))(fn)
