"""Issue #11's attention sweep on the CPU: the grid and its selection, the cost model that sizes gpu_suite.sh's
attn-sweep parts (their sizes: test_gpu_suite.py), the JSON's append / merge rules, the glue classification and the
report's pass / fail logic on synthetic rows (bench_attention.py's measurements themselves need CUDA)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SWEEP_2026_11_30 = BENCHMARKS / "results" / "2026-11-30-h200-attention.json"
"""The first full sweep (fixed launch settings, no compiled row), with each cell's measured seconds."""
sys.path.insert(0, str(BENCHMARKS))

import attention_report as ar  # noqa: E402
import attention_sweep as sweep  # noqa: E402
import glue_fraction as gf  # noqa: E402


# --- the grid ---------------------------------------------------------------------------------------------------

def test_the_grid_is_the_issues_32_cells_at_the_model_width():
    cells = sweep.sweep_cells()
    assert len(cells) == 32 == len(set(cells))
    assert {c.L for c in cells} == {8192, 16384, 32768, 75600}
    assert {(c.D, c.H) for c in cells} == {(64, 24), (128, 12)}
    assert {c.sparsity for c in cells} == {0.80, 0.90, 0.95, 0.97}
    assert cells == sorted(cells)  # the cells of a shape one after the other
    assert sweep.Cell(8192, 128, 0.97).topk == 0.03


@pytest.mark.parametrize("specs, expected", [
    (["L=8192,16384"], 16),
    (["L=75600", "D=64"], 4),
    (["sparsity=95"], 8),
    (["sparsity=0.95,0.97", "D=128", "L=8192"], 2),
])
def test_cell_selection(specs, expected):
    cells = sweep.sweep_cells(specs)
    assert len(cells) == expected
    if specs == ["sparsity=95"]:
        assert all(c.sparsity == 0.95 for c in cells)


@pytest.mark.parametrize("spec, message", [
    ("L=1000", r"L=1000 is not in the sweep's L \[8192, 16384, 32768, 75600\]"),
    ("H=12", r"cell selection 'H=12' is not KEY=V1,V2"),
    ("L", r"cell selection 'L' is not KEY=V1,V2"),
    ("D=sixty", r"D value 'sixty' in 'D=sixty' is not a number"),
])
def test_bad_cell_selection_names_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        sweep.sweep_cells([spec])


# --- cost model -------------------------------------------------------------------------------------------------

def test_dense_at_75600_gets_the_minimum_repetitions():
    calls, reps = sweep.bench_calls(228.0)
    assert reps == sweep.MIN_REPS and calls == 2 + 1 + 5 + 1 + sweep.MIN_REPS
    assert sweep.rep_ms(228.0) / 228.0 >= sweep.MIN_REPS  # the rep do_bench gets yields those repetitions
    assert sweep.bench_calls(0.5)[1] == 200 and sweep.rep_ms(0.5) == sweep.REP_MS


def test_model_reproduces_the_measured_dense_times():
    """Dense cuDNN fwd+bwd at D 128 scaled as L^2 from 32768, against 2026-11-29-h200-attention-tuned.md."""
    for L, measured_ms in ((16384, 10.56), (75600, 227.73)):
        assert sweep.method_ms(sweep.DENSE, L, 128, 0.95)[1] == pytest.approx(measured_ms, rel=0.06)


def test_first_calls_are_counted_once_per_what_they_compile():
    model = sweep.CostModel(profile_glue=False)
    plan = dict(model.plan(sweep.sweep_cells(["L=8192"])))
    first, second = plan[sweep.Cell(8192, 64, 0.80)], plan[sweep.Cell(8192, 64, 0.90)]
    assert first - second == pytest.approx(sweep.FLEX_COMPILE_S + 2 * sweep.SLA_COMPILE_S
                                           + 2 * sweep.SLA_NEW_LENGTH_S
                                           + sweep.measure_seconds(sweep.DENSE, 8192, 64, 0.80), abs=0.2)
    # D 128 compiles its own kernels and FlexAttention graphs, and measures its own dense row
    assert plan[sweep.Cell(8192, 128, 0.80)] == pytest.approx(first, rel=0.02)
    # a dense row already in an --append file is not measured again
    reused = sweep.CostModel(profile_glue=False).plan([sweep.Cell(8192, 64, 0.80)], {(8192, 24, 64)})
    assert reused[0][1] == pytest.approx(first - sweep.measure_seconds(sweep.DENSE, 8192, 64, 0.80))
    tuned = dict(sweep.CostModel(autotune=True, profile_glue=False).plan(sweep.sweep_cells(["L=8192"])))
    assert tuned[sweep.Cell(8192, 64, 0.80)] - first == pytest.approx(2 * (sweep.SLA_TUNE_S - sweep.SLA_COMPILE_S))


