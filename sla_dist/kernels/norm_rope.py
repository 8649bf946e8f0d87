"""Fused RMS norm + 3D RoPE for a DiT's queries and keys: one read and one write of q (or k) per pass.

A Wan-style self-attention normalises q and k over all heads (RMS norm across ``dim = H * D``, with a learned
weight), then rotates interleaved channel pairs of each head by per-token tables. Left to PyTorch (even compiled),
the pair: norm, then rotation, costs ~0.4 ms forward and ~0.6 ms backward per layer for q and k at 32K tokens,
dim 1536 on an H200 (2026-12-01 DiT step profile), about four times the bytes they must move. Here each token row
is one program: load the row as (even, odd) channel pairs, reduce its sum of squares in float32, scale, weight,
rotate, store once in ``[B, L, H, D]`` (contiguous: the attention kernels read it in place). The backward recomputes
the normalised row from x and the saved 1 / rms, undoes the rotation (rotation by -angle) and applies the RMS norm's
gradient; dW is reduced over each program's run of tokens in registers, then over programs in one small sum.

Notation: x [B, L, dim] (any strides with unit last stride, e.g. a slice of a fused qkv projection), w [dim],
cos / sin [L, D / 2] float32 per-token tables (``sla_dist.models.rope``), r = 1 / sqrt(mean(x^2) + eps) per token.
y = x * r * w; out[2i] = y[2i] cos - y[2i+1] sin, out[2i+1] = y[2i] sin + y[2i+1] cos (i within a head).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.rope import apply_rope
from . import configs, layout
from .revision import REVISION

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  eps: float) -> torch.Tensor:
    """The PyTorch reference (the model's unfused path): RMS norm over the last dim, then RoPE per head.
    x [B, L, dim] -> [B, L, heads, dim / heads] in x's dtype."""
    normed = F.rms_norm(x, (x.shape[-1],), weight, eps)
    return apply_rope(normed.unflatten(-1, (heads, -1)), cos, sin)


@functools.cache
def _kernels():
    """(forward, backward) Triton kernels; their module is imported on first use, so that TRITON_INTERPRET=1 set by
    then is honoured."""
    from . import norm_rope_kernels

    return norm_rope_kernels.norm_rope_fwd_kernel, norm_rope_kernels.norm_rope_bwd_kernel


def _shape(x: torch.Tensor, heads: int) -> tuple[int, int, int, int]:
    """(B, L, dim, D) of x [B, L, dim] split into ``heads`` heads of D channels."""
    B, L, dim = x.shape
    return B, L, dim, dim // heads


def launch_constants(dim: int, heads: int) -> dict:
    """The kernels' compile-time sizes for rows of ``dim`` channels in ``heads`` heads: a row's channels, a head's
    pairs, the row's pairs rounded up to a power of two (a tile's length; the masked tail is never loaded or
    stored)."""
    return dict(DIM=dim, HALF_D=dim // heads // 2, PAIRS=1 << max(dim // 2 - 1, 0).bit_length())


def _norm_rope_impl(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                    eps: float, revision: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(out, rstd); ``revision`` is not read (revision.py: the compiled graph's key)."""
    B, L, dim, D = _shape(x, heads)
    out = layout.new_output((B, L, heads, D), x, x.dtype)
    rstd = layout.new_output((B, L), x, torch.float32)
    forward, _ = _kernels()
    forward[(B * L,)](x, weight, cos, sin, out, rstd, L, x.stride(0), x.stride(1), eps, **launch_constants(dim, heads),
                      num_warps=4)
    return out, rstd


@dataclass(frozen=True)
class BackwardLaunch:
    """How the backward splits its tokens: ``rows`` token rows per step of a program's loop, ``programs_per_sm``
    programs per multiprocessor (each sums its run's dW in registers; more programs, more partial rows to add),
    ``warps`` per program."""

    rows: int = 1
    programs_per_sm: int = 32
    warps: int = 4


BACKWARD_LAUNCH = BackwardLaunch()
"""The launch the backward uses (benchmarks/bench_norm_rope.py --backward-launch times others)."""


def _norm_rope_backward_impl(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, rstd: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, dim, D = _shape(x, heads)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()  # the kernel reads a head's channels as one run (any token and head strides)
    n = B * L
    launch = BACKWARD_LAUNCH
    programs = min(n, launch.programs_per_sm * configs.multiprocessors(x.device, configs.interpreting()))
    per_program = -(-n // programs)
    programs = -(-n // per_program)
    dx = layout.new_output((B, L, dim), x, x.dtype)
    dw_parts = layout.new_output((programs, dim), x, torch.float32)
    _, backward = _kernels()
    backward[(programs,)](grad, x, weight, cos, sin, rstd, dx, dw_parts, n, L, per_program, *grad.stride()[:3],
                          x.stride(0), x.stride(1), **launch_constants(dim, heads), ROWS=launch.rows,
                          num_warps=launch.warps)
    return dx, dw_parts.sum(0).to(weight.dtype)


norm_rope_op = torch.library.custom_op("sla_dist::norm_rope", mutates_args=())(_norm_rope_impl)
norm_rope_backward_op = torch.library.custom_op("sla_dist::norm_rope_backward",
                                                mutates_args=())(_norm_rope_backward_impl)


@norm_rope_op.register_fake
def _(x, weight, cos, sin, heads, eps, revision=""):
    B, L, dim, D = _shape(x, heads)
    return x.new_empty((B, L, heads, D)), x.new_empty((B, L), dtype=torch.float32)


@norm_rope_backward_op.register_fake
def _(grad, x, weight, cos, sin, rstd, heads):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, cos, sin, heads, *_ = inputs  # then eps, revision
    ctx.save_for_backward(x, weight, cos, sin, output[1])
    ctx.heads, ctx.inputs = heads, len(inputs)


def _backward(ctx, grad_out, _grad_rstd):
    x, weight, cos, sin, rstd = ctx.saved_tensors
    dx, dw = norm_rope_backward_op(grad_out, x, weight, cos, sin, rstd, ctx.heads)
    return dx, dw, *(None,) * (ctx.inputs - 2)


torch.library.register_autograd("sla_dist::norm_rope", _backward, setup_context=_setup_context)


def check_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    """ValueError naming the value the fused kernel cannot take."""
    if x.dim() != 3:
        raise ValueError(f"norm_rope: x must be [B, L, dim], got shape {tuple(x.shape)}")
    B, L, dim = x.shape
    if heads < 1 or dim % heads or (dim // heads) % 2:
        raise ValueError(f"norm_rope: dim {dim} must split into {heads} heads of an even head dim")
    if x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"norm_rope: x must be float16 / bfloat16 / float32 with unit last stride, got {x.dtype}, "
                         f"strides {x.stride()}")
    if weight.shape != (dim,):
        raise ValueError(f"norm_rope: weight shape {tuple(weight.shape)} is not ({dim},)")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (L, dim // heads // 2):
            raise ValueError(f"norm_rope: {name} must be [{L}, {dim // heads // 2}] (tokens, head dim / 2), got "
                             f"{tuple(table.shape)}")


def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
              *, fused: bool | None = None) -> torch.Tensor:
    """RMS norm of ``x`` [B, L, dim] over dim with ``weight`` [dim], then RoPE of each of ``heads`` heads by the
    tables ``cos``, ``sin`` [L, D / 2] (D = dim / heads) -> [B, L, heads, D] in x's dtype.

    ``fused``: the Triton kernels (default on CUDA tensors; any device under TRITON_INTERPRET=1 when True) or the
    PyTorch reference (:func:`norm_rope_ref`, default elsewhere). The kernels compute in float32 and round once."""
    if fused is None:
        fused = x.is_cuda and x.dtype in _DTYPES
    if not fused:
        return norm_rope_ref(x, weight, cos, sin, heads, eps)
    check_norm_rope(x, weight, cos, sin, heads)
    if not x.is_cuda and not configs.interpreting():
        raise ValueError("norm_rope: the fused kernels take CUDA tensors (or any device under TRITON_INTERPRET=1), "
                         f"got x on {x.device}; pass fused=False for the PyTorch reference")
    # The kernels index the tables as contiguous float32 rows (a sequence-parallel rank's may be a strided view).
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return norm_rope_op(x, weight, cos, sin, heads, float(eps), REVISION)[0]
