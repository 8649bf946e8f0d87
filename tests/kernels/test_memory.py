"""Peak memory of the layer's backward, counted on a CPU (benchmarks/memory_account.py: every buffer allocated with
its GPU shape and dtype, kernels as no-ops): dk and dv take the per-key-block rows' place, and rows saved by the
forward (linear_sums 'save') and the projected op's branch outputs O_s and O_l are freed before the peak."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory_account  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts allocations on the CPU kernel path (interpreter mode)")


@pytest.mark.parametrize("D", [64, 128])
def test_dkdv_writes_dk_and_dv_over_the_key_block_rows(D):
    """dh_j's rows come in slabs laid out as k's gradient (summary_rows.key_rows_in_slabs), over which dK/dV stores
    dv and dk: the backward holds dq, the pre-pass' query-block rows dH_i and the slabs (two q-sizes at D 64 and 128:
    dh_j fills one at D 64, the other is dk), not dq, dk, dv and the key-block rows beside them (the summed rows
    were 1.02 q at D 64, 2.02 at D 128)."""
    L, H, block_q, block_k = 2048, 2, 128, 64
    account = memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k)
    q_bytes = H * L * D * 2
    rows = lambda blocks: H * blocks * (D * D + D) * 2  # noqa: E731  (bf16 summary rows per block)
    backward = account["peak"] - account["held"]
    # dq, the query rows and the two slabs, plus dz_j, block lists, delta and the 0/1 matrix (< q / 8).
    assert backward <= 3 * q_bytes + rows(L // block_q) + q_bytes // 8, (backward, account)
    assert backward < 3 * q_bytes + rows(L // block_k), (backward, account)


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
def test_layer_peak_is_out_dq_and_the_rows(linear_sums):
    """At the peak (the key rows' sum, then the dK/dV launch) the layer holds its output (the caller's), dq, the
    query-block rows and the slabs that become dk and dv, besides block lists, lse, delta and the map (< q / 4): the
    projected op's O_s and O_l, saved for the pre-pass and dW, are freed once those have run. Both held to the
    backward's end: 7.1 q here."""
    L, H, D, block_q, block_k = 2048, 2, 64, 128, 64
    account = memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k, linear_sums=linear_sums)
    q_bytes = H * L * D * 2
    query_block_rows = H * (L // block_q) * (D * D + D) * 2  # bf16
    assert account["peak"] <= 4 * q_bytes + query_block_rows + q_bytes // 4, (account, q_bytes)


def test_dkdv_in_head_chunks_holds_a_third_of_the_key_block_rows(monkeypatch):
    """float16 at D 128 (float32 summaries, which dK/dV cannot overwrite with float16 gradients): the key-block rows
    dh_j are 4.03 q-sizes and the query-block rows dH_i 2.02, so with SLA_DIST_DKDV_CHUNKS=auto dK/dV runs in 3
    launches of one head each here (dkdv_head_chunks), holding one head's dh_j plus dH_i (until the last chunk's rows
    are made) beside out, dq, dk and dv instead of all dh_j: 7.4 q-sizes, not 8.0 (the backward's peak: the
    forward's, with its float32 h_j rows, is higher here)."""
    L, H, D, block_q, block_k = 2048, 3, 128, 128, 64
    q_bytes = H * L * D * 2
    rows = lambda blocks: H * blocks * (D * D + D) * 4  # noqa: E731  (float32 summary rows per block)
    one_launch = 4 * q_bytes + rows(L // block_k)
    monkeypatch.delenv("SLA_DIST_DKDV_CHUNKS", raising=False)
    default = memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k, dtype=torch.float16)
    assert one_launch <= default["backward_peak"] <= one_launch + q_bytes // 4, (default, q_bytes)
    monkeypatch.setenv("SLA_DIST_DKDV_CHUNKS", "auto")
    account = memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k, dtype=torch.float16)
    chunked = 4 * q_bytes + rows(L // block_k) // 3 + rows(L // block_q)
    assert account["backward_peak"] <= chunked + q_bytes // 4, (account, q_bytes)
    assert account["backward_peak"] < one_launch, (account, q_bytes)


@pytest.mark.parametrize("linear_sums", ["save", "recompute"])
def test_compiled_layer_peak_is_the_eager_one(linear_sums):
    """torch.compile(fullgraph=True): the graph frees what the eager backward frees by hand, as the backward is three
    custom ops (compiled_backward): O_s and the saved sums after the query side (pre-pass and dQ), and the dK/dV op
    sums the pre-pass' per-query-block rows dH_i into the slabs that become dk and dv as the eager backward does, so
    its peak is the eager one. One op held all three to its end (6.65 q-sizes here, the eager 5.14)."""
    L, H, D, block_q, block_k = 2048, 2, 64, 128, 64
    eager, compiled = (memory_account.layer_account(L, H, D, block_q=block_q, block_k=block_k, linear_sums=linear_sums,
                                                    compiled=c) for c in (False, True))
    q_bytes = H * L * D * 2
    assert compiled["held"] <= eager["held"] + q_bytes // 64, (compiled, eager, q_bytes)
    assert compiled["peak"] <= eager["peak"] + q_bytes // 64, (compiled, eager, q_bytes)
