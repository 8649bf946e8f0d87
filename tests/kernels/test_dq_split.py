"""dQ with each query block taken by two programs over its row halves (SLA_DIST_DQ_SPLIT=halves, the dq_split launch
entry): every row's dQ comes from the same operations as in the whole-block launch, so the layer's gradients stay
within the float64 reference's error rule and dK, dV and the output do not change at all (dQ is the only kernel that
differs); blocks too small to split (64 rows: fewer than two warp groups' 64-row tiles) take the whole-block launch,
bit for bit. Odd lengths with a partial last block, poisoned outputs."""

import pytest
import torch

from sla_dist.kernels import backward_ops, configs
from sla_dist.kernels.configs import DQ_SPLIT_ENV
from tests.utils import DEVICE

from .harness import NAMES, SLACase, assert_within_reference_error, case_block_map, compare, make_inputs, run_layer

GPU = DEVICE.type == "cuda"
CASES = ([(torch.bfloat16, 4097, 128), (torch.float16, 1001, 64)] if GPU
         else [(torch.float32, 459, 32), (torch.float16, 333, 32)])


def _entries(monkeypatch) -> list[str]:
    """Record the dQ launch entries the backward asks for."""
    entries = []
    get_kernel = backward_ops.get_kernel

    def recording(name):
        if name.startswith("dq"):
            entries.append(name)
        return get_kernel(name)

    monkeypatch.setattr(backward_ops, "get_kernel", recording)
    return entries


@pytest.mark.parametrize("dtype, L, D", CASES)
@pytest.mark.parametrize("linear_scope", ["marginal", "none"])
def test_halves_keep_the_layer_within_the_rule(dtype, L, D, linear_scope, monkeypatch, poison_outputs):
    c = SLACase(B=1, H=2, L=L, D=D, dtype=dtype, topk=0.1, negligible=0.1, feature_map="softmax",
                linear_scope=linear_scope, block_q=128, block_k=64, device=DEVICE)
    inputs = make_inputs(c, torch.Generator().manual_seed(31))
    block_map = case_block_map(c, inputs)
    entries = _entries(monkeypatch)
    monkeypatch.setenv(DQ_SPLIT_ENV, "off")
    whole = run_layer(c, inputs, block_map)
    monkeypatch.setenv(DQ_SPLIT_ENV, "halves")
    halves = run_layer(c, inputs, block_map)
    assert entries == ["dq", "dq_split"]
    for name, x, y in zip(NAMES, whole, halves):
        if name != "dq" and x is not None:
            assert torch.equal(x, y), (name, (x.double() - y.double()).abs().max())
    assert_within_reference_error(compare(c, inputs, block_map, got=halves))


def test_small_blocks_take_the_whole_block_launch(monkeypatch, poison_outputs):
    c = SLACase(B=1, H=2, L=200, D=32, dtype=torch.float32, topk=0.25, negligible=0.1, feature_map="relu",
                linear_scope="marginal", block_q=64, block_k=64, device=DEVICE)
    inputs = make_inputs(c, torch.Generator().manual_seed(37))
    block_map = case_block_map(c, inputs)
    entries = _entries(monkeypatch)
    monkeypatch.setenv(DQ_SPLIT_ENV, "halves")
    halves = run_layer(c, inputs, block_map)
    monkeypatch.delenv(DQ_SPLIT_ENV)
    whole = run_layer(c, inputs, block_map)
    assert entries == ["dq", "dq"]
    for name, x, y in zip(NAMES, whole, halves):
        assert x is None or torch.equal(x, y), name


def test_launch_entry_per_switch():
    switches = configs.read_switches()._replace(dq_split="halves")
    assert configs.dq_launch(128, switches) == ("dq_split", configs.DQ_SPLIT_Q)
    assert configs.dq_launch(64, switches) == ("dq", 1)
    assert configs.dq_launch(128, switches._replace(dq_split="off")) == ("dq", 1)
