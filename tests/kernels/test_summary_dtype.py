"""The linear summaries' dtype on a GPU (layout.summary_dtype), judged by the error it leaves in proj_l's weight gradient.

The interpreter runs the linear branch with float32 summaries whatever the inputs, so it cannot see what a GPU's
rounding costs. This test makes O_l in PyTorch with the rounding that the GPU's summary dtype and the kernels' rules
imply: h_j = phi(K_j)^T V_j and z_j summed in float32 and stored in the summaries' dtype; H_i and Z_i their 0/1-matrix
sums (the rows read at tf32 when they are float32 rows of half inputs, summary_rows.sum_over_scope; float32 accumulation,
stored in the summaries' dtype); the forward epilogue's product phi(Q_i) H_i on operands in the inputs' dtype, H_i
divided by a power of two >= max Z_i first; the denominator in float32 and O_l stored in float16. dW = dOut^T O_l,
which sees O_l alone (O_l's share of the output is small), must then be within the rule of the float16 reference's
error, as on the H200 (bfloat16 summaries gave 3.4-3.8x there; PERF_NOTES, "Session 2026-11-30 (tenth)").
"""

import pytest
import torch
import torch.nn.functional as F

from sla_dist.kernels import layout, summary_rows
from sla_dist.kernels.block_map import MARGINAL, predict_block_map
from sla_dist.kernels.reference import feature_map_ref, linear_branch_ref

from .harness import SLACase, make_inputs, relative_error, within_rule

CASE = SLACase(B=1, H=2, L=290, D=32, dtype=torch.float16, topk=0.3, negligible=0.1, feature_map="relu",
               linear_scope="marginal", block_q=128)  # the GPU test's case (test_fwd_loop.py)
TF32_BITS = 11  # significant bits of a float32 operand that a tf32 product keeps


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x cut to TF32_BITS significant bits (truncated: the coarser of the two roundings hardware may apply)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.trunc(mantissa * 2**TF32_BITS) / 2**TF32_BITS, exponent)


def _blocks(x: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, n, rows, D], zero rows past L (phi(0) = 0 for relu)."""
    return F.pad(x, (0, 0, 0, n * rows - x.shape[2])).unflatten(2, (n, rows))


def _kernel_linear_output(q, k, v, block_class, sums: torch.dtype) -> torch.Tensor:
    """O_l [B, H, L, D] in the inputs' dtype as the summaries, 0/1 products and forward epilogue make it on a GPU
    whose summaries are in ``sums``."""
    nq, nk = block_class.shape[-2:]
    L, D = q.shape[2:]
    fk = _blocks(feature_map_ref(k.float(), CASE.feature_map), nk, CASE.block_k)
    h = (fk.to(q.dtype).double().mT @ _blocks(v.double(), nk, CASE.block_k)).float().to(sums)  # [B, H, Nk, D, D]
    rows = torch.cat([h.flatten(-2), fk.sum(-2).to(sums)], -1)  # h_j then z_j, as _summary_rows
    if sums == torch.float32 and layout.dot_precision(q.dtype) == "tf32":
        rows = _tf32(rows)
    totals = ((block_class == MARGINAL).double() @ rows.double()).float().to(sums).float()
    hl, zl = totals[..., : D * D].unflatten(-1, (D, D)), totals[..., D * D :]
    fq = _blocks(feature_map_ref(q.float(), CASE.feature_map), nq, CASE.block_q)
    den = (fq * zl[..., None, :]).sum(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(zl.amax(-1, keepdim=True))))[..., None]  # [B, H, Nq, 1, 1]
    num = (fq.to(q.dtype).double() @ (hl / scale).to(q.dtype).double()).float()
    o_l = torch.where(den != 0, num * (scale / torch.where(den != 0, den, 1.0)), 0.0).to(q.dtype)
    return o_l.flatten(2, 3)[:, :, :L]


def _weight_gradient(dout: torch.Tensor, o_l: torch.Tensor) -> torch.Tensor:
    """dW = sum over rows of dOut^T O_l, accumulated in float64 and stored in dOut's dtype (cuBLAS: float32)."""
    return (dout.double().flatten(0, 2).mT @ o_l.double().flatten(0, 2)).to(dout.dtype)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_float16_summaries_keep_the_weight_gradient_within_the_rule(seed):
    inputs = make_inputs(CASE, torch.Generator().manual_seed(seed))
    q, k, v, dout = (inputs[n] for n in ("q", "k", "v", "grad"))
    block_map = predict_block_map(q, k, topk=CASE.topk, negligible=CASE.negligible, block_q=CASE.block_q,
                                  block_k=CASE.block_k, kernels=False)
    opts = (block_map, CASE.feature_map, CASE.linear_scope)
    exact = _weight_gradient(dout.double(), linear_branch_ref(q.double(), k.double(), v.double(), *opts))
    low = _weight_gradient(dout, linear_branch_ref(q, k, v, *opts))
    o_l = _kernel_linear_output(q, k, v, block_map.block_class, layout.summary_dtype(CASE.dtype, interpreting=False))
    kernel_err, ref_err = relative_error(_weight_gradient(dout, o_l), exact), relative_error(low, exact)
    assert within_rule("dproj_w", kernel_err, ref_err), f"dW error {kernel_err:.2e} vs reference {ref_err:.2e}"


@pytest.mark.parametrize("rows, precision, tf32", [(torch.float32, "tf32", True), (torch.float32, "ieee", False),
                                                   (torch.bfloat16, "tf32", False)])
def test_float32_rows_of_half_inputs_are_summed_at_tf32(rows, precision, tf32, monkeypatch):
    """Only float16 inputs' float32 rows (PRECISION 'tf32') take tf32 products; the process-wide flag is restored."""
    seen, matmul = [], torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b, out=None: seen.append(torch.backends.cuda.matmul.allow_tf32)
                        or matmul(a, b, out=out))
    previous, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        out = summary_rows.sum_over_scope(torch.ones(1, 3, 4, dtype=rows), torch.ones(1, 2, 3, dtype=rows), precision)
        assert seen == [tf32] and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert torch.equal(out, torch.full((1, 2, 4), 3.0, dtype=rows))
