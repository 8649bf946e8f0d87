"""dK/dV over chunks of heads (SLA_DIST_DKDV_CHUNKS=auto, dkdv_head_chunks): each launch takes a range of the
B x H heads and reads the dh_j rows of those heads only, made just before it. Which launch computes a head changes
and what it computes does not: in the interpreter the gradients equal the one-launch backward's bit for bit (on a
GPU, cuBLAS may sum a chunk's 0/1 product in another order than the whole batch's, so dk and dv may differ in the
last bits there), and the float64 reference's within the harness's rule everywhere. The chunks here cross the batch
boundary and split heads unevenly; the lengths leave partial last blocks."""

import pytest
import torch

from sla_dist.kernels.configs import DKDV_CHUNKINGS, DKDV_CHUNKS_ENV, DKDV_ORDER_ENV, dkdv_chunked
from sla_dist.kernels.backward_ops import dkdv_head_chunks
from tests.utils import DEVICE

from .harness import (NAMES, KernelArgs, SLACase, assert_within_reference_error, case_block_map, compare, make_inputs,
                      run_layer)

BF16_ROW, F32_ROW = 2, 4  # bytes per summary element


def _sizes(L, D, bh, block_q=128, block_k=64, row=BF16_ROW, q_item=2, key_rows=None):
    """dkdv_head_chunks' arguments for bh heads of length L (key rows padded to 8 from 64 blocks on, as op pads)."""
    nk = -(-L // block_k)
    nk = nk + (-nk % 8 if nk >= 64 else 0) if key_rows is None else key_rows
    return bh, -(-L // block_q), nk, (D * D + D) * row, L * D * q_item


def test_chunks_only_where_they_lower_the_peak():
    # bfloat16 D 128: key rows 2.02 q, query rows 1.01 q: 3 chunks hold 1.01 + 0.67 q-sizes instead of 2.02.
    assert dkdv_head_chunks(*_sizes(32768, 128, 12)) == ((0, 4), (4, 8), (8, 12))
    # float16 inputs keep float32 summaries: key rows 4.04 q, 5 chunks (uneven, as round() splits 12 heads).
    assert dkdv_head_chunks(*_sizes(32768, 128, 12, row=F32_ROW)) == ((0, 2), (2, 5), (5, 7), (7, 10), (10, 12))
    # D 64: key rows 1.02 q, query rows 0.51 q: 2 chunks would hold as much as one launch.
    assert dkdv_head_chunks(*_sizes(32768, 64, 12)) == ((0, 12),)
    # Two heads: at most 2 chunks, which hold 1.01 + 1.01 q-sizes, no less than one launch's 2.02.
    assert dkdv_head_chunks(*_sizes(32768, 128, 2)) == ((0, 2),)
    # Scope 'all': one total row per head.
    assert dkdv_head_chunks(*_sizes(32768, 128, 12, key_rows=1)) == ((0, 12),)


@pytest.mark.parametrize("order", ["natural", "long-first", "lpt-head"])
@pytest.mark.parametrize("dtype, L, D, feature_map, linear_scope", [
    (torch.float32, 459, 32, "softmax", "marginal"),  # 8 query blocks of 64, the last of 11 rows
    (torch.float16, 333, 64, "elu", "marginal"),  # float32 summaries (scaled in the kernel)
    (torch.float32, 200, 32, "relu", "all"),  # one total row per head
])
def test_chunked_launches_give_the_one_launch_gradients(order, dtype, L, D, feature_map, linear_scope, monkeypatch,
                                                        poison_outputs):
    c = SLACase(B=2, H=2, L=L, D=D, dtype=dtype, topk=0.25, negligible=0.2, feature_map=feature_map,
                linear_scope=linear_scope, device=DEVICE)
    inputs = make_inputs(c, torch.Generator().manual_seed(5))
    block_map = case_block_map(c, inputs)
    monkeypatch.setenv(DKDV_ORDER_ENV, order)
    monkeypatch.delenv(DKDV_CHUNKS_ENV, raising=False)
    one = run_layer(c, inputs, block_map)
    monkeypatch.setenv(DKDV_CHUNKS_ENV, "auto")
    launches = KernelArgs("BH_FIRST")
    monkeypatch.setattr("sla_dist.kernels.backward_ops.get_kernel", launches)
    # Three launches over the B x H heads: 1, then 2 (across the batch boundary of B 2 x H 2), then the rest.
    monkeypatch.setattr("sla_dist.kernels.backward_ops.dkdv_head_chunks", lambda bh, *sizes: ((0, 1), (1, 3), (3, bh)))
    chunked = run_layer(c, inputs, block_map)
    assert [value for name, value in launches.seen if name == "dkdv"] == [0, 1, 3]
    last_bits = () if DEVICE.type == "cpu" else ("dk", "dv")  # see the module's docstring
    for name, x, y in zip(NAMES, one, chunked):
        assert (x is None) == (y is None), name
        assert x is None or name in last_bits or torch.equal(x, y), (name, (x.double() - y.double()).abs().max())
    assert_within_reference_error(compare(c, inputs, block_map, got=chunked))


def test_chunking_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv(DKDV_CHUNKS_ENV, raising=False)
    assert not dkdv_chunked()
    for value in DKDV_CHUNKINGS:
        monkeypatch.setenv(DKDV_CHUNKS_ENV, value)
        assert dkdv_chunked() == (value == "auto")
