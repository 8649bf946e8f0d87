"""bench_attention.py --sweep --graphs: FlexAttention and the full layer captured in CUDA graphs per cell. On the CPU:
the option, the rows' JSON rules (their memory note is no error, --append re-measures cells without them, a merge
keeps them), the cost model, the timing path with the capture faked, and the report's third mode ("graphed"). The
capture itself runs on a GPU only (the last test)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.test_attention_sweep import _cell_rows, _dense, _grid_rows, _row
from tests.utils import HAS_CUDA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import attention_report as ar  # noqa: E402
import attention_sweep as sweep  # noqa: E402
import bench_attention as ba  # noqa: E402


def _graph_rows(L, D, s, flex=1.0, full=1.2, note=""):
    """A cell's graphed rows; ``note``: the graphed FlexAttention row's error."""
    return [_row(L, D, s, sweep.FLEX_GRAPH, flex, mib=math.nan, note=note or sweep.GRAPH_MEMORY_NOTE),
            _row(L, D, s, sweep.FULL_GRAPH, full, mib=math.nan, note=sweep.GRAPH_MEMORY_NOTE)]


# --- the JSON and the cost model ---------------------------------------------------------------------------------

def test_the_memory_note_is_no_error_but_a_failure_still_is():
    failed, ok = _graph_rows(8192, 64, 0.8, note="RuntimeError: operation not permitted when stream is capturing")
    assert sweep.measured(ok) and sweep.error_note(ok) == "" and not sweep.measured(failed)
    rows = [_dense(8192, 64), *_cell_rows(8192, 64, 0.8), *_graph_rows(8192, 64, 0.8), *_cell_rows(8192, 64, 0.9),
            *_graph_rows(8192, 64, 0.9, note="RuntimeError: x"), *_cell_rows(8192, 64, 0.95)]
    assert sweep.done_cells(rows) == {sweep.Cell(8192, 64, s) for s in (0.8, 0.9, 0.95)}
    # --append --graphs measures again what lacks a graphed row or has a failed one
    assert sweep.done_cells(rows, sweep.cell_methods(graphs=True)) == {sweep.Cell(8192, 64, 0.8)}


def test_merge_prefers_a_cell_with_its_graphed_rows():
    without = dict(command="a", rows=[_dense(8192, 64), *_cell_rows(8192, 64, 0.8, full=5.0),
                                      *_cell_rows(8192, 64, 0.9, full=5.0)])
    graphed = dict(command="b", rows=[*_cell_rows(8192, 64, 0.8, full=1.0), *_graph_rows(8192, 64, 0.8),
                                      *_cell_rows(8192, 64, 0.9, full=1.0), *_graph_rows(8192, 64, 0.9, note="E: x")])
    for order in ([without, graphed], [graphed, without]):
        merged = sweep.merge_payloads(order)
        full = {r["sparsity"]: r["fwd_bwd_ms"] for r in merged["rows"] if r["method"] == sweep.FULL}
        # 80 %: the run with the graphed rows, whichever came first; 90 %: the complete run without them
        assert full == {0.8: 1.0, 0.9: 5.0}, order
        assert [r["sparsity"] for r in merged["rows"] if r["method"] == sweep.FULL_GRAPH] == [0.8]


def test_cost_model_adds_the_graphed_rows_and_their_captures():
    cells = sweep.sweep_cells(["L=8192", "D=128"])
    plain = dict(sweep.CostModel(profile_glue=True).plan(cells))
    graphed = dict(sweep.CostModel(profile_glue=True, graphs=True).plan(cells))
    for cell in cells:
        rows = sum(sweep.measure_seconds(m, cell.L, cell.D, cell.sparsity) for m in sweep.GRAPH_METHODS)
        assert graphed[cell] - plain[cell] == pytest.approx(rows + 4 * sweep.GRAPH_CAPTURE_S, abs=0.05)
    # captured, the layer runs at its CUDA time (0.98 ms fwd+bwd at 8192, 2026-11-30), below the compiled call's floor
    assert sweep.method_ms(sweep.FULL_GRAPH, 8192, 128, 0.95)[1] < sweep.method_ms(sweep.COMPILED, 8192, 128, 0.95)[1]


# --- bench_attention.py ------------------------------------------------------------------------------------------

def test_graphs_goes_with_sweep(capsys):
    with pytest.raises(SystemExit):
        ba.main(["--graphs"])
    assert "--graphs and --plan go with --sweep" in capsys.readouterr().err


def test_plan_counts_the_graphed_rows(capsys, monkeypatch):
    monkeypatch.setenv("SLA_DIST_AUTOTUNE", "0")
    totals = []
    for extra in ([], ["--graphs"]):
        ba.main(["--sweep", "--plan", "--cells", "L=8192", "D=64", *extra])
        out = capsys.readouterr().out
        totals.append(float(out.split("process start: ")[1].split(" s")[0]))
    model = sweep.CostModel(profile_glue=False, graphs=True)
    assert totals[1] - totals[0] == pytest.approx(sum(s for _, s in model.plan(sweep.sweep_cells(["L=8192", "D=64"])))
                                                  - sum(s for _, s in sweep.CostModel(profile_glue=False).plan(
                                                      sweep.sweep_cells(["L=8192", "D=64"]))), abs=1.0)


def test_sweep_with_graphs_measures_again_the_cells_without_them(tmp_path, monkeypatch):
    """run_sweep with the GPU faked: --graphs reaches every cell, and an --append --graphs run over a sweep without
    the graphed rows measures its cells again and keeps the new rows."""
    calls = []

    def fake_cell(cell, with_dense, profile_glue, graphs):
        calls.append((cell.sparsity, graphs))
        rows = _cell_rows(cell.L, cell.D, cell.sparsity) + (_graph_rows(cell.L, cell.D, cell.sparsity) if graphs
                                                             else [])
        return [ba.Row(**r) for r in ([_dense(cell.L, cell.D)] if with_dense else []) + rows]

    monkeypatch.setattr(ba, "sweep_cell", fake_cell)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    out = tmp_path / "sweep.json"
    args = argparse.Namespace(cells=["L=8192", "D=64", "sparsity=80,90"], append=None, budget=0.0,
                              profile_glue=False, graphs=False, plan=False, json=str(out))
    ba.run_sweep(args, autotune=False)
    assert calls == [(0.8, False), (0.9, False)] and sweep.load_payload(out)["graphs"] is False
    calls.clear()
    args.append, args.graphs = str(out), True
    rows = ba.run_sweep(args, autotune=False)
    assert calls == [(0.8, True), (0.9, True)]
    assert sum(r["method"] == sweep.FULL_GRAPH for r in rows) == 2
    assert sweep.done_cells(rows, sweep.cell_methods(graphs=True)) == {sweep.Cell(8192, 64, s) for s in (0.8, 0.9)}


def test_a_graphed_row_times_the_replays_of_the_same_steps(monkeypatch):
    """_measure(graph=True) with the capture faked (CPU): the forward is captured without grad, the forward+backward
    step writes its gradients, the timer gets the replays with nothing to reset, the first calls are the captures',
    and no memory is measured."""
    captured, benched = [], []

    def fake_capture(step, grads):
        step()
        captured.append((torch.is_grad_enabled(), [t.grad is not None for t in grads or ()]))
        return 7.0 + len(captured), lambda: f"replay {len(benched)}"

    monkeypatch.setattr(ba, "_captured", fake_capture)
    monkeypatch.setattr(ba, "_first_call", lambda fn: (0.0, 1.0))
    monkeypatch.setattr(ba, "_bench", lambda fn, grads, est: benched.append((fn(), grads)) or (0.5, 200))
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    row = ba._measure(ba.Row(16, 2, 8, 0.9, sweep.FULL_GRAPH), lambda q, k, v: q * k + v, q, k, v, 8.0, graph=True)
    assert captured == [(False, []), (True, [True, True, True])]
    assert benched == [("replay 0", None), ("replay 1", None)]
    assert (row.first_fwd_s, row.first_fwd_bwd_s, row.fwd_ms, row.fwd_bwd_ms) == (8.0, 9.0, 0.5, 0.5)
    assert row.note == sweep.GRAPH_MEMORY_NOTE and math.isnan(row.extra_mib) and sweep.measured(vars(row))


# --- the report --------------------------------------------------------------------------------------------------

def _graphed_grid(full_of=lambda c: 1.2, flex_of=lambda c: 0.5 if c.L == 8192 else 1.0) -> list[dict]:
    rows = _grid_rows()
    for cell in sweep.sweep_cells():
        rows += _graph_rows(cell.L, cell.D, cell.sparsity, flex=flex_of(cell), full=full_of(cell))
    return rows


def test_graphed_mode_is_judged_against_the_graphed_flex_and_dense():
    # graphed FlexAttention 0.5 ms at 8192 (the eager one 1.0), 1.0 elsewhere; graphed layer 1.2 ms, 2.5 ms at one
    # counted dense cell (dense 2.0 ms)
    rows = _graphed_grid(lambda c: 2.5 if (c.L, c.D, c.sparsity) == (8192, 64, 0.95) else 1.2)
    text, evaluation = ar.report(dict(rows=rows, device="NVIDIA H200", command="x"))
    assert "FlexAttention (sparse only): eager **32 of 32**, compiled **32 of 32**, graphed **24 of 32**" in text
    assert "faster than cuDNN dense: eager **2 of 2**, compiled **2 of 2**, graphed **1 of 2**" in text
    assert "cells measured: eager **32 of 32**, compiled **32 of 32**, graphed **32 of 32**" in text
    assert "of the profiled cells: eager: not measured, compiled: not measured, graphed: not measured" in text
    assert "dense cuDNN's: eager **32 of 32**, compiled **32 of 32**, graphed: not measured" in text
    assert "every target met: eager **no**, compiled **no**, graphed **no**" in text
    assert "- graphed: the eager full layer's module and FlexAttention's compiled function" in text
    section = text.split("## Full layer, graphed (`SLA full layer, BQ128, CUDA graph`)")[1]
    assert f"FlexAttention: `{sweep.FLEX_GRAPH}`." in section
    assert "| 8192 | 24 | 64 | 2.40x ✗ | 2.40x ✗ | 5.00x ✗ | 2.40x ✗ |" in section
    assert "| 8192 | 24 | 64 | 80 % | 2.000 | 0.500 | 1.100 | 0.400 | 1.200 | 2.40 | 1.67 |" in section
    assert sweep.GRAPH_MEMORY_NOTE not in text  # no error: not in the note column
    assert evaluation[sweep.FULL_GRAPH]["summary"]["flex_met"] == 24
    # the eager and compiled modes read as without the graphed rows
    plain = ar.report(dict(rows=_grid_rows(), device="NVIDIA H200", command="x"))[1]
    for m in (sweep.FULL, sweep.COMPILED):
        assert evaluation[m] == plain[m]


def test_a_failed_graphed_row_is_noted_in_its_mode_only():
    rows = _graphed_grid()
    flex = next(r for r in rows if r["method"] == sweep.FLEX_GRAPH)
    flex["note"] = "RuntimeError: operation not permitted when stream is capturing"
    eager, graphed = (ar.evaluate(rows, layer=m)[0] for m in (sweep.FULL, sweep.FULL_GRAPH))
    assert eager.note == "" and eager.measured
    assert not graphed.measured and graphed.note == f"{sweep.FLEX_GRAPH}: {flex['note']}"


# --- the capture (GPU) -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_captured_step_replays_the_eager_gradients_on_new_inputs():
    """ba._captured on the full layer's forward+backward step: a replay writes the eager gradients into the leaves,
    and after new values are copied into the static inputs, those of the new values."""
    from sla_dist import SparseLinearAttention

    torch.manual_seed(0)
    layer = SparseLinearAttention(64, topk=0.1, BLKQ=128).cuda()
    torch.nn.init.normal_(layer.proj_l.weight, std=0.1)
    sets = [[torch.randn(1, 2, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4)] for _ in range(2)]

    def eager(q, k, v, g):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(layer(*leaves), leaves, g)

    want = [eager(*s) for s in sets]
    leaves = [t.clone().requires_grad_() for t in sets[0][:3]]
    g = sets[0][3].clone()
    _, replay = ba._captured(lambda: layer(*leaves).backward(g), leaves)
    for i in (1, 0):
        with torch.no_grad():
            for buffer, value in zip((*leaves, g), sets[i]):
                buffer.copy_(value)
        replay()
        torch.cuda.synchronize()
        for leaf, w in zip(leaves, want[i]):
            err = float((leaf.grad.double() - w.double()).norm() / w.double().norm())
            assert err < 1e-2, (i, err)
    assert float((want[0][0] - want[1][0]).double().norm() / want[1][0].double().norm()) > 0.5
