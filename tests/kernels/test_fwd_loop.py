"""The forward kernel's loop variants (configs.FwdLoop: unmasked even keys, scale in the exponent, split query
blocks) against the float64 reference, on scores built to exercise the online softmax: rows whose max grows along
the key list at every step (the max must move and the sums be rescaled), rows whose max never grows after the first
block, rows that grow slowly, partial last query and key blocks, and key lengths that are and are not a multiple of
the key block. And the rule that picks a variant per head dim and branch."""

import math
import re

import pytest
import torch

from sla_dist.kernels import configs
from sla_dist.kernels.block_map import CRITICAL, MARGINAL, build_block_map
from sla_dist.kernels.configs import FWD_LOOP_ENV, FwdLoop, fwd_loop
from sla_dist.kernels.op import sla_branches, sparse_linear_attention
from sla_dist.kernels.reference import sla_branches_ref, sla_reference
from tests.utils import DEVICE, HAS_CUDA

from .harness import (SLACase, assert_within_reference_error, case_block_map, compare, make_inputs, relative_error,
                      run_layer)

LOOPS = ["baseline", "even", "fma", "split", "split+even+fma"]
D, BLOCK_Q, BLOCK_K = 32, 128, 64  # query blocks of 128 rows: the split takes them in 64-row halves
SCORE_UNIT = math.log2(math.e) / math.sqrt(D)  # base-2 score of q k^T = 1
LQ = 300  # 2 whole query blocks and 44 rows


def _growing_scores(Lk: int, dtype: torch.dtype):
    """q, k, v and a map where every query block lists all key blocks but one (marginal, for the linear branch) in
    ascending order. Key block j carries j * 20 / SCORE_UNIT / 4 along e_0, so a query row 4 e_0 (+ noise) scores ~20
    more (base 2) per listed block, up to ~60: fast growth, the max must move every step (and a max kept in the
    wrong units, as with the scale left for the exponent, underflows 2^(s - m)). By 64-row group: fast growth; -4 e_0,
    whose max is in the first block and never grows; 0.7 e_0, ~3.5 per block (+ noise); never grows; fast growth
    (the partial last query block). So query block 0 mixes rows that move with rows that never do (one tile, or two
    split programs)."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 1, LQ, D, generator=g, dtype=torch.float64) * 0.3
    k = torch.randn(1, 1, Lk, D, generator=g, dtype=torch.float64) * 0.3
    v = torch.randn(1, 1, Lk, D, generator=g, dtype=torch.float64)
    k[0, 0, :, 0] += torch.arange(Lk, dtype=torch.float64).div(BLOCK_K).floor() * (20 / SCORE_UNIT / 4)
    q[0, 0, :, 0] += torch.tensor([4.0, -4.0, 0.7, -4.0, 4.0], dtype=torch.float64)[torch.arange(LQ) // 64]
    nq, nk = -(-LQ // BLOCK_Q), -(-Lk // BLOCK_K)
    block_class = torch.full((1, 1, nq, nk), CRITICAL, dtype=torch.int8)
    block_class[0, 0, torch.arange(nq), torch.arange(nq) % nk] = MARGINAL
    block_map = build_block_map(block_class.to(DEVICE), LQ, Lk, BLOCK_Q, BLOCK_K)
    return [t.to(DEVICE, dtype) for t in (q, k, v)], block_map


def _outputs(branches, layer, q, k, v, block_map) -> list[torch.Tensor]:
    """(O_s, O_l, lse) of ``branches`` and the projected output of ``layer`` (the kernels or the references)."""
    w = torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64).div(D**0.5)
    b = torch.linspace(-0.1, 0.1, D, dtype=torch.float64)
    with torch.no_grad():
        return list(branches(q, k, v, block_map)) + [layer(q, k, v, block_map, w.to(q), b.to(q))]


def _errors(q, k, v, block_map) -> list[float]:
    """Relative errors against float64 of the kernels' outputs."""
    exact = _outputs(sla_branches_ref, sla_reference, *(t.double() for t in (q, k, v)), block_map)
    got = _outputs(sla_branches, sparse_linear_attention, q, k, v, block_map)
    return [relative_error(x, ref) for x, ref in zip(got, exact)]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("Lk", [205, 256], ids=["partial-key-block", "even-keys"])
