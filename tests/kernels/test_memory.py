"""Peak memory of the layer's backward, counted on a CPU (benchmarks/memory_account.py: every buffer allocated with
its GPU shape and dtype, kernels as no-ops): the per-block summary rows are never all held beside dq, dk and dv,
and rows saved by the forward (linear_sums 'save') and the projected op's branch outputs O_s and O_l are freed
before that peak."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory_account  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts allocations on the CPU kernel path (interpreter mode)")


def test_backward_peak_holds_the_key_block_rows_but_not_the_query_block_rows():
    L, H, D, block_q, block_k = 2048, 2, 64, 128, 64
    account = memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k)
    q_bytes = H * L * D * 2
    rows = lambda blocks: H * blocks * (D * D + D) * 2  # noqa: E731  (bf16 summary rows per block)
    backward = account["peak"] - account["held"]
    # dq, dk, dv and dh_j (the dK/dV kernel's inputs), plus block lists, delta and the 0/1 matrix (< q / 8);
    # H_i and dH_i (two [BH, Nq, D D + D] buffers) are freed before dh_j and dk / dv are made.
    assert backward <= 3 * q_bytes + rows(L // block_k) + q_bytes // 8, (backward, account)
    assert backward < 3 * q_bytes + rows(L // block_k) + 2 * rows(L // block_q)


def test_saved_linear_sums_are_held_between_passes_but_not_at_the_backward_peak():
    """linear_sums 'save' holds the rows of H_i, Z_i ([BH, Nq, D D + D]) from the forward to the backward, and the
    eager backward frees them after its pre-pass, so the peak over both passes is the recomputing one's (held to
    the backward's end, they would add one such buffer to the dK / dV phase, the peak)."""
    L, H, D, block_q, block_k = 2048, 2, 64, 128, 64
    save, recompute = (memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k, linear_sums=s)
                       for s in ("save", "recompute"))
    rows = H * (L // block_q) * (D * D + D) * 2  # bf16
    slack = 1024  # a first call's small allocations (a few hundred bytes)
    assert abs(save["held"] - recompute["held"] - rows) <= slack, (save, recompute, rows)
    assert save["peak"] <= recompute["peak"] + slack, (save, recompute, rows)


@pytest.mark.parametrize("linear_sums", ["save", "recompute"])
def test_layer_peak_is_out_dq_dk_dv_and_the_key_block_rows(linear_sums):
    """At the peak (the dK/dV launch) the layer holds its output (the caller's), dq, dk, dv and the per-key-block
    rows dh_j, besides block lists, lse, delta and the map (< q / 4): the projected op's O_s and O_l, saved for
    the pre-pass and dW, are freed once those have run. Both held to the backward's end: 7.1 q here."""
    L, H, D, block_q, block_k = 2048, 2, 64, 128, 64
    account = memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k, linear_sums=linear_sums)
    q_bytes = H * L * D * 2
    key_block_rows = H * (L // block_k) * (D * D + D) * 2  # bf16
    assert account["peak"] <= 4 * q_bytes + key_block_rows + q_bytes // 4, (account, q_bytes)


def test_dkdv_in_head_chunks_holds_a_third_of_the_key_block_rows(monkeypatch):
    """bfloat16 at D 128: the key-block rows dh_j are 2.02 q-sizes and the query-block rows dH_i 1.01, so with
    SLA_DIST_DKDV_CHUNKS=auto dK/dV runs in 3 launches of one head each here (dkdv_head_chunks), holding one head's dh_j plus dH_i (until the last
    chunk's rows are made) beside out, dq, dk and dv instead of all dh_j: 5.7 q-sizes, not 6.0 (dense cuDNN's
    backward holds about 6: it accumulates dq in float32)."""
    L, H, D, block_q, block_k = 2048, 3, 128, 128, 64
    q_bytes = H * L * D * 2
    rows = lambda blocks: H * blocks * (D * D + D) * 2  # noqa: E731  (bf16 summary rows per block)
    one_launch = 4 * q_bytes + rows(L // block_k)
    monkeypatch.delenv("SLA_DIST_DKDV_CHUNKS", raising=False)
    default = memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k)
    assert one_launch <= default["peak"] <= one_launch + q_bytes // 4, (default, q_bytes)
    monkeypatch.setenv("SLA_DIST_DKDV_CHUNKS", "auto")
    account = memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k)
    chunked = 4 * q_bytes + rows(L // block_k) // 3 + rows(L // block_q)
    assert account["peak"] <= chunked + q_bytes // 4, (account, q_bytes)
    assert account["peak"] < one_launch, (account, q_bytes)


@pytest.mark.parametrize("linear_sums", ["save", "recompute"])
def test_compiled_layer_peak_is_the_eager_one(linear_sums):
    """torch.compile(fullgraph=True): the graph frees what the eager backward frees by hand, as the backward is three
    custom ops (compiled_backward): O_s and the saved sums after the query side (pre-pass and dQ), the pre-pass'
    per-query-block rows dH_i after the per-key-block rows dh_j are summed from them, so the dK/dV op's peak is the
    eager one. One op held all three to its end (6.65 q-sizes here, the eager 5.14)."""
    L, H, D, block_q, block_k = 2048, 2, 64, 128, 64
    eager, compiled = (memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k, linear_sums=linear_sums,
                                                    compiled=c) for c in (False, True))
    q_bytes = H * L * D * 2
    assert compiled["held"] <= eager["held"] + q_bytes // 64, (compiled, eager, q_bytes)
    assert compiled["peak"] <= eager["peak"] + q_bytes // 64, (compiled, eager, q_bytes)
