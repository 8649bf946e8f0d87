"""What the kernels' launches share besides the tensors, and the memory layouts they read and write.

``Problem`` holds the launch constants of one layer shape (lengths, head dim, blocks, strides, dot precision, the
summaries' dtype), built once per layout and cached. The layout helpers decide which tensors the kernels read in
place and which they copy (``kernel_layout``, ``key_value_layout``), and allocate outputs with the strides the
kernels index them with (``output_like``, ``new_output``). No kernel launches here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..config import FEATURE_MAPS
from .block_map import num_blocks

# Tests set this to fill every kernel output with NaN before launch, so an unwritten element cannot pass.
POISON_OUTPUTS = False


@dataclass(frozen=True)
class Problem:
    """Everything a launch needs besides the tensors, unpacked once here. q-side tensors (q, o, o_l and their
    gradients) share ``q_strides``; k, dk and dv share ``k_strides``, and v, which the kernels only read, has its
    own ``v_strides`` (see :func:`key_value_layout`). Built once per layout (:func:`problem`), so the derived
    values are computed once too (cached properties). It holds no tensor and no address: a problem cached by one
    call is right for any later call with the same shapes, strides and dtype, CUDA-graph replays included."""

    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    block_q: int
    block_k: int
    q_strides: tuple[int, int, int]
    k_strides: tuple[int, int, int]
    v_strides: tuple[int, int, int]
    feature_map: int
    has_linear: bool
    precision: str
    summary_dtype: torch.dtype

    @functools.cached_property
    def nq(self) -> int:
        return num_blocks(self.Lq, self.block_q)

    @functools.cached_property
    def nk(self) -> int:
        return num_blocks(self.Lk, self.block_k)

    @functools.cached_property
    def kv_strides(self) -> tuple[int, ...]:
        """k's (b, h, l) strides then v's: the six stride arguments of every kernel that reads k and v."""
        return self.k_strides + self.v_strides

    @functools.cached_property
    def v_like_k(self) -> bool:
        """v shares k's strides (the V_LIKE_K constexpr: the loops then address both with one offset tile)."""
        return self.v_strides == self.k_strides

    @functools.cached_property
    def bh(self) -> int:
        return self.B * self.H

    @functools.cached_property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.D)

    @functools.cached_property
    def qk_scale(self) -> float:
        return self.sm_scale * math.log2(math.e)

    @functools.cached_property
    def meta(self) -> dict:
        """The constexprs every launch of this problem shares; unpacked into each launch, never changed."""
        return dict(D=self.D, BLOCK_Q=self.block_q, BLOCK_K=self.block_k, FEATURE_MAP=self.feature_map,
                    HAS_LINEAR=self.has_linear, PRECISION=self.precision)


def kernel_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors a kernel indexes with one set of strides: kept if they agree (unit last stride, positive strides).
    Else, when the first is dense (any permutation of a contiguous layout, e.g. a [B, L, H, D] tensor viewed as
    [B, H, L, D]), it is kept and only the others are copied into its layout: q in a DiT's [B, L, H, D] layout with a
    contiguous output gradient costs one copy (of the gradient), not three. Otherwise all are made contiguous."""
    first = tensors[0]
    stride = first.stride()
    positive = min(stride) > 0 or all(st > 0 or n == 1 for st, n in zip(stride, first.shape))
    # A list, not a generator under all(): one Python frame, not one per tensor (host time). Not a set: the strides
    # of a fake tensor may be symbolic, which do not hash.
    if positive and stride[-1] == 1 and [t.stride() for t in tensors].count(stride) == len(tensors):
        return tensors  # e.g. slices of one fused buffer, read in place
    if first.stride()[-1] != 1 or not _dense(first):
        return tuple(t.contiguous() for t in tensors)
    return (first,) + tuple(t if t.stride() == first.stride() else _copy_like(t, first) for t in tensors[1:])


def key_value_layout(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) as the kernels index them, each with its own strides: k by :func:`kernel_layout`, v in place whenever
    its last stride is 1. A DiT's k is its RoPE output ([B, L, H, D] viewed as [B, H, L, D]) and its v a slice of the
    fused qkv projection [B, L, 3 H D] (rows 3 H D apart): a copy of v into k's layout was an unvectorised strided
    copy in every forward and backward (~121 us each at L 32760, H 12, D 128 on an H200). The kernels only read v;
    dk and dv take k's layout, so v's strides never shape an output (dv in a gapped v's layout would be allocated
    over its whole storage span: 3x dv for the fused projection)."""
    (k,) = kernel_layout(k)
    return k, (v if v.stride(-1) == 1 else v.contiguous())