def test_every_cell_measures_the_compiled_layer_and_pays_its_compiles():
    assert sweep.COMPILED in sweep.CELL_METHODS and set(sweep.FULL_LAYERS) <= set(sweep.cell_methods(graphs=True))
    assert sweep.FULL_GRAPH not in sweep.CELL_METHODS  # only with --graphs
    plan = dict(sweep.CostModel(profile_glue=True).plan(sweep.sweep_cells(["L=16384", "D=128"])))
    later = sweep.Cell(16384, 128, 0.9)  # its shape's first calls fell on the 80 % cell
    steady = sum(sweep.measure_seconds(m, later.L, later.D, later.sparsity) for m in sweep.CELL_METHODS)
    assert plan[later] == pytest.approx(steady + sweep.COMPILED_GRAPHS_PER_CELL * sweep.COMPILED_GRAPH_S
                                        + len(sweep.PROFILED_LAYERS) * sweep.PROFILE_S)
    # compiled, the layer loses the eager Python's host time that is the eager floor at short sequences
    assert sweep.method_ms(sweep.COMPILED, 8192, 128, 0.95)[1] < sweep.method_ms(sweep.FULL, 8192, 128, 0.95)[1]
    assert sweep.method_ms(sweep.COMPILED, 75600, 128, 0.8) == sweep.method_ms(sweep.FULL, 75600, 128, 0.8)


def test_cost_model_covers_the_measured_sweep_without_overstating_it():
    """Calibrated on the 2026-11-30 sweep's measured cells: leaving out the compiled row, which that sweep lacked,
    each half's estimate covers its measured seconds and stays within 2.5x of them (the plan of that run, with
    assumed compile times, said 414 and 450 s for 52 and 94 s of cells)."""
    for run in sweep.load_payload(SWEEP_2026_11_30)["runs"]:
        cells = [sweep.Cell(c["L"], c["D"], c["sparsity"]) for c in run["cells"]]
        compiled = sum(sweep.measure_seconds(sweep.COMPILED, c.L, c.D, c.sparsity) + sweep.PROFILE_S
                       + sweep.COMPILED_GRAPHS_PER_CELL * sweep.COMPILED_GRAPH_S for c in cells)
        estimate = sum(s for _, s in sweep.CostModel(profile_glue=True).plan(cells)) - compiled
        wall = sum(c["wall_s"] for c in run["cells"])
        assert wall <= estimate <= 2.5 * wall, (run["command"], estimate, wall)


# --- the JSON ---------------------------------------------------------------------------------------------------

def _row(L, D, sparsity, method, fb, fwd=None, mib=100.0, note="", kernels=None):
    return dict(L=L, H=1536 // D, D=D, sparsity=sparsity, method=method, fwd_ms=fwd or fb / 3, fwd_bwd_ms=fb,
                tflops_fwd=1.0, extra_mib=mib, note=note, kept_keys=1.0, first_fwd_s=1.0, first_fwd_bwd_s=2.0,
                reps_fwd=5, reps_fwd_bwd=5, kernels_us=kernels)


def _cell_rows(L, D, s, flex=1.0, sparse=1.1, full=1.2, note="", kernels=None, mib=100.0, compiled=1.1):
    """A cell's rows; ``compiled=None``: without the compiled full layer, as the sweeps before it."""
    rows = [_row(L, D, s, sweep.FLEX, flex), _row(L, D, s, sweep.SPARSE_ONLY, sparse),
            _row(L, D, s, sweep.FULL, full, note=note, kernels=kernels, mib=mib)]
    if compiled is not None:
        rows.append(_row(L, D, s, sweep.COMPILED, compiled, kernels=kernels, mib=mib))
    return rows


def _dense(L, D, fb=2.0, mib=150.0):
    return _row(L, D, None, sweep.DENSE, fb, mib=mib)


