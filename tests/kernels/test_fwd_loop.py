"""The forward kernel's loop variants (SLA_DIST_FWD_LOOP: lazy rescale, unmasked even keys, scale in the exponent,
split query blocks) against the float64 reference, on scores built to exercise each: rows whose max grows along the
key list by more than the lazy threshold (the max must move and the sums be rescaled), rows whose max never grows
after the first block (the rescale is skipped), rows that grow by less than the threshold for a few steps (skipped
with p > 1) and then by more, partial last query and key blocks, and key lengths that are and are not a multiple of
the key block."""

import math
import re

import pytest
import torch

from sla_dist.kernels import configs
from sla_dist.kernels.block_map import CRITICAL, MARGINAL, build_block_map
from sla_dist.kernels.configs import FWD_LOOP_ENV, FwdLoop, fwd_loop
from sla_dist.kernels.op import sla_branches, sparse_linear_attention
from sla_dist.kernels.reference import sla_branches_ref, sla_reference
from tests.utils import DEVICE

from .harness import OUTPUT_FACTOR, relative_error

LOOPS = ["baseline", "lazy", "even", "fma", "split", "lazy+even+fma+split"]
D, BLOCK_Q, BLOCK_K = 32, 128, 64  # query blocks of 128 rows: the split takes them in 64-row halves
SCORE_UNIT = math.log2(math.e) / math.sqrt(D)  # base-2 score of q k^T = 1
LQ = 300  # 2 whole query blocks and 44 rows


def _growing_scores(Lk: int, dtype: torch.dtype):
    """q, k, v and a map where every query block lists all key blocks but one (marginal, for the linear branch) in
    ascending order. Key block j carries j * 20 / SCORE_UNIT / 4 along e_0, so a query row 4 e_0 (+ noise) scores ~20
    more (base 2) per listed block, up to ~60: fast growth, the lazy max must move every step (and a max kept in the
    wrong units underflows 2^(s - m)). By 64-row group: fast growth; -4 e_0, whose max is in the first block and never
    grows; 0.7 e_0, ~3.5 per block (+ noise), under the lazy threshold of 8 for one step (skipped with p up to
    ~2^6.5), then over; never grows; fast growth (the partial last query block). So query block 0 mixes rows that
    move with rows that never do (one tile, or two split programs that decide apart)."""
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


def _errors(q, k, v, block_map) -> tuple[list[float], list[float]]:
    """Relative errors against float64 of the kernels' outputs and of the reference's in the inputs' dtype."""
    exact = _outputs(sla_branches_ref, sla_reference, *(t.double() for t in (q, k, v)), block_map)
    got = _outputs(sla_branches, sparse_linear_attention, q, k, v, block_map)
    low = _outputs(sla_branches_ref, sla_reference, q, k, v, block_map)
    return ([relative_error(x, ref) for x, ref in zip(got, exact)],
            [relative_error(x, ref) for x, ref in zip(low, exact)])


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("Lk", [205, 256], ids=["partial-key-block", "even-keys"])
def test_loop_variants_match_float64(loop, Lk, monkeypatch, poison_outputs):
    monkeypatch.setenv(FWD_LOOP_ENV, loop)
    (q, k, v), block_map = _growing_scores(Lk, torch.float32)
    errors, _ = _errors(q, k, v, block_map)
    assert max(errors) < 1e-5, (loop, errors)


@pytest.mark.parametrize("loop", ["baseline", "lazy", "lazy+even+fma+split"])
def test_lazy_rescale_keeps_half_precision_p_finite(loop, monkeypatch, poison_outputs):
    """float16 inputs: the fast rows' scores grow by ~40 (base 2) along the list, so a max that stopped moving would
    overflow the float16 P operand (> 2^16). Errors within the harness' factor of the float16 reference's."""
    monkeypatch.setenv(FWD_LOOP_ENV, loop)
    (q, k, v), block_map = _growing_scores(256, torch.float16)
    errors, low = _errors(q, k, v, block_map)
    assert all(e <= OUTPUT_FACTOR * r for e, r in zip(errors, low)), (loop, errors, low)


def test_default_is_todays_loop(monkeypatch):
    monkeypatch.delenv(FWD_LOOP_ENV, raising=False)
    assert fwd_loop() == FwdLoop() and fwd_loop().launch(128) == ("fwd", 1)
    assert not any(FwdLoop().constexprs(even_keys=True).values())


def test_options_combine_and_even_needs_whole_key_blocks(monkeypatch):
    monkeypatch.setenv(FWD_LOOP_ENV, "split+fma")
    loop = fwd_loop()
    assert loop.launch(128) == ("fwd_split", configs.FWD_SPLIT_Q) and loop.launch(64) == ("fwd", 1)
    assert loop.constexprs(even_keys=True) == dict(LAZY_RESCALE=False, EVEN_K=False, SCALE_IN_EXP=True)
    even = FwdLoop.parse("even")
    assert even.constexprs(even_keys=True)["EVEN_K"] and not even.constexprs(even_keys=False)["EVEN_K"]


@pytest.mark.parametrize("value", ["fast", "lazy+lazy", "", "baseline+lazy", "Lazy"])
def test_bad_loop_names_the_value(value, monkeypatch):
    monkeypatch.setenv(FWD_LOOP_ENV, value)
    with pytest.raises(ValueError, match=re.escape(f"{FWD_LOOP_ENV}={value!r}")):
        fwd_loop()
