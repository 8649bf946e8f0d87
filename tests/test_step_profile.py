"""benchmarks/step_profile.py: interval arithmetic, name classification and the step breakdown on synthetic traces."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import step_profile as sp  # noqa: E402
from step_profile import Event  # noqa: E402


def test_union_merges_overlapping_nested_and_touching_intervals():
    assert sp.union([(5, 7), (0, 2), (1, 3), (3, 4), (6, 6.5), (9, 9)]) == [(0, 4), (5, 7)]
    assert sp.length([(0, 10), (2, 3), (8, 12), (20, 21)]) == 13
    assert sp.union([]) == [] and sp.length([]) == 0


def test_intersect_subtract_and_clip():
    a, b = [(0, 4), (6, 10)], [(2, 7), (9, 12)]
    assert sp.intersect(a, b) == [(2, 4), (6, 7), (9, 10)]
    assert sp.subtract(a, b) == [(0, 2), (7, 9)]
    assert sp.subtract([(0, 10)], [(2, 3), (5, 6)]) == [(0, 2), (3, 5), (6, 10)]
    assert sp.subtract([(0, 10)], [(-1, 11)]) == []
    assert sp.clip([(0, 4), (5, 8), (9, 12)], (2, 10)) == [(2, 4), (5, 8), (9, 10)]
    # |a| = |a ∩ b| + |a - b| on every pair
    assert sp.length(a) == sp.length(sp.intersect(a, b)) + sp.length(sp.subtract(a, b))


@pytest.mark.parametrize("name,cat,expected", [
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "kernel", "all_to_all"),
    ("ncclDevKernel_AllToAll_RING_LL", "kernel", "all_to_all"),
    ("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t", "kernel", "all_to_all"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "kernel", "reduce_scatter"),
    ("ncclDevKernel_Reduce_Sum_f32_RING_LL", "kernel", "reduce"),
    ("ncclDevKernel_AllGather_RING_LL", "kernel", "all_gather"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "kernel", "all_reduce"),
    ("ncclDevKernel_Broadcast_RING_LL", "kernel", "broadcast"),
    ("c10d::alltoall_base_", "cpu_op", "all_to_all"),
    ("c10d::allreduce_", "cpu_op", "all_reduce"),
    ("_sla_fwd_kernel", "kernel", "sla"),
    ("_bwd_dkdv_kernel", "kernel", "sla"),
    ("_critical_columns_kernel", "kernel", "sla"),
    ("_some_renamed_kernel", "kernel", "sla"),
    ("sla_dist::sla_forward", "cpu_op", "sla"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "kernel", "gemm"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "kernel", "gemm"),
    ("aten::addmm", "cpu_op", "gemm"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>, float>", "kernel", "optimizer"),
    ("void lamb_stage1_kernel<float>", "kernel", "optimizer"),
    # on an H200 (2026-11-30) these were counted as optimizer: "lamb" matched "{lambda"
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::"
     "{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}>", "kernel", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "gpu_memcpy", "memcpy"),
    ("Memset (Device)", "gpu_memset", "memcpy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "kernel",
     "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "kernel", "elementwise"),
    ("aten::mul", "cpu_op", "elementwise"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "kernel", "attention"),
    ("autograd::engine::evaluate_function: MulBackward0", "cpu_op", "other"),
    ("_ZN5cuda3foo", "kernel", "other"),
])
def test_classify(name, cat, expected):
    assert sp.classify(name, cat) == expected


def _k(name, start, end, stream=7, cat="kernel"):
    return Event(name, cat, start, end - start, str(stream))


def _marks(*times):
    return [Event(sp.BOUNDARY, "user_annotation", t, 0.0, "1") for t in times]


def test_device_breakdown_splits_wall_into_compute_exposed_comm_and_idle():
    """Window [0, 100]: compute on two streams, all-to-all half hidden behind compute, a reduce-scatter with
    nothing beside it. Every number worked out by hand."""
    events = _marks(0, 100) + [
        _k("_sla_fwd_kernel", 10, 30),                                     # compute 10-30
        _k("sm90_xmma_gemm_bf16", 25, 40, stream=9),                       # second stream, overlaps: 10-40
        _k("ncclDevKernel_SendRecv", 35, 45, stream=20),                   # 35-40 hidden, 40-45 exposed
        _k("ncclDevKernel_ReduceScatter_Sum_bf16", 60, 70, stream=21),     # exposed 10
        _k("Memcpy HtoD (Pageable -> Device)", 80, 85, cat="gpu_memcpy"),  # compute 80-85
        _k("_bwd_dq_kernel", -5, 5),                                       # clipped to 0-5
        _k("_bwd_dq_kernel", 100, 110),                                    # outside
    ] + [Event("[Strategy]SLAStrategy.backward", "user_annotation", 5, 50, "1"),
         Event("Optimizer.step#FusedAdam.step", "user_annotation", 90, 20, "1"),
         Event("gpu side projection", "gpu_user_annotation", 0, 100, "7")]
    (window,) = sp.step_windows(events)
    b = sp.breakdown(events, window)
    assert b.source == "device kernels" and b.wall == 100
    assert b.compute == 5 + 30 + 5                 # 0-5, 10-40, 80-85
    assert b.comm == 20 and b.overlap == 5 and b.exposed_comm == 15
    assert b.idle == 100 - (5 + 35 + 10 + 5)       # 0-5, 10-45, 60-70, 80-85
    assert b.wall == b.compute + b.exposed_comm + b.idle
    cats = b.categories
    assert cats["sla"].busy == 25 and cats["sla"].count == 2 and cats["sla"].exposed is None
    assert cats["gemm"].busy == 15 and cats["memcpy"].busy == 5
    assert cats["all_to_all"].busy == 10 and cats["all_to_all"].exposed == 5
    assert cats["reduce_scatter"].busy == 10 and cats["reduce_scatter"].exposed == 10
    assert b.lanes == {"7": 30, "9": 15, "20": 10, "21": 10}
    assert b.ranges == {"[Strategy]SLAStrategy.backward": 50, "Optimizer.step#FusedAdam.step": 10}
    # idle: 5-10, 45-60, 70-80, 85-100; backward 5-55 is idle 5-10 and 45-55, the optimizer 90-100 all idle
    assert b.ranges_idle == {"[Strategy]SLAStrategy.backward": 15, "Optimizer.step#FusedAdam.step": 10}
    assert b.top[0] == ("_sla_fwd_kernel", "sla", 20, 1)


def test_sum_exceeds_busy_when_one_category_runs_on_two_streams():
    events = _marks(0, 50) + [_k("_sla_fwd_kernel", 0, 20), _k("_linear_summaries_kernel", 10, 30, stream=8)]
    b = sp.breakdown(events, (0, 50))
    assert b.categories["sla"].busy == 30 and b.categories["sla"].total == 40 and b.idle == 20


def test_cpu_ops_attributed_once_to_the_outermost_classified_op():
    """No device events: CPU ops. aten::linear holds aten::addmm (one 'gemm' interval, not two); an unclassified
    autograd wrapper keeps only its own time; sla_dist::sla_forward stays SLA over its inner aten::bmm; a second
    thread's all-to-all overlapping compute counts as overlap."""
    ops = [
        Event("aten::linear", "cpu_op", 0, 10, "1"), Event("aten::addmm", "cpu_op", 2, 6, "1"),
        Event("autograd::engine::evaluate_function: XBackward0", "cpu_op", 20, 20, "1"),
        Event("aten::mul", "cpu_op", 22, 5, "1"),
        Event("sla_dist::sla_forward", "cpu_op", 30, 8, "1"), Event("aten::bmm", "cpu_op", 31, 4, "1"),
        Event("c10d::alltoall_base_", "cpu_op", 35, 15, "2"),
    ]
    b = sp.breakdown(_marks(0, 60) + ops, (0, 60))
    assert b.source == "cpu ops"
    c = b.categories
    assert c["gemm"].busy == 10 and c["gemm"].count == 1
    assert c["elementwise"].busy == 5
    assert c["sla"].busy == 8
    assert c["other"].busy == 20 - 5 - 8 and c["other"].count == 3     # 20-22, 27-30, 38-40
    assert c["all_to_all"].busy == 15 and c["all_to_all"].exposed == 15 - 5   # 35-40 beside the wrapper
    assert b.compute == 10 + 20 and b.overlap == 5 and b.idle == 60 - (10 + 30)
    assert b.wall == b.compute + b.exposed_comm + b.idle