def test_done_cells_need_every_method_measured():
    rows = [_dense(8192, 64), *_cell_rows(8192, 64, 0.8), *_cell_rows(8192, 64, 0.9, note="OutOfMemoryError: x"),
            *_cell_rows(8192, 64, 0.95)[:2], *_cell_rows(8192, 64, 0.97, compiled=None)]
    # a cell of an older sweep, without the compiled row, is measured again by --append (all its rows: one run's)
    assert sweep.done_cells(rows) == {sweep.Cell(8192, 64, 0.8)}
    assert sweep.dense_shapes(rows) == {(8192, 24, 64)}


def test_merge_takes_each_cell_from_one_run():
    first = dict(device="H200", command="a", rows=[_dense(8192, 64, fb=2.0), *_cell_rows(8192, 64, 0.8, full=1.0),
                                                   *_cell_rows(8192, 64, 0.9, full=9.0, note="RuntimeError: x")])
    second = dict(device="H200", command="b", rows=[_dense(8192, 64, fb=3.0), *_cell_rows(8192, 64, 0.8, full=5.0),
                                                    *_cell_rows(8192, 64, 0.9, flex=7.0, full=2.0)])
    merged = sweep.merge_payloads([first, second])
    assert [r["command"] for r in merged["runs"]] == ["a", "b"]
    full = {r["sparsity"]: r["fwd_bwd_ms"] for r in merged["rows"] if r["method"] == sweep.FULL}
    flex = {r["sparsity"]: r["fwd_bwd_ms"] for r in merged["rows"] if r["method"] == sweep.FLEX}
    assert full == {0.8: 1.0, 0.9: 2.0} and flex[0.9] == 7.0  # the failed cell wholly from the second run
    assert [r["fwd_bwd_ms"] for r in merged["rows"] if r["method"] == sweep.DENSE] == [2.0]
    assert merged["rows"][0]["method"] == sweep.DENSE and len(merged["rows"]) == 1 + 2 * len(sweep.CELL_METHODS)
    # merging a merged payload again keeps its runs
    assert len(sweep.merge_payloads([merged, second])["runs"]) == 3


