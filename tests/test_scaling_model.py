"""benchmarks/scaling_model.py: the analytical SP x DP x ZeRO model against the measurements it states it reproduces."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import scaling_measurements as meas  # noqa: E402
import scaling_model as sm  # noqa: E402
import scaling_report as report  # noqa: E402


@pytest.fixture(scope="module")
def cal() -> sm.Calibration:
    return sm.calibrate()


def test_reproduces_unfitted_measurements_within_tolerance(cal):
    found = sm.checks(cal)
    assert len({c.name for c in found}) == len(found)  # one row per measured number: none is both fit and check
    by_name = {c.name: c for c in found}
    # The 1- and 2-GPU training steps issue #12 asks for (2026-11-30, steady topk 0.05) and the older unfitted ones.
    steps = [sm._train_name(t, "step") for t in (sm.E2E_SP1, sm.E2E_SP2, sm.TRAIN_1GPU_NO_CKPT, sm.TRAIN_2GPU_NO_CKPT)]
    peaks = [sm._train_name(t, "peak") for t in (sm.TRAIN_2GPU_CKPT[2], sm.TRAIN_2GPU_CKPT[3], sm.E2E_SP1)]
    for name in steps + peaks:
        assert by_name[name].role == "check"
        assert by_name[name].within, f"{name}: {by_name[name].error:+.1%} outside ±{sm.TOLERANCE:.0%}"
    # Every check row, the SLA layer alone at L 8192 and 131072 (forward included) and nvidia-smi's SP 1 peak too.
    held = [c for c in found if c.role == "check"]
    assert len(held) > 60 and [c.name for c in held if not c.within] == []
    # The Ulysses layer at P = 2 is its P = 1 time / 2 plus the fitted exchange, for both exchanges, in the exchange
    # file and in every one-chunk run of the overlap file.
    ulysses = [c for c in held if c.name.startswith("Ulysses")]
    assert len(ulysses) == 2 * (len(sm.EXCHANGE_TIMINGS) + len(meas.EXCHANGE_CHECKS))
    # Fitted to as many numbers as parameters: reproduced exactly (the SLA layer's three lengths, each exchange's two
    # volumes, the DiT steps, the 1-GPU step and peak).
    exact = [c for c in found if c.role == "fit" and "memory.used" not in c.name
             and c.name.startswith(("SLA layer", "fused exchange", "deepspeed exchange", "1.3B"))]
    assert len(exact) == 2 * len(meas.LAYER_FIT) + len(sm.EXCHANGE_TIMINGS) + 2 * len(sm.DIT_STEPS) + 2
    assert all(c.error == pytest.approx(0, abs=1e-9) for c in exact)


def test_layer_fit_is_todays_kernels_with_positive_terms(cal):
    """Three positive terms per direction, solved through today's kernels (level 1 for main's code); older code is
    predicted at its own level against the same fit."""
    for coefficients in (cal.sla.fwd, cal.sla.fwd_bwd):
        assert len(coefficients) == 3 and all(v > 0 for v in coefficients)
    assert cal.sla.code is meas.LAYER_NOW and meas.LAYER_NOW in meas.LAYER_FIT
    assert cal.sla.level(False) == pytest.approx(1) and cal.sla.level(True) == pytest.approx(1)
    old = meas.LAYER_1129
    assert cal.sla.level(True, old) == pytest.approx(old.fwd_bwd_ms / meas.LAYER_NOW.fwd_bwd_ms)
    # Heads scale the per-head terms, not the per-call constant.
    assert cal.sla.ms(131072, 24, 0.05, False) < 2 * cal.sla.ms(131072, 12, 0.05, False)


def _row(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r.get(k, 1) == v for k, v in match.items())]
    assert len(found) == 1, match
    return found[0]


def test_layer_and_exchange_timings_are_the_files_numbers():
    """The fit's and the checks' milliseconds are the results files' rows: the dQ-fusion file's main path in graphs,
    the overlap file's P 1 layers and one-chunk fused exchanges (runs 1-3)."""
    dq = json.loads((BENCHMARKS / "results" / "2026-11-30-h200x2-dqfuse.json").read_text())
    for t in meas.LAYER_FIT[:2]:
        r = _row(dq["rows"], L=t.L, path="kernel")
        assert (t.fwd_ms, t.fwd_bwd_ms) == (r["graph_fwd_ms"], r["graph_fwdbwd_ms"])
    data = json.loads((BENCHMARKS / "results" / "2026-11-30-h200x2-ulysses-overlap.json").read_text())
    runs = {1: data["overlap"]["results"], 2: data["main"]["results"], 3: data["high_priority"]["results"]}
    for (run, layout, heads), t in meas.OVERLAP_P1.items():
        r = _row(runs[run], P=1, layout=layout, heads=heads)
        assert t.fwd_ms == pytest.approx(r["fwd_ms"], abs=0.05)
        assert t.fwd_bwd_ms == pytest.approx(r["fwd_bwd_ms"], abs=0.05)
    assert len(meas.EXCHANGE_CHECKS) == 10
    for e in meas.EXCHANGE_CHECKS:
        run, layout = int(e.source.split("run ")[1][0]), e.source.split(", ")[2]
        r = _row(runs[run], P=2, layout=layout, heads=e.heads, overlap_chunks=1)
        assert e.one is meas.OVERLAP_P1[run, layout, e.heads]
        assert e.exchange_ms == pytest.approx(r["exchange_ms"], abs=0.005)
        assert e.fwd_ms == pytest.approx(r["fwd_ms"], abs=0.05)
        assert e.fwd_bwd_ms == pytest.approx(r["fwd_bwd_ms"], abs=0.05)


