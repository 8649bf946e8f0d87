"""Host work per call of the layer, counted on a CPU (benchmarks/host_overhead.py --noop-kernels: every Triton
launch a no-op, every buffer allocated as on an H200, the H200's descriptor decisions). Up to ~16K tokens an eager
layer on an H200 is bound by this host work (issue #11: ~15 µs per Triton launch, ~7 µs per aten op on its host),
so a change that adds an op, a launch or Python to every call must raise these budgets knowingly, with a reason in
benchmarks/PERF_NOTES.md ("host time counted on the CPU").

The counts do not depend on the shape (one small shape keeps the CPU's real aten work short) nor, for the package's
own Python calls, on the torch version; the aten ops called from Python could move by one or two with a torch
release that reimplements a composite op, which would be a reason to re-count, not to loosen the budget."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import host_overhead  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts the kernel path's host work on the CPU (interpreter mode)")

# (aten ops called from Python, Triton launches, calls of sla_dist's Python functions) per call at B 1, H 2, L 256,
# D 64, BQ 128, counted on branch wip-host (torch 2.13, CPU). main before it (2c9fcc9): forward 33 / 5 / 145,
# forward+backward 72 / 9 / 248 (linear_sums 'save'); 34 / 5 / 146 and 75 / 10 / 262 ('recompute'). The backward's
# pre-pass launch chosen per device (configs.prepass_launch, 2026-12-01): 2 calls more. The classify launch's
# select read per launch (configs.classify_packed, SLA_DIST_CLASSIFY, branch wip-fglue): 1 call more. dk and dv over
# the key rows' slabs (summary_rows.key_rows_in_slabs, 2026-12-02: the backward's peak -1 q-size at D 128): one
# product per slab and one for dz_j instead of one for both, the gradients as views: 3 aten ops more. The block
# scores in one launch (block_select._block_scores_kernel, 2026-12-02): 10 aten ops (a float64 batched GEMM among
# them) fewer, 1 launch more; dK/dV's long-first program order in one launch (_long_first_order_kernel): 6 aten ops
# (a radix sort among them) fewer, 1 launch more. The key rows' plan decided in one function for the eager and the
# compiled backward (backward_ops._key_rows_plan): 1 call more. The scores kernel over tiles of both block axes, K's
# sequence total made by one torch sum beforehand (its first version walked the key blocks and lost on the GPU): 1
# aten op and 1 call more. proj_l's fusion rule shared with the DiT's MLP (projection.plain_linear): 1 call more. A
# layer's own dK/dV split choice (SLAConfig.dkdv_split): validated per forward, put in the switches' place per
# backward: 1 call more per forward, 2 per forward+backward. The block counts of smooth-K's PyTorch path made only
# there, not on the kernels' path: 2 calls fewer per forward, 1 per forward+backward. dK/dV's q and dO through tensor
# descriptors on Hopper by default (configs.DEFAULT_TMA_KERNELS, 2026-12-02: dK/dV -7.7 % at L 32768): the launch's
# descriptor check on q and dO, 2 calls more per forward+backward.
BUDGETS = {
    ("layer forward", "save"): dict(aten_top=17, launches=6, sla_calls=94),
    ("layer forward+backward", "save"): dict(aten_top=44, launches=11, sla_calls=152),
    ("layer forward", "recompute"): dict(aten_top=18, launches=6, sla_calls=95),
    ("layer forward+backward", "recompute"): dict(aten_top=47, launches=12, sla_calls=157),
}


@pytest.mark.parametrize(("piece", "linear_sums"), BUDGETS)
def test_layer_host_work_stays_within_budget(piece, linear_sums):
    fn = host_overhead.noop_pieces(256, 2, 64, linear_sums=linear_sums)[piece]
    with host_overhead.memory_account.no_op_kernels(tma_device=True):
        fn()  # first call: the per-layout caches filled
    counts = host_overhead.host_counts(fn)
    budget = BUDGETS[piece, linear_sums]
    over = {key: (counts[key], limit) for key, limit in budget.items() if counts[key] > limit}
    assert not over, f"{piece} ({linear_sums}): (count, budget) {over}; all counts {counts}"
