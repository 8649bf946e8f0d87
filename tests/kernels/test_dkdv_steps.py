"""dK/dV's Q_STEPS: a query block taken in Q_STEPS loop steps (each its own pipeline stage) instead of Q_SPLIT row
slices of one step. Both walk the same row slices in the same order, so Q_STEPS = 2 gives Q_SPLIT = 2's gradients
bit for bit, and the float64 reference's within the harness's error rule; whole lists and split lists (the split
plan's parts start mid-list), with a partial last block and odd lengths. Launch settings come through
configs.fixed_settings, as time_layer.py --setting 'dkdv=8x3/Q_STEPS=2' sets them."""

import pytest
import torch

from sla_dist.kernels import configs
from sla_dist.kernels.configs import DKDV_ORDER_ENV, DKDV_SPLIT_ENV
from tests.utils import DEVICE

from .harness import NAMES, SLACase, assert_within_reference_error, case_block_map, compare, make_inputs, run_layer
from .test_dkdv_order import HOT, skewed_map

GPU = DEVICE.type == "cuda"
# On a GPU the layer's shape (BQ 128 / BK 64, D 128); in the interpreter small blocks (32-row slices of 64).
L, D, BLOCK_Q, BLOCK_K = (1001, 128, 128, 64) if GPU else (459, 32, 64, 64)
DTYPES = [torch.bfloat16, torch.float16] if GPU else [torch.float32, torch.float16]


def _run(c: SLACase, inputs, block_map, meta: dict[str, int]):
    with configs.fixed_settings({"dkdv": (*configs._KERNELS["dkdv"].fixed, meta)}):
        return run_layer(c, inputs, block_map)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("linear_scope, split", [("marginal", "off"), ("marginal", "long"), ("none", "off")])
def test_steps_give_the_slices_gradients(dtype, linear_scope, split, monkeypatch, poison_outputs):
    c = SLACase(B=1, H=2, L=L, D=D, dtype=dtype, topk=0.0, negligible=0.0, feature_map="softmax",
                linear_scope=linear_scope, block_q=BLOCK_Q, block_k=BLOCK_K, device=DEVICE)
    block_map = skewed_map(1, 2, L, BLOCK_Q, HOT, n_critical=3, seed=5, block_k=BLOCK_K)
    inputs = make_inputs(c, torch.Generator().manual_seed(23))
    monkeypatch.setenv(DKDV_SPLIT_ENV, split)
    monkeypatch.setenv(DKDV_ORDER_ENV, "natural")
    sliced = _run(c, inputs, block_map, {"Q_SPLIT": 2, "Q_STEPS": 1})
    stepped = _run(c, inputs, block_map, {"Q_SPLIT": 1, "Q_STEPS": 2})
    for name, x, y in zip(NAMES, sliced, stepped):
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), (name, (x.double() - y.double()).abs().max())
    assert_within_reference_error(compare(c, inputs, block_map, got=stepped))


@pytest.mark.skipif(not GPU, reason="the 64-row steps of a 128-row block at D 128 compile only on a GPU")
@pytest.mark.parametrize("warps, stages", [(4, 2), (8, 3), (8, 4)])
def test_stepped_launch_settings_match_the_reference(warps, stages, monkeypatch, poison_outputs):
    c = SLACase(B=1, H=3, L=4097, D=128, dtype=torch.bfloat16, topk=0.05, negligible=0.1, feature_map="softmax",
                linear_scope="marginal", block_q=128, block_k=64, device=DEVICE)
    inputs = make_inputs(c, torch.Generator().manual_seed(29))
    block_map = case_block_map(c, inputs)
    with configs.fixed_settings({"dkdv": (warps, stages, {"Q_STEPS": 2})}):
        got = run_layer(c, inputs, block_map)
    assert_within_reference_error(compare(c, inputs, block_map, got=got))
