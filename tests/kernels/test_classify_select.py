"""The layer with the block map's packed classify select (SLA_DIST_CLASSIFY=packed, block_select.py), eager and
through torch.compile: the classify launches take it, the map and so the output and gradients are the separate
selects' bit for bit, and within the harness's rule of the float64 reference. On CPU the kernels run in the
interpreter, the block map forced onto its kernels as on a GPU (the ``block_map_kernels`` fixture)."""

import pytest
import torch

from sla_dist import SparseLinearAttention
from sla_dist.kernels import configs
from sla_dist.kernels.configs import CLASSIFY_ENV
from tests.utils import DEVICE

from .harness import SLACase, assert_within_reference_error, case_block_map, compare, layer_step, make_inputs


@pytest.fixture
def packed_launches(monkeypatch):
    """The classify launches' PACKED values, in order (configs.classify_packed decides each launch)."""
    decide, seen = configs.classify_packed, []

    def recorded(nk, switches=None):
        seen.append(decide(nk, switches))
        return seen[-1]

    monkeypatch.setattr(configs, "classify_packed", recorded)
    return seen


@pytest.mark.parametrize("dtype, L, D, feature_map", [(torch.float32, 333, 32, "softmax"),
                                                      (torch.float16, 200, 64, "elu")])
def test_packed_map_gives_the_layer_within_the_rule(dtype, L, D, feature_map, monkeypatch, poison_outputs,
                                                    block_map_kernels, packed_launches):
    c = SLACase(1, 2, L, D, dtype, topk=0.3, negligible=0.2, feature_map=feature_map, linear_scope="marginal",
                device=torch.device(DEVICE))
    inputs = make_inputs(c, torch.Generator().manual_seed(L))
    maps = {}
    for select in configs.CLASSIFY_SELECTS:
        monkeypatch.setenv(CLASSIFY_ENV, select)
        maps[select] = case_block_map(c, inputs)
    assert packed_launches == [False, True]
    for name in ("block_class", "kv_num_blocks", "kv_indices"):
        assert torch.equal(getattr(maps["packed"], name), getattr(maps["separate"], name)), name
    assert_within_reference_error(compare(c, inputs, maps["packed"]))


def test_compiled_layer_takes_the_packed_select(monkeypatch, block_map_kernels, packed_launches):
    """The block map's ranking is a custom op whose body reads the switch at every call, compiled or not: the
    compiled layer under 'packed' launches the packed select and matches the eager layer under 'separate' bit for
    bit (the same map, so the same kernels on the same inputs)."""
    torch.manual_seed(0)
    layer = SparseLinearAttention(32, topk=0.5, negligible=0.25, backend="triton").to(DEVICE)
    torch.nn.init.normal_(layer.proj_l.weight, std=0.2)  # a zero proj_l would hide the linear branch
    g = torch.Generator().manual_seed(5)
    q, k, v, grad = (torch.randn(1, 2, 201, 32, generator=g).to(DEVICE) for _ in range(4))
    monkeypatch.setenv(CLASSIFY_ENV, "separate")
    want = layer_step(layer, q, k, v, grad)
    monkeypatch.setenv(CLASSIFY_ENV, "packed")
    got = layer_step(torch.compile(layer, backend="aot_eager", fullgraph=True), q, k, v, grad)
    assert packed_launches == [False, True]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dproj_w"), got, want):
        assert torch.equal(a, b), (name, (a - b).abs().max())