def _dense(x: torch.Tensor) -> bool:
    """x's elements fill its storage span without gaps or overlaps (some permutation of a contiguous tensor)."""
    dims = sorted((st, n) for st, n in zip(x.stride(), x.shape) if n > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _copy_like(x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """x's values in a new tensor with ``layout``'s strides (same shape)."""
    out = torch.empty_strided(layout.shape, layout.stride(), dtype=x.dtype, device=x.device)
    return out.copy_(x)


def output_like(x: torch.Tensor) -> torch.Tensor:
    """A fresh output with exactly x's strides (empty_like would densify a sliced view)."""
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def stacked_outputs_like(x: torch.Tensor, n: int) -> torch.Tensor:
    """n fresh outputs with exactly x's strides in one buffer [n, *x.shape], each starting on a 128-byte boundary
    (a custom op returns them as one tensor: its outputs may not share storage)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    step = -(-span * x.element_size() // 128) * 128 // x.element_size()
    out = torch.empty_strided((n, *x.shape), (step, *x.stride()), dtype=x.dtype, device=x.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def new_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(shape, device=like.device, dtype=dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' PRECISION for inputs of ``dtype``: float32 inputs get exact float32 products (the interpreter
    tests compare them with float64)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def summary_dtype(dtype: torch.dtype, interpreting: bool) -> torch.dtype:
    """Dtype of the linear branch's [D, D] summaries (h_j, H_i, their gradients, the 0/1 matrix that sums them),
    the largest buffers. bfloat16 inputs get bfloat16 (float32's range, rounding no coarser than the inputs'), so
    their sums run on bf16 tensor cores. float16 inputs get float32, at twice the summaries' memory: float16 would
    overflow (H_i sums phi(K)^T V over up to all keys), and bfloat16 summaries (before 2026-12-01) rounded H_i and
    phi(Q_i) to 8 bits, which made proj_l's weight gradient 3.4-3.8x the float16 reference's error on an H200
    (PERF_NOTES, "Session 2026-11-30 (tenth)"). The kernels take such a float32 summary as a float16 product operand
    divided by a power of two first (forward._scaled_linear_output, backward._dh_columns, dK/dV's dh_j), and the 0/1
    products read its float32 rows at tf32 (:func:`sum_over_scope`). The interpreter computes bfloat16 dots
    wrongly (triton-lang/triton#11584): float32 there."""
    return torch.bfloat16 if dtype == torch.bfloat16 and not interpreting else torch.float32


def problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int, feature_map: str,
             has_linear: bool, interpreting: bool) -> Problem:
    """The launch constants of q, k, v (in their kernel layouts): cached on everything they are made of, so a
    training run builds one per layer shape instead of two per step (host time)."""
    return _cached_problem(q.shape, k.shape[2], q.stride()[:3], k.stride()[:3], v.stride()[:3], q.dtype, block_q,
                           block_k, feature_map, has_linear, interpreting)


@functools.lru_cache(maxsize=256)
def _cached_problem(q_shape: torch.Size, Lk: int, q_strides: tuple[int, ...], k_strides: tuple[int, ...],
                    v_strides: tuple[int, ...], dtype: torch.dtype, block_q: int, block_k: int, feature_map: str,
                    has_linear: bool, interpreting: bool) -> Problem:
    B, H, Lq, D = q_shape
    return Problem(B, H, Lq, Lk, D, block_q, block_k, q_strides, k_strides, v_strides,
                    FEATURE_MAPS.index(feature_map), has_linear, precision=dot_precision(dtype),
                    summary_dtype=summary_dtype(dtype, interpreting))


def block_strides(x: torch.Tensor) -> tuple[int, int]:
    """(stride over bh, stride over blocks) of a per-block buffer; 0 over blocks when one total is broadcast."""
    return x.stride(0), (0 if x.shape[1] == 1 else x.stride(1))


def memory_order(x: torch.Tensor) -> tuple[int, ...]:
    """x's dimensions, outermost in memory first and the last one kept last: x.permute(order) is row-major when x
    is any permutation of a dense layout (e.g. a [B, L, H, D] tensor viewed as [B, H, L, D])."""
    return (*sorted(range(x.dim() - 1), key=lambda d: -x.stride(d)), x.dim() - 1)


def permute(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """x.permute(order); x itself, without a call into the dispatcher, for the identity (host time)."""
    return x if order == tuple(range(len(order))) else x.permute(order)


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``; x itself, without a call into the dispatcher, when it already is (host time)."""
    return x if x.dtype == dtype else x.to(dtype)
