"""benchmarks/scaling_four_gpu.py: the model's 4-GPU points, checked against the parts' files when they exist."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import scaling_four_gpu as four  # noqa: E402
import scaling_model as sm  # noqa: E402


@pytest.fixture(scope="module")
def cal() -> sm.Calibration:
    return sm.calibrate()


def _ulysses_row(P: int, heads: int, layout: str, fwd: float, fwd_bwd: float, chunks: int = 1, **extra) -> dict:
    return dict(mode="ulysses", exchange="fused" if P > 1 else "-", locality="iid", layout=layout, P=P, heads=heads,
                head_dim=128, seq_len=131072, overlap_chunks=chunks, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, **extra)


def _write(results: Path, name: str, meta: dict, rows: list[dict]) -> None:
    results.mkdir(exist_ok=True)
    (results / name).write_text(json.dumps(dict(meta=meta, results=rows)))


def _e2e_meta(overrides: list[str]) -> dict:
    return dict(card="NVIDIA H200", preset=dict(overrides=overrides), overrides=[], gpus=4)


def test_no_files_no_checks_but_every_point_predicted(cal, tmp_path):
    assert four.checks(cal, tmp_path) == []
    text = "\n".join(four.section(cal, tmp_path))
    assert "no file yet" in text
    for P, H in four.ULYSSES_POINTS:
        assert f"| {P} | {H} | " in text
    # the presets' depth (4 blocks) and, beside it, the full 14B
    sp4 = sm.predict(sm.Workload("wan2.1-14b", (21, 90, 160), layers=4), sm.Parallel(4, 1, 3), cal)
    assert f"| wan14b-sp4 | 4 | 4 x 1 | {sp4.step_s:.2f} | - |" in text
    full = sm.predict(sm.WAN14, sm.Parallel(2, 2, 3), cal)
    assert f"{full.step_s:.2f}, {full.memory_bytes / sm.GIB:.1f} / {full.used_bytes / sm.GIB:.1f} |" in text


def test_ulysses_file_becomes_checks_of_the_one_chunk_rows(cal, tmp_path):
    rows = [_ulysses_row(1, 12, "blhd", 21.6, 71.5), _ulysses_row(1, 24, "blhd", 41.7, 142.0),
            _ulysses_row(4, 12, "blhd", 6.9, 24.0, exchange_ms=4.0, efficiency=0.745),
            _ulysses_row(4, 24, "blhd", 12.8, 45.0, exchange_ms=7.0, efficiency=0.79),
            _ulysses_row(4, 24, "blhd", 12.0, 41.0, chunks=2, exchange_ms=7.5, efficiency=0.866)]
    _write(tmp_path, "2026-12-01-h200x4-ulysses4.json", {}, rows)
    _write(tmp_path, "2026-11-27-h200x4-ulysses4.json", {}, rows[:2])  # older: not read
    found = four.checks(cal, tmp_path)
    assert len(found) == 2 * 3 and all(c.role == "check" for c in found)  # exchange, fwd, fwd+bwd per P 4 row
    by_name = {c.name: c for c in found}
    layer = by_name["Ulysses layer fwd+bwd, fused, P 4, H 24, L 131072: P 1 layer / P + exchange "
                    "(2026-12-01-h200x4-ulysses4.md, blhd)"]
    exchange = cal.exchanges["fused"].pass_s(131072, 4, 24 * 128)
    assert layer.measured == 45.0 and layer.predicted == pytest.approx(142.0 / 4 + 2e3 * exchange)
    text = "\n".join(four.section(cal, tmp_path))
    assert "| 4 | 24 | " in text and "79 % (1), 87 % (2) |" in text and "2026-12-01-h200x4-ulysses4.json" in text


def test_training_files_become_step_and_memory_checks_at_their_depth(cal, tmp_path):
    phase = dict(name="sp4", procs=4, ok=True, step_s=1.1, peak_gib=[25.0, 26.5, 25.2, 25.1])
    _write(tmp_path, "2026-12-01-h200x4-wan14b-sp4.json", _e2e_meta(["model.num_layers=6"]),
           [phase, dict(name="resume", ok=True)])
    _write(tmp_path, "2026-12-01-h200x4-zero3-sp2dp2.json", _e2e_meta(["model.num_layers=4"]),
           [dict(name="sp2dp2", procs=4, ok=False, step_s=None, peak_gib=[])])  # failed: nothing to check
    found = four.checks(cal, tmp_path)
    p = sm.predict(sm.Workload("wan2.1-14b", (21, 90, 160), layers=6), sm.Parallel(4, 1, 3), cal)
    assert [(c.measured, c.predicted, c.unit) for c in found] == [(1.1, pytest.approx(p.step_s), "s"),
                                                                  (26.5, pytest.approx(p.used_bytes / sm.GIB), "GiB")]
    assert found[0].name.startswith("14B train step, 6 blocks, SP 4 x DP 1, ZeRO-3")


def test_depth_comes_from_the_runs_overrides():
    assert four.train_workload(None).layers == four.DEFAULT_LAYERS
    assert four.train_workload(dict(meta=_e2e_meta(["model.num_layers=4"]) | {"overrides": ["model.num_layers=8"]}
                                    )).layers == 8  # the command line's override comes after the preset's
    assert four.train_workload(dict(meta=_e2e_meta([]))).layers is None  # the recipe's full depth


def test_workload_depth_must_be_positive():
    with pytest.raises(ValueError, match="layers=0"):
        sm.Workload("wan2.1-14b", (21, 90, 160), layers=0)