def test_loop_variants_match_float64(loop, Lk, monkeypatch, poison_outputs):
    monkeypatch.setenv(FWD_LOOP_ENV, loop)
    (q, k, v), block_map = _growing_scores(Lk, torch.float32)
    errors = _errors(q, k, v, block_map)
    assert max(errors) < 1e-5, (loop, errors)


def test_default_is_the_measured_fastest(monkeypatch):
    monkeypatch.delenv(FWD_LOOP_ENV, raising=False)
    split = FwdLoop(even=True, fma=True, split=True)
    assert fwd_loop(128, True, 128) == split and fwd_loop(64, False, 128) == split
    assert fwd_loop(128, False, 128) == fwd_loop(64, True, 128) == FwdLoop(fma=True)
    # query blocks too small to split, and head dims never measured: the scale in the exponent alone
    assert fwd_loop(128, True, 64) == fwd_loop(32, True, 128) == fwd_loop(256, False, 128) == FwdLoop(fma=True)
    assert split.launch(128) == ("fwd_split", configs.FWD_SPLIT_Q)


def test_environment_overrides_the_rule(monkeypatch):
    monkeypatch.setenv(FWD_LOOP_ENV, "baseline")
    assert fwd_loop(128, True, 128) == FwdLoop() and fwd_loop(128, True, 128).launch(128) == ("fwd", 1)
    assert not any(FwdLoop().constexprs(even_keys=True).values())
    monkeypatch.setenv(FWD_LOOP_ENV, "split+fma")
    loop = fwd_loop(32, False, 64)
    assert loop.launch(128) == ("fwd_split", configs.FWD_SPLIT_Q) and loop.launch(64) == ("fwd", 1)
    assert loop.constexprs(even_keys=True) == dict(EVEN_K=False, SCALE_IN_EXP=True)
    even = FwdLoop.parse("even")
    assert even.constexprs(even_keys=True)["EVEN_K"] and not even.constexprs(even_keys=False)["EVEN_K"]


@pytest.mark.parametrize("value", ["fast", "fma+fma", "", "baseline+fma", "Split", "lazy"])
def test_bad_loop_names_the_value(value, monkeypatch):
    monkeypatch.setenv(FWD_LOOP_ENV, value)
    with pytest.raises(ValueError, match=re.escape(f"{FWD_LOOP_ENV}={value!r}")):
        fwd_loop(128, True, 128)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the defect was a GPU's rounding (the interpreter's summaries were always "
                    "float32); tests/kernels/test_summary_dtype.py emulates it on the CPU")
def test_split_forward_linear_output_sums_into_the_projection_gradient(monkeypatch, poison_outputs):
    """The gradient of proj_l's weight, dW = dOut^T O_l, sees O_l alone (its share of the output is small): it was
    3.4-3.8x the float16 reference's error on an H200 (triton 3.6) while the linear summaries of float16 inputs were
    bfloat16, which rounded phi(Q_i) and H_i to 8 bits in the forward's epilogue (PERF_NOTES, "Session 2026-11-30
    (tenth)"); float32 summaries, taken by the products as float16 operands, fix it."""
    monkeypatch.setenv(FWD_LOOP_ENV, "split+fma")
    c = SLACase(B=1, H=2, L=290, D=32, dtype=torch.float16, topk=0.3, negligible=0.1, feature_map="relu",
                linear_scope="marginal", block_q=128, device=DEVICE)
    inputs = make_inputs(c, torch.Generator().manual_seed(2))
    block_map = case_block_map(c, inputs)
    assert_within_reference_error(compare(c, inputs, block_map, got=run_layer(c, inputs, block_map)))
