"""Triton kernel of :mod:`sla_dist.kernels.gelu_mlp` (its header explains the notation): imported on first launch, so
that TRITON_INTERPRET=1 set by then is honoured."""

import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
CUBIC = tl.constexpr(0.044715)
TWO_LOG2E = tl.constexpr(2.8853900817779268)  # 2 / ln 2: exp(-2u) = 2^(-2u / ln 2)


@triton.jit
def gelu_tanh_bwd_kernel(ga_ptr, h_ptr, dh_ptr, a_ptr, part_ptr, M, N, rows_per_program,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (column tile, row run): ``rows_per_program`` rows of BLOCK_N columns, BLOCK_M rows a step. Stores dh
    and a over the run and the run's float32 column sums of dh in part[row run, columns]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    first = tl.program_id(1).to(tl.int64) * rows_per_program
    column_sums = tl.zeros([BLOCK_N], dtype=tl.float32)
    for step in range(0, rows_per_program, BLOCK_M):
        rows = first + step + tl.arange(0, BLOCK_M)
        ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        ga = tl.load(ga_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h2 = h * h
        # With s = sigmoid(2u), u = sqrt(2 / pi) (h + 0.044715 h^3): 1 + tanh(u) = 2 s and 1 - tanh(u)^2 = 4 s (1 - s),
        # so a = h s and gelu'(h) = s + 2 h s (1 - s) du/dh. No 1 + t or 1 - t^2 is formed, so nothing cancels near
        # u = 0 (1 - 2 / (e^(2u) + 1) lost ~2 ulps of float32 there), and the clamped exponent keeps e finite:
        # s and 1 - s = e s stay exact to rounding at both ends.
        e = tl.exp2(tl.minimum(tl.maximum(-TWO_LOG2E * SQRT_2_OVER_PI * (h + CUBIC * h2 * h), -126.0), 126.0))
        s = 1.0 / (1.0 + e)
        dh = ga * (s + 2.0 * h * s * (e * s) * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * h2))
        tl.store(a_ptr + offs, (h * s).to(a_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=ok)
        column_sums += tl.sum(dh, axis=0)  # rows past M load ga = 0: they add nothing
    tl.store(part_ptr + tl.program_id(1) * N + cols, column_sums, mask=col_ok)