def test_write_payload_is_atomic(tmp_path):
    path = tmp_path / "sub" / "sweep.json"
    sweep.write_payload(path, dict(rows=[_dense(8192, 64)]))
    assert sweep.load_payload(path)["rows"][0]["method"] == sweep.DENSE
    assert [p.name for p in path.parent.iterdir()] == ["sweep.json"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json has no 'rows'"):
        sweep.load_payload(tmp_path / "bad.json")


# --- glue -------------------------------------------------------------------------------------------------------

KERNELS_FB = {"_sla_fwd_kernel": 1000.0, "_bwd_dq_kernel_0d1d2d": 900.0, "_bwd_dkdv_kernel": 1800.0,
              "_bwd_prepass_kernel": 500.0, "_linear_summaries_kernel": 300.0,
              "void at::native::elementwise_kernel<128, 2>": 100.0, "Memset (Device)": 20.0, "_classify_kernel": 60.0}


def test_glue_fraction_counts_the_prepass_both_ways():
    total = sum(KERNELS_FB.values())
    assert gf.glue_fraction(KERNELS_FB, prepass_counts=False) == pytest.approx((500 + 300 + 100 + 20 + 60) / total)
    assert gf.glue_fraction(KERNELS_FB, prepass_counts=True) == pytest.approx((300 + 100 + 20 + 60) / total)
    assert gf.is_sparse_kernel("_bwd_dq_kernel_0d1d2d", prepass_counts=False)  # a suffix Triton appends
    assert not gf.is_sparse_kernel("_sla_fwd_kernelx", prepass_counts=True)
    assert not gf.is_sparse_kernel("_bwd_prepass_kernel", prepass_counts=False)
    s = gf.glue_summary(KERNELS_FB)
    assert s["glue_strict"] > s["glue_lenient"] and s["total_us"] == total
    assert f"{100 * 980 / total:.1f} % of 4.680 ms" in gf.glue_lines("fwd+bwd", KERNELS_FB)


@pytest.mark.parametrize("kernels, message", [({}, "no CUDA time"), ({"_sla_fwd_kernel": -1.0}, "negative")])
def test_glue_fraction_rejects_empty_profiles(kernels, message):
    with pytest.raises(ValueError, match=message):
        gf.glue_fraction(kernels, prepass_counts=False)


def test_kernel_times_take_the_device_entries_per_call():
    class Event:
        def __init__(self, key, device_type, us, is_user_annotation=False):
            self.key, self.device_type, self.device_time_total = key, device_type, us
            self.is_user_annotation = is_user_annotation

    events = [Event("aten::mm", "DeviceType.CPU", 300.0), Event("_sla_fwd_kernel", "DeviceType.CUDA", 3000.0),
              Event("cudaLaunchKernel", "DeviceType.CPU", 50.0), Event("Memset (Device)", "DeviceType.CUDA", 30.0),
              Event("## forward ##", "DeviceType.CUDA", 3030.0, is_user_annotation=True)]
    assert gf.kernel_times(events, 3) == {"_sla_fwd_kernel": 1000.0, "Memset (Device)": 10.0}


def test_kernel_times_reads_a_real_profilers_averages():
    """The attributes kernel_times reads exist on torch's own averages; a CPU-only profile has no device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    events = prof.key_averages()
    assert any(e.key == "aten::mm" for e in events)
    assert gf.kernel_times(events, 1) == {}


# --- report -----------------------------------------------------------------------------------------------------

def _grid_rows(full_of=lambda c: 1.2, kernels=None, compiled_of=lambda c: 1.1) -> list[dict]:
    """The whole grid; ``compiled_of`` returning None leaves the compiled row out (an older sweep)."""
    rows = []
    for cell in sweep.sweep_cells():
        if cell.sparsity == 0.80:
            rows.append(_dense(cell.L, cell.D, fb=2.0))
        rows += _cell_rows(cell.L, cell.D, cell.sparsity, flex=1.0, full=full_of(cell), kernels=kernels,
                           compiled=compiled_of(cell))
    return rows


def test_flex_criterion_at_its_boundary():
    rows = _grid_rows(lambda c: {0.80: 1.25, 0.90: 1.2501}.get(c.sparsity, 1.0))
    results = ar.evaluate(rows)
    ok = {(r.L, r.D, r.sparsity): r.flex_ok for r in results}
    assert ok[(8192, 64, 0.80)] and not ok[(8192, 64, 0.90)] and ok[(8192, 64, 0.95)]
    assert ar.summary(results)["flex_met"] == 24


def test_dense_criterion_counts_the_two_8192_cells_at_95():
    # dense 2.0 ms; full layer 1.2 ms (1.67x) at 95 %, 2.5 ms (slower than dense) elsewhere at 8192
    rows = _grid_rows(lambda c: 1.2 if c.sparsity == 0.95 or c.L != 8192 else 2.5)
    results = ar.evaluate(rows)
    s = ar.summary(results)
    assert s["dense_cells"] == 2 and s["dense_met"] == 2
    cell = next(r for r in results if r.dense_cell and r.D == 128)
    assert cell.speedup == pytest.approx(2.0 / 1.2)
    assert cell.dense_ok() and not cell.dense_ok(1.95, strict=True) and not cell.dense_ok(20.0, strict=True)
    slower = ar.evaluate(_grid_rows(lambda c: 2.5))
    assert ar.summary(slower)["dense_met"] == 0
    exactly = ar.evaluate(_grid_rows(lambda c: 2.0))  # as fast as dense is not faster
    assert ar.summary(exactly)["dense_met"] == 0


def test_glue_and_memory_and_missing_cells():
    rows = _grid_rows(kernels={"fwd": {"_sla_fwd_kernel": 90.0, "_linear_summaries_kernel": 10.0},
                               "fwd_bwd": KERNELS_FB})
    rows = [r for r in rows if not (r["L"] == 75600 and r["D"] == 64 and r["sparsity"] == 0.97)]
    # the last eager full-layer row above dense's 150 MiB (the compiled one after it stays below)
    next(r for r in reversed(rows) if r["method"] == sweep.FULL)["extra_mib"] = 999.0
    results = ar.evaluate(rows)
    s = ar.summary(results)
    assert s["measured"] == 31 and s["flex_met"] == 31 and s["glue_profiled"] == 31 and s["glue_met"] == 0
    assert s["memory_met"] == 30 and not s["all_met"]
    missing = next(r for r in results if (r.L, r.D, r.sparsity) == (75600, 64, 0.97))
    assert missing.note == "not measured" and not missing.flex_ok
    assert results[0].glue_fwd == pytest.approx(0.10)


def test_each_target_is_counted_for_the_eager_and_the_compiled_layer():
    """A grid where the two full-layer rows differ in every target: each count is its own row's."""
    light = {"fwd": {"_sla_fwd_kernel": 95.0, "x": 5.0}, "fwd_bwd": {"_sla_fwd_kernel": 95.0, "x": 5.0}}
    rows = _grid_rows(lambda c: 1.5, compiled_of=lambda c: 2.5 if c.L == 8192 and c.sparsity == 0.95 else 1.2)
    for r in rows:
        if r["method"] == sweep.FULL:
            r["kernels_us"] = {"fwd": KERNELS_FB, "fwd_bwd": KERNELS_FB}  # glue above 15 %
        elif r["method"] == sweep.COMPILED:
            r["kernels_us"] = None if r["L"] == 75600 else light
            r["extra_mib"] = 999.0 if r["D"] == 64 else 100.0
    text, evaluation = ar.report(dict(rows=rows, device="NVIDIA H200", command="x"))
    assert "FlexAttention (sparse only): eager **0 of 32**, compiled **30 of 32**" in text
    assert "faster than cuDNN dense: eager **2 of 2**, compiled **0 of 2**" in text
    assert "of the profiled cells: eager **0 of 32**, compiled **24 of 24**" in text
    assert "dense cuDNN's: eager **32 of 32**, compiled **16 of 32**" in text
    assert "every target met: eager **no**, compiled **no**" in text
    assert [evaluation[m]["summary"]["flex_met"] for m in (sweep.FULL, sweep.COMPILED)] == [0, 30]
    assert sweep.FULL_GRAPH not in evaluation and "graphed: not in this sweep" in text
    # one layer's failure is noted in its own results only
    first = next(r for r in rows if r["method"] == sweep.COMPILED)
    first["note"] = "BackendCompilerFailed: x"
    assert (first["L"], first["D"], first["sparsity"]) == (8192, 64, 0.8)
    eager, compiled = (ar.evaluate(rows, layer=m)[0] for m in (sweep.FULL, sweep.COMPILED))
    assert eager.note == "" and eager.measured and not compiled.measured and "BackendCompilerFailed" in compiled.note
    with pytest.raises(ValueError, match="layer 'SLA sparse branch only, BQ128' is not a full-layer row"):
        ar.evaluate(rows, layer=sweep.SPARSE_ONLY)


def test_the_committed_sweep_without_the_compiled_row_still_reports(tmp_path):
    """The 2026-11-30 sweep predates the compiled row: its report is the eager layer's, with the same counts as the
    evaluation committed beside it, and says the compiled row is not in it."""
    committed = json.loads(SWEEP_2026_11_30.read_text())["evaluation"]["summary"]
    out = ar.main([str(SWEEP_2026_11_30), "--out", str(tmp_path / "old")])
    evaluation = json.loads(out.with_suffix(".json").read_text())["evaluation"]
    got = evaluation[sweep.FULL]["summary"]
    assert list(evaluation) == [sweep.FULL] and {k: got[k] for k in committed} == committed
    assert got["memory_measured"] == 32  # the count added since, which the memory line reads
    text = out.with_suffix(".md").read_text()
    assert "FlexAttention (sparse only): eager **2 of 32**, compiled: not in this sweep" in text
    assert "predates the compiled full-layer row" in text and "## Full layer, compiled" not in text
    assert "| 75600 | 24 | 64 | 1.10x ✓ | 1.19x ✓ | 1.44x ✗ | 1.78x ✗ |" in text
    # as --before of a new sweep: its eager rows compared, its first run's command named
    text, _ = ar.report(dict(rows=_grid_rows(), device="NVIDIA H200"), sweep.load_payload(SWEEP_2026_11_30), "old")
    eager, compiled = text.split("## Full layer, eager")[1].split("## Full layer, compiled")
    assert "before: `old`, `benchmarks/bench_attention.py --sweep --profile-glue --budget 510 --cells L=8192" in eager
    assert "| 8192 | 24 | 64 | 80 % | 0.791 -> 0.400 | 1.814 -> 1.200 |" in eager
    assert "(no cell in common with the earlier file)" in compiled


def test_report_markdown_and_before_after(tmp_path):
    kernels = {"fwd": {"_sla_fwd_kernel": 95.0, "x": 5.0}, "fwd_bwd": {"_sla_fwd_kernel": 95.0, "x": 5.0}}
    rows = _grid_rows(lambda c: 1.2 if c.L != 8192 else 1.5, kernels=kernels)  # compiled 1.1 everywhere
    a = [r for r in rows if r["L"] <= 16384]
    b = [r for r in rows if r["L"] > 16384]
    meta = dict(device="NVIDIA H200", torch="2.11.0", triton="3.6.0", autotune=False, started="2026-12-01",
                cells=[dict(L=1, D=1, sparsity=0.1, estimate_s=1.0, wall_s=10.0)], skipped=[], budget_s=510)
    sweep.write_payload(tmp_path / "a.json", dict(meta, command="bench a", rows=a))
    sweep.write_payload(tmp_path / "b.json", dict(meta, command="bench b", rows=b))
    before = dict(device="NVIDIA H200", rows=[  # an old --quick file: dense per sparsity, old method names equal
        _row(32768, 128, 0.95, sweep.DENSE, 40.0), _row(32768, 128, 0.95, sweep.FLEX, 2.9),
        _row(32768, 128, 0.95, sweep.FULL, 7.5, fwd=1.9)])
    sweep.write_payload(tmp_path / "before.json", before)
    out = ar.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--before", str(tmp_path / "before.json"),
                   "--out", str(tmp_path / "report")])
    text = out.with_suffix(".md").read_text()
    assert "`bench a`" in text and "`bench b`" in text and "autotuning off" in text
    assert "cells measured: eager **32 of 32**, compiled **32 of 32**" in text
    assert "FlexAttention (sparse only): eager **24 of 32**, compiled **32 of 32**" in text
    assert "faster than cuDNN dense: eager **2 of 2**, compiled **2 of 2**" in text
    assert "FlexAttention, which both full-layer rows are compared with, is compiled too" in text
    eager, compiled = text.split("## Full layer, eager")[1].split("## Full layer, compiled")
    assert "| 8192 | 24 | 64 | 1.50x ✗ | 1.50x ✗ | 1.50x ✗ | 1.50x ✗ |" in eager
    assert "| 16384 | 12 | 128 | 1.20x ✓ | 1.20x ✓ | 1.20x ✓ | 1.20x ✓ |" in eager
    assert "| 8192 | 24 | 64 | 1.10x ✓ | 1.10x ✓ | 1.10x ✓ | 1.10x ✓ |" in compiled
    assert "| 32768 | 12 | 128 | 95 % | 1.900 -> 0.400 | 7.500 -> 1.200 | -84.0 % | 2.900 -> 1.000 |" in eager
    assert "(no cell in common with the earlier file)" in compiled  # the old file has no compiled row
    assert "95 % faster" in text and "5.0 % / 5.0 %" in eager and "5.0 % / 5.0 %" in compiled
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["evaluation"][sweep.FULL]["summary"]["flex_met"] == 24 and len(saved["runs"]) == 2
    assert saved["evaluation"][sweep.COMPILED]["summary"]["flex_met"] == 32