def test_windows_mean_json_and_markdown(tmp_path):
    events = _marks(0, 100, 300) + [_k("_sla_fwd_kernel", 10, 60), _k("_sla_fwd_kernel", 110, 210),
                                    _k("ncclDevKernel_AllGather", 150, 250, stream=3)]
    trace = {"traceEvents": [{"ph": "X", "name": e.name, "cat": e.cat, "ts": e.start, "dur": e.dur, "tid": 1,
                              "pid": 0, "args": {"stream": int(e.lane)} if e.cat == "kernel" else {}}
                             for e in events] + [{"ph": "M", "name": "process_name", "pid": 0}]}
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    steps, avg = sp.profile_trace(sp.read_trace(path))
    assert [s.wall for s in steps] == [100, 200]
    assert avg.wall == 150 and avg.compute == 75 and avg.comm == 50 and avg.overlap == 30
    assert avg.categories["all_gather"].exposed == 20 and avg.categories["all_gather"].count == 0  # round(1 / 2)
    assert avg.lanes == {"7": 75, "3": 50}
    out = sp.to_json(steps, avg, rank=0)
    assert out["mean"]["wall"] == 0.15 and out["steps"][1]["categories"]["all_gather"]["exposed"] == 0.04
    md = sp.markdown(avg, "rank 0", len(steps))
    assert "GPU kernels" in md and "| all_gather | 0.1 | 0.1 | 0 | 0.0 |" in md
    with pytest.raises(ValueError, match="fewer than 2 boundary markers"):
        sp.mean([])


def test_markdown_lists_the_longest_and_what_other_holds():
    """Beyond the 12 longest names, the longest 'other' ones too (the names a new classification rule needs)."""
    kernels = [_k(f"_sla_k{i}_kernel", 10 * i, 10 * i + 9 - i / 2) for i in range(13)]
    events = _marks(0, 200) + kernels + [_k("mystery_op", 150, 150.5)]
    md = sp.markdown(sp.breakdown(events, (0, 200)), "t", 1)
    assert "`_sla_k11_kernel`" in md and "`_sla_k12_kernel`" not in md and "| `mystery_op` | other |" in md