def test_nvidia_smi_memory_is_allocated_plus_the_measured_unallocated_memory(cal):
    """The unallocated term is the same split measured both ways (no prediction enters), and memory.used rows are
    predicted as allocated + that term."""
    assert cal.unallocated_bytes == pytest.approx((sm.E2E_SP2.peak_gib - sm.TRAIN_2GPU_CKPT[2].peak_gib) * sm.GIB)
    p = sm.E2E_SP1.predicted(cal)
    assert p.used_bytes == pytest.approx(p.memory_bytes + cal.unallocated_bytes)
    by_name = {c.name: c for c in sm.checks(cal)}
    assert by_name[sm._train_name(sm.E2E_SP1, "peak")].predicted == pytest.approx(p.used_bytes / sm.GIB)
    assert by_name[sm._train_name(sm.E2E_SP2, "peak")].role == "fit"
    # A split can fit allocated and not with the unallocated memory: the table marks it '~'.
    tight = sm.predict(sm.WAN14, sm.Parallel(8, 4, 2, checkpoint=False), cal)
    assert tight.fits and not tight.fits_used
    cell = dict(step_s=1.0, tokens_per_s_per_gpu=1.0, memory_gib=1.0, fits=True, fits_used=False)
    assert report._cell(cell).endswith("~")


def test_sp2_breakdown_adds_up_and_names_what_90_percent_needs(cal):
    par = sm.E2E_SP2.par
    parts = report.step_parts_ms(par, cal)
    assert sum(parts.values()) == pytest.approx(1e3 * sm.predict(sm.WAN13, par, cal).step_s)
    passes = [v for k, v in parts.items() if k.startswith("Ulysses exchange")]
    assert len(passes) == 3 and passes[0] > 0 and passes == pytest.approx([passes[0]] * 3)  # fwd, bwd, recompute
    assert not any(v for k, v in report.step_parts_ms(sm.E2E_SP1.par, cal).items() if k.startswith("Ulysses"))
    text = "\n".join(report.efficiency(cal))
    # Measured: 1389 ms at SP 1, 875 ms at SP 2; 90 % needs SP 2 <= 1389 / 1.8 = 772 ms, 103 ms less.
    assert "SP 2 <= 772 ms, 103 ms less" in text and "**103 ms**" in text


def test_all_to_all_bytes_match_the_measured_sequence_parallel_counts():
    data = json.loads((BENCHMARKS / "results" / "2026-11-27-h200x4-sequence-parallel.json").read_text())
    rows = [r for r in data["results"] if r["mode"] == "ulysses" and r["P"] > 1]
    assert rows
    for r in rows:  # 4 all-to-alls (q, k, v, o) per forward
        assert 4 * sm.a2a_bytes(r["seq_len"], r["P"], r["heads"] * 128) == r["ulysses_bytes"]


def test_exchange_timings_are_the_files_forward_plus_backward_of_four_shards():
    """The exchange file's GB/s is fwd + bwd bytes (two passes of the forward's four shards) over its exchange ms:
    what ExchangeFit.fit reads its milliseconds as."""
    data = json.loads((BENCHMARKS / "results" / "2026-11-30-h200x2-ulysses-exchange.json").read_text())
    rows = {(r["exchange"], r["heads"]): r for r in data["results"] if r["P"] > 1 and r["layout"] == "blhd"}
    for e in sm.EXCHANGE_TIMINGS:
        r = rows[e.exchange, e.heads]
        assert e.exchange_ms == pytest.approx(r["exchange_ms"], abs=0.005)
        assert 4 * sm.a2a_bytes(e.L, e.P, e.heads * 128) == r["ulysses_bytes"]
        assert 2 * r["ulysses_bytes"] / (r["exchange_ms"] / 1e3) / 1e9 == pytest.approx(r["exchange_gbps"])