# --- bench_attention.py --plan on the CPU -----------------------------------------------------------------------

def test_bench_plan_runs_without_a_gpu_and_skips_appended_cells(tmp_path):
    prior = tmp_path / "prior.json"
    sweep.write_payload(prior, dict(device="H200", rows=[_dense(8192, 64), *_cell_rows(8192, 64, 0.8)]))
    run = subprocess.run([sys.executable, "benchmarks/bench_attention.py", "--sweep", "--plan", "--cells",
                          "L=8192", "D=64", "--append", str(prior), "--json", str(tmp_path / "out.json")],
                         cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "SLA_DIST_AUTOTUNE": "0", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert "4 cells selected, 1 already in" in run.stdout and "autotune off" in run.stdout
    table = [line.split() for line in run.stdout.splitlines() if line.strip().startswith("8192")]
    assert [float(t[3]) for t in table] == [0.9, 0.95, 0.97]
    # dense and the first calls of the shape fall on the first cell left; every cell compiles the compiled layer
    assert float(table[0][4]) - float(table[1][4]) > sweep.FLEX_COMPILE_S + 2 * sweep.SLA_COMPILE_S
    assert float(table[1][4]) > sweep.COMPILED_GRAPHS_PER_CELL * sweep.COMPILED_GRAPH_S
    assert not (tmp_path / "out.json").exists()
    assert math.isfinite(float(re.search(r"process start: (\d+) s", run.stdout).group(1)))


def test_sweep_loop_stops_at_its_budget_and_append_finishes_the_grid(tmp_path, monkeypatch):
    """bench_attention.run_sweep with the GPU measurement faked: the JSON after every cell, the budget's stop, and a
    second run with --append that measures only what is left, reusing the dense row."""
    import argparse

    import bench_attention as ba
    import torch

    calls, clock = [], [0.0]
    cells = ["L=8192", "D=64"]
    plan = sweep.CostModel(autotune=False, profile_glue=False).plan(sweep.sweep_cells(cells))

    def fake_cell(cell, with_dense, profile_glue, graphs):  # takes as long as estimated
        calls.append((cell.sparsity, with_dense))
        clock[0] += dict(plan)[cell]
        rows = [ba.Row(**r) for r in _cell_rows(cell.L, cell.D, cell.sparsity)]
        return ([ba.Row(**_dense(cell.L, cell.D))] if with_dense else []) + rows

    monkeypatch.setattr(ba, "sweep_cell", fake_cell)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    out = tmp_path / "sweep.json"
    args = argparse.Namespace(cells=cells, append=None, budget=plan[0][1] + plan[1][1] + 0.5 * plan[2][1],
                              profile_glue=False, graphs=False, plan=False, json=str(out))
    monkeypatch.setattr(ba, "_elapsed", lambda: clock[0])
    rows = ba.run_sweep(args, autotune=False)
    payload = sweep.load_payload(out)
    assert calls == [(0.8, True), (0.9, False)]
    assert len(rows) == 1 + 2 * 4 and [c["sparsity"] for c in payload["cells"]] == [0.8, 0.9]
    assert [c["sparsity"] for c in payload["skipped"]] == [0.95, 0.97] and payload["autotune"] is False
    assert payload["device"] == "NVIDIA H200"

    calls.clear()
    args.append, args.budget = str(out), 0.0
    rows = ba.run_sweep(args, autotune=False)
    assert calls == [(0.95, False), (0.97, False)]  # the dense row of the first run serves them
    merged = sweep.load_payload(out)
    assert len(merged["runs"]) == 2 and len(merged["rows"]) == len(rows) == 1 + 4 * 4
    assert sweep.done_cells(merged["rows"]) == set(sweep.sweep_cells(cells))


def test_a_slow_compile_makes_the_budget_stop_before_the_next_compiling_cell(tmp_path, monkeypatch):
    """The compile times are estimates: when the cells take 3x theirs (every cell compiles the compiled layer), the
    cells after the first are predicted 3x too, and the run stops before one whose 3x would pass the budget, where
    the plain estimate would have started it."""
    import argparse

    import bench_attention as ba
    import torch

    cells = ["L=8192"]
    plan = dict(sweep.CostModel(profile_glue=False).plan(sweep.sweep_cells(cells)))
    assert all(s > sweep.COMPILING_CELL_S for s in plan.values())
    clock, calls = [0.0], []

    def fake_cell(cell, with_dense, profile_glue, graphs):
        calls.append(cell)
        clock[0] += 3 * plan[cell]
        return [ba.Row(**r) for r in _cell_rows(cell.L, cell.D, cell.sparsity)]

    monkeypatch.setattr(ba, "sweep_cell", fake_cell)
    monkeypatch.setattr(ba, "_elapsed", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    budget = 2 * sum(plan.values())  # the estimates fit twice, 3x their time does not
    args = argparse.Namespace(cells=cells, append=None, budget=budget, profile_glue=False, graphs=False, plan=False,
                              json=str(tmp_path / "s.json"))
    ba.run_sweep(args, autotune=False)
    payload = sweep.load_payload(tmp_path / "s.json")
    skipped = sweep.Cell(**payload["skipped"][0])
    assert len(calls) + len(payload["skipped"]) == 8 and clock[0] <= budget
    assert clock[0] + plan[skipped] <= budget < clock[0] + 3 * plan[skipped]
