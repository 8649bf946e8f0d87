"""Triton kernels of :mod:`sla_dist.kernels.norm_rope` (its header explains the notation): imported on first launch,
so that TRITON_INTERPRET=1 set by then is honoured."""

import triton
import triton.language as tl


@triton.jit
def _pair_offsets(PAIRS: tl.constexpr):
    """A row's pair indices [PAIRS] and its channels' offsets [PAIRS, 2] (even, odd): contiguous in memory, so a row
    loads in full-width accesses and tl.split hands out the two halves of each pair."""
    pair = tl.arange(0, PAIRS)
    return pair, 2 * pair[:, None] + tl.arange(0, 2)[None, :]


@triton.jit
def norm_rope_fwd_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, L, stride_xb, stride_xl, eps,
                         DIM: tl.constexpr, HALF_D: tl.constexpr, PAIRS: tl.constexpr):
    """One token row per program: out [B, L, H, D] contiguous, rstd [B, L] float32 (saved for the backward)."""
    token = tl.program_id(0)
    b = token // L
    pos = token % L
    pair, offs = _pair_offsets(PAIRS)
    live = offs < DIM
    row = tl.load(x_ptr + b * stride_xb + pos * stride_xl + offs, mask=live, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(row * row, axis=1), axis=0) / DIM + eps)
    y = row * rstd * tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
    ye, yo = tl.split(y)
    table = pos * HALF_D + pair % HALF_D
    c = tl.load(cos_ptr + table, mask=pair < DIM // 2, other=0.0)
    s = tl.load(sin_ptr + table, mask=pair < DIM // 2, other=0.0)
    out = tl.join(ye * c - yo * s, ye * s + yo * c)
    tl.store(out_ptr + token * DIM + offs, out.to(out_ptr.dtype.element_ty), mask=live)
    tl.store(rstd_ptr + token, rstd)


@triton.jit
def norm_rope_bwd_kernel(g_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, dx_ptr, dw_ptr, N, L, tokens_per_program,
                         stride_gb, stride_gl, stride_gh, stride_xb, stride_xl,
                         DIM: tl.constexpr, HALF_D: tl.constexpr, PAIRS: tl.constexpr, ROWS: tl.constexpr):
    """A run of ``tokens_per_program`` token rows per program, ROWS rows a step: dx [B, L, dim] contiguous; this
    program's dW over its run in row program_id of dw [programs, dim] float32 (summed over programs by the caller).
    The gradient g [B, L, H, D] is read with its own head stride (unit channel stride): the attention's dq / dk come
    back heads-first, and a copy into token rows would cost a q-sized pass per layer."""
    first = tl.program_id(0) * tokens_per_program
    pair, offs = _pair_offsets(PAIRS)
    live = offs < DIM
    g_offs = (pair // HALF_D * stride_gh + 2 * (pair % HALF_D))[:, None] + tl.arange(0, 2)[None, :]
    w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)[None, :, :]
    dw = tl.zeros([PAIRS, 2], dtype=tl.float32)
    # The last program's run may pass N: the mask covers it.
    for start in range(first, first + tokens_per_program, ROWS):
        token = start + tl.arange(0, ROWS)
        valid = (token < first + tokens_per_program) & (token < N)
        b = token // L
        pos = token % L
        mask = valid[:, None, None] & live[None, :, :]
        g_rows = (b * stride_gb + pos * stride_gl)[:, None, None]
        ge, go = tl.split(tl.load(g_ptr + g_rows + g_offs[None, :, :], mask=mask, other=0.0).to(tl.float32))
        table = (pos * HALF_D)[:, None] + (pair % HALF_D)[None, :]
        table_mask = valid[:, None] & (pair < DIM // 2)[None, :]
        c = tl.load(cos_ptr + table, mask=table_mask, other=0.0)
        s = tl.load(sin_ptr + table, mask=table_mask, other=0.0)
        gy = tl.join(ge * c + go * s, go * c - ge * s)  # the rotation by -angle
        rstd = tl.load(rstd_ptr + token, mask=valid, other=0.0)[:, None, None]
        x_rows = (b * stride_xb + pos * stride_xl)[:, None, None]
        x_hat = tl.load(x_ptr + x_rows + offs[None, :, :], mask=mask, other=0.0).to(tl.float32) * rstd
        dw += tl.sum(gy * x_hat, axis=0)
        g_hat = gy * w
        mean = tl.sum(tl.sum(g_hat * x_hat, axis=2), axis=1) / DIM
        dx = rstd * (g_hat - x_hat * mean[:, None, None])
        tl.store(dx_ptr + (token * DIM)[:, None, None] + offs[None, :, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + tl.program_id(0) * DIM + offs, dw, mask=live)