def _memory(cal, sp: int, dp: int, stage: int = 2, checkpoint: bool = True) -> float:
    return sm.predict(sm.WAN14, sm.Parallel(sp, dp, stage, checkpoint), cal).memory_bytes


def test_memory_moves_the_right_way(cal):
    for sp in sm.SP_SIZES:
        assert _memory(cal, sp, 32 // sp, 3) < _memory(cal, sp, 32 // sp, 2)  # ZeRO-3 shards the bf16 weights
        assert _memory(cal, sp, 32 // sp) < _memory(cal, sp, 32 // sp, checkpoint=False)
    # Same world, more sequence parallelism: fewer tokens per GPU, less activation memory.
    by_sp = [_memory(cal, sp, 32 // sp, checkpoint=False) for sp in sm.SP_SIZES]
    assert by_sp == sorted(by_sp, reverse=True)
    # More ranks to shard over: less memory, under both stages.
    for stage in (2, 3):
        by_world = [_memory(cal, 8, dp, stage) for dp in (1, 2, 4, 8)]
        assert by_world == sorted(by_world, reverse=True)


def test_step_time_moves_the_right_way(cal):
    step = lambda par: sm.predict(sm.WAN14, par, cal).step_s  # noqa: E731
    assert step(sm.Parallel(8, 4, 3)) > step(sm.Parallel(8, 4, 2))
    assert step(sm.Parallel(8, 4, 2, checkpoint=True)) > step(sm.Parallel(8, 4, 2, checkpoint=False))
    assert step(sm.Parallel(8, 4, 2, overlap=1.0)) < step(sm.Parallel(8, 4, 2))
    assert step(sm.Parallel(8, 4, 2, compile=True)) < step(sm.Parallel(8, 4, 2))
    assert step(sm.Parallel(8, 4, 2)) < step(sm.Parallel(8, 4, 2, exchange="deepspeed"))
    assert step(sm.Parallel(8, 1)) < step(sm.Parallel(4, 2)) < step(sm.Parallel(2, 4)) < step(sm.Parallel(1, 8))
    # Leaving the node costs: the same split on slower inter-node links is slower.
    slow = dataclasses.replace(cal, cluster=sm.Cluster(gpus_per_node=4))
    assert sm.predict(sm.WAN14, sm.Parallel(8, 1), slow).step_s > step(sm.Parallel(8, 1))
    # The recipe's configuration fits in memory, SP 1 without checkpointing does not.
    assert sm.predict(sm.WAN14, sm.Parallel(8, 4, 3), cal).fits
    assert not sm.predict(sm.WAN14, sm.Parallel(1, 8, 2, checkpoint=False), cal).fits


@pytest.mark.parametrize("build, message", [
    (lambda: sm.Parallel(0, 1), "sp=0"),
    (lambda: sm.Parallel(2, 1.5), "dp=1.5"),
    (lambda: sm.Parallel(2, 1, zero_stage=1), "zero_stage=1"),
    (lambda: sm.Parallel(2, 1, overlap=1.5), "overlap=1.5"),
    (lambda: sm.Workload("wan2.1-14b", (21, 90, 160), topk=0.0), "topk=0.0"),
    (lambda: sm.Workload("wan2.1-14b", (21, 91, 160)), r"latents=\(21, 91, 160\)"),
    (lambda: sm.Workload("wan9-1t", (21, 90, 160)), "wan9-1t"),
    (lambda: sm.Cluster(gpus_per_node=0), "gpus_per_node=0"),
    (lambda: sm.SLALayerFit.fit(meas.LAYER_FIT[:2], meas.LAYER_NOW), r"lengths \[8192, 32768\]"),
    (lambda: sm.calibrate().sla.ms(8192, 12, 0.05, True, sm.LayerTiming(8192, 12, 0.05, 1.0, 2.0)), "L=8192"),
    (lambda: sm.Parallel(2, 1, exchange="ring"), "exchange='ring'"),
    (lambda: sm.Parallel(2, 1, zero_stage=3, compile=True), "zero_stage=3"),
    (lambda: sm.Parallel(2, 1, exchange="deepspeed", compile=True), "exchange='deepspeed'"),
    (lambda: sm.ExchangeFit.fit("fused", sm.EXCHANGE_TIMINGS[:1]), "at least two volumes"),
])
def test_invalid_inputs_name_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_sequence_split_must_divide_heads_and_tokens(cal):
    with pytest.raises(ValueError, match="sp=3"):
        sm.predict(sm.WAN14, sm.Parallel(3, 1), cal)  # 40 heads
