"""A DiT's Linear -> tanh-GELU -> Linear MLP with the GELU's backward in one pass over the hidden activations.

Notation: x [M, dim] (tokens as rows), up: h = x W1^T + b1 [M, hidden], a = gelu(h) (tanh approximation, as Wan),
down: y = a W2^T + b2. The backward needs dh = (dy W2) * gelu'(h), a itself (for dW2 = dy^T a) and db1 = sum over
rows of dh. Holding a from the forward costs one [M, hidden] tensor per layer (587 MB at 32K tokens, hidden 8960,
bf16), so a is made again from h, as torch.compile's partitioner also chooses. Compiled, that pass (read dy W2 and
h; write dh and a; sum dh's columns) took 1.08 ms per layer on an H200 (~2.2 TB/s, 32 ms of a 1.3B DiT training
step, 2026-12-01 profile), a column reduction fused into a pointwise kernel. Here one Triton kernel moves the same
four tensors: each program takes a tile of columns over a run of rows, stores dh and a, and writes its run's
float32 column sums of dh; one small sum over runs gives db1. The products stay cuBLAS matmuls.

The op ``sla_dist::gelu_tanh_backward`` runs the kernel on CUDA (or any device under TRITON_INTERPRET=1) and the
same arithmetic in PyTorch elsewhere, so the MLP function below runs, traces and compiles anywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import layout
from .op import triton_runs_on
from .projection import column_sums

FUSED_MLP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The activation dtypes the fused MLP takes."""


def gelu_tanh_backward_ref(ga: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, a, db) in PyTorch: dh = ga * gelu'(h) and a = gelu(h) in h's dtype, db = dh's column sums in float32,
    for ga, h [M, N]."""
    dh = torch.ops.aten.gelu_backward(ga, h, approximate="tanh")
    return dh, F.gelu(h, approximate="tanh"), dh.sum(0, dtype=torch.float32)


@dataclass(frozen=True)
class BackwardLaunch:
    """The kernel's tiling: ``block_n`` columns by ``block_m`` rows a step, ``rows`` rows a program (their column
    sums are added in registers; fewer rows, more partial rows for the final sum), ``warps`` per program."""

    block_m: int = 16
    block_n: int = 64
    rows: int = 256
    warps: int = 2

    def __post_init__(self) -> None:
        if self.rows % self.block_m:
            raise ValueError(f"BackwardLaunch: rows={self.rows} must be a multiple of block_m={self.block_m}")


BACKWARD_LAUNCH = BackwardLaunch()
"""The launch the backward uses (benchmarks/bench_gelu_mlp.py times others). On an H200 at 32760 x 8960 bf16
(2026-12-02): 16 x 64 on 2 warps 0.642 ms (3.66 TB/s), 16 x 128 on 4 warps 0.782 ms, 8 x 256 on 4 warps 1.364 ms;
torch.compile's pass 1.045 ms."""


@functools.cache
def _kernel():
    from .gelu_kernels import gelu_tanh_bwd_kernel

    return gelu_tanh_bwd_kernel


def _gelu_tanh_backward_impl(ga: torch.Tensor, h: torch.Tensor,
                             launch: BackwardLaunch | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not triton_runs_on(h.device):
        return gelu_tanh_backward_ref(ga, h)
    launch = launch or BACKWARD_LAUNCH
    ga, h = ga.contiguous(), h.contiguous()
    M, N = h.shape
    runs = max(1, -(-M // launch.rows))
    dh, a = layout.new_output((M, N), h, h.dtype), layout.new_output((M, N), h, h.dtype)
    parts = layout.new_output((runs, N), h, torch.float32)
    _kernel()[(-(-N // launch.block_n), runs)](ga, h, dh, a, parts, M, N, launch.rows, BLOCK_M=launch.block_m,
                                                BLOCK_N=launch.block_n, num_warps=launch.warps)
    return dh, a, parts.sum(0)


@torch.library.custom_op("sla_dist::gelu_tanh_backward", mutates_args=())
def gelu_tanh_backward_op(ga: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, a, db) of :func:`gelu_tanh_backward_ref` for ga, h [M, N]: the Triton kernel on CUDA tensors (or any
    under TRITON_INTERPRET=1), else PyTorch."""
    return _gelu_tanh_backward_impl(ga, h)


@gelu_tanh_backward_op.register_fake
def _(ga, h):
    return h.new_empty(h.shape), h.new_empty(h.shape), h.new_empty(h.shape[-1:], dtype=torch.float32)


class _GeluMLP(torch.autograd.Function):
    """y = gelu(x W1^T + b1) W2^T + b2 on token rows x [M, dim]; saves x and h (not a)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        y = F.linear(F.gelu(h, approximate="tanh"), w2, b2)
        ctx.save_for_backward(x, h, w1, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, w1, w2 = ctx.saved_tensors  # one dtype (gelu_mlp casts under autocast)
        dh, a, db1 = gelu_tanh_backward_op(dy @ w2, h)
        db1 = db1.to(h.dtype) if ctx.has_bias[0] else None
        db2 = column_sums(dy).to(h.dtype) if ctx.has_bias[1] else None
        return dh @ w1, dh.t() @ x, db1, dy.t() @ a, db2


def check_gelu_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    """ValueError naming the value the fused MLP cannot take (after autocast's casts)."""
    if x.dtype not in FUSED_MLP_DTYPES:
        raise ValueError(f"gelu_mlp: x must be float16 / bfloat16 / float32, got {x.dtype}")
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"gelu_mlp: weights ({w1.dtype}, {w2.dtype}) must have x's dtype {x.dtype} (or run under "
                         "autocast)")
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != x.shape[-1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"gelu_mlp: weights {tuple(w1.shape)} and {tuple(w2.shape)} do not chain from x's last dim "
                         f"{x.shape[-1]} (up [hidden, dim], down [out, hidden])")


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None) -> torch.Tensor:
    """gelu(x W1^T + b1, tanh) W2^T + b2 for x [..., dim], w1 [hidden, dim], w2 [out, hidden] -> [..., out], the
    GELU's backward fused (module docstring). Under autocast the products run in autocast's dtype, as F.linear's."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        b1 = b1.to(dtype) if b1 is not None else None
        b2 = b2.to(dtype) if b2 is not None else None
    check_gelu_mlp(x, w1, w2)
    with torch.autocast(x.device.type, enabled=False):
        y = _GeluMLP.apply(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)
    return y.unflatten(0, x.shape[:-1])
