"""benchmarks/quality/merge_runs.py: quality-study runs from separate device calls merged into one study (variants
taken once, the verdict over all of them) and refused when they are not one study; the levers' table."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import merge_runs  # noqa: E402

CONFIG = {key: 1 for key in merge_runs.SHARED_CONFIG}


def _variant(kind: str, final: float) -> dict:
    return {"variant": kind, "val_curve": [[0, 0.05], [400, final]], "fvd_random": 0.5, "s_per_step": 0.2}


def _run(dense_seed: int, dense_final: float, **variants: dict) -> dict:
    return {"status": "complete", "command": f"run seed {dense_seed}", "pretrain": {"steps": 1600},
            "attention_before": {}, "model": {}, "parameters": 1, "tokens_per_clip": 9216, "key_blocks": 144,
            "config": {**CONFIG, "dense_seeds": [dense_seed], "baselines": sorted(variants)},
            "timings": {"total_s": 100.0},
            "variants": {f"dense_seed{dense_seed}": _variant("dense", dense_final),
                         "sla": _variant("sla", 0.044), **variants}}


def test_merge_takes_each_variant_once_and_judges_all():
    a = _run(0, 0.0404, sparse_only=_variant("sparse_only", 0.0444))
    b = _run(1, 0.0396, linear_only=_variant("linear_only", 0.125))
    merged = merge_runs.merge([a, b])
    assert list(merged["variants"]) == ["dense_seed0", "dense_seed1", "sla", "sparse_only", "linear_only"]
    assert merged["config"]["dense_seeds"] == [0, 1]
    assert merged["timings"]["total_s"] == 200.0
    v = merged["verdict"]
    assert v["dense_loss"] == pytest.approx(0.04) and v["dense_loss_spread"] == pytest.approx(0.0008)
    assert v["sla_loss_gap"] == pytest.approx(0.1) and v["loss_within_1pct"] is False
    assert v["sparse_only_worse"] is False and v["linear_only_worse"] is True  # 0.0004 vs 0.081 above SLA


@pytest.mark.parametrize("change, match", [
    (lambda r: r["config"].update(sparsity=0.9), "config sparsity=0.9"),
    (lambda r: r.update(pretrain={"steps": 800}), "pretrain differs"),
    (lambda r: r.update(status="partial"), "status 'partial'"),
    (lambda r: r["variants"]["sla"]["val_curve"].__setitem__(-1, [400, 0.045]), "variant 'sla' of run 1"),
])
def test_merge_refuses_runs_that_are_not_one_study(change, match):
    a, b = _run(0, 0.0404), _run(1, 0.0396)
    change(b)
    with pytest.raises(ValueError, match=match):
        merge_runs.merge([a, b])


def test_levers_compare_with_the_study_and_their_own_dense():
    study = merge_runs.merge([_run(0, 0.0404), _run(1, 0.0396)])
    longer = _run(0, 0.038)
    longer["config"]["finetune_steps"] = 800
    rows = merge_runs.lever_rows(study, [longer], ["longer.json"])
    sla = next(r for r in rows if r["variant"] == "sla")
    assert sla["changed"] == {"finetune_steps": 800}
    assert sla["vs_dense"] == pytest.approx(0.1) and sla["vs_own_dense"] == pytest.approx(0.044 / 0.038 - 1)
    assert "finetune_steps=800" in merge_runs.lever_table(rows, 0.04)
    other = copy.deepcopy(longer)
    other["pretrain"] = {"steps": 1}
    with pytest.raises(ValueError, match="other pretrained weights"):
        merge_runs.lever_rows(study, [other], ["other.json"])


def _at_sparsity(sparsity: float, sla: float, sparse_only: float, dense_seed: int = 0) -> dict:
    run = _run(dense_seed, 0.04, sparse_only=_variant("sparse_only", sparse_only))
    run["variants"]["sla"] = _variant("sla", sla)
    run["config"]["sparsity"] = sparsity
    run["attention_before"] = {"sla": {"error": [0.2, 0.4], "sparsity": [sparsity + 0.004] * 2}}
    return run


def test_sparsity_series_takes_the_runs_that_changed_only_the_sparsity_and_extrapolates_to_the_goal():
    study = merge_runs.merge([_at_sparsity(0.95, 0.044, 0.044), _at_sparsity(0.95, 0.044, 0.044, dense_seed=1)])
    longer = _at_sparsity(0.95, 0.042, 0.042)
    longer["config"]["finetune_steps"] = 800
    levers = [_at_sparsity(0.85, 0.0408, 0.0407), longer, _at_sparsity(0.9, 0.0412, 0.0412)]
    series = merge_runs.sparsity_series(study, levers, ["s85", "longer", "s90"])
    assert [r["run"] for r in series] == ["this study", "s90", "s85"]  # most sparse first; the 800-step run is out
    assert series[0]["sla_gap"] == pytest.approx(0.1) and series[0]["realised"] == pytest.approx(0.954)
    assert series[2]["sla_gap"] == pytest.approx(0.02) and series[2]["sparse_only_gap"] == pytest.approx(0.0175)
    assert series[2]["sla_minus_sparse_only"] == pytest.approx(0.0001)
    assert series[2]["error_before"] == pytest.approx(0.3)
    # no point within 1 %: a line through (0.854, +2 %) and (0.904, +3 %) reaches +1 % at 0.804
    goal = merge_runs.goal_sparsity(series)
    assert goal["method"] == "extrapolation" and goal["realised"] == pytest.approx(0.804)
    assert sum(goal["points"], []) == pytest.approx([0.854, 0.02, 0.904, 0.03])
    text = merge_runs.series_table(series, dense_spread=0.0008)
    assert "| 0.85 / 85.40% | `s85` | +2.00% | +1.75% | +0.00010 | 0.300 |" in text
    assert "by at most 0.00010 at any sparsity (dense seed spread 0.00080): not separated." in text
    assert "80.4%" in text and "an extrapolation, not a measured run" in text and "measured bracket" not in text


def test_goal_sparsity_interpolates_inside_a_measured_bracket():
    """A point within 1 % and a sparser one above it: the crossing lies between them, interpolated, not extrapolated
    from the two least sparse points (which would start inside the goal)."""
    study = merge_runs.merge([_at_sparsity(0.95, 0.044, 0.044), _at_sparsity(0.95, 0.044, 0.044, dense_seed=1)])
    levers = [_at_sparsity(0.85, 0.0408, 0.0408), _at_sparsity(0.8, 0.0402, 0.0402), _at_sparsity(0.9, 0.0412, 0.0412)]
    series = merge_runs.sparsity_series(study, levers, ["s85", "s80", "s90"])
    goal = merge_runs.goal_sparsity(series)
    # (0.804, +0.5 %) within the goal, (0.854, +2 %) above it: +1 % a third of the way, at 0.804 + 0.05 / 3
    assert goal["method"] == "measured bracket" and goal["realised"] == pytest.approx(0.804 + 0.05 / 3)
    assert sum(goal["points"], []) == pytest.approx([0.804, 0.005, 0.854, 0.02])
    text = merge_runs.series_table(series, dense_spread=0.0008)
    assert "between two measured points, 80.40% (+0.50%) and 85.40% (+2.00%): a measured bracket" in text
    assert "82.1% realised block sparsity, interpolated" in text and "extrapolation" not in text


@pytest.mark.parametrize("study_sla, s85, s90", [
    (0.044, 0.0412, 0.0412), (0.044, 0.0416, 0.0408),  # none within 1 %, a gap flat or rising towards lower sparsity
    (0.0403, 0.0401, 0.0402),  # every point within 1 %: no crossing to bracket nor to extrapolate to
])
def test_goal_sparsity_is_none_when_there_is_nothing_to_bracket_or_extrapolate(study_sla, s85, s90):
    study = merge_runs.merge([_at_sparsity(0.95, study_sla, study_sla),
                              _at_sparsity(0.95, study_sla, study_sla, dense_seed=1)])
    levers = [_at_sparsity(0.85, s85, s85), _at_sparsity(0.9, s90, s90)]
    assert merge_runs.goal_sparsity(merge_runs.sparsity_series(study, levers, ["s85", "s90"])) is None


def test_cli_merges_the_textured_study(tmp_path):
    """The two 2026-11-30 textured-scene runs (dense seed 0 + SLA + sparse-only; dense seed 1 + SLA + linear-only)
    with the textured 800-step and 90 / 85 / 80 % sparsity runs as levers."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    runs = [results / f"2026-11-30-quality-study-h200-textured{suffix}.json" for suffix in ("", "-seed1")]
    levers = [results / f"2026-11-30-quality-study-h200-textured-{suffix}.json"
              for suffix in ("800steps", "sparsity90", "sparsity85", "sparsity80")]
    assert merge_runs.main([*map(str, runs), "--out", str(tmp_path / "study"), "--levers", *map(str, levers)]) == 0
    written = json.loads((tmp_path / "study.json").read_text())
    assert list(written["variants"]) == ["dense_seed0", "dense_seed1", "sla", "sparse_only", "linear_only"]
    assert written["verdict"]["sla_loss_gap"] == pytest.approx(0.1076, abs=5e-4)
    assert [r["changed"] for r in written["levers"] if r["variant"] == "sla"] == [
        {"finetune_steps": 800}, {"sparsity": 0.9}, {"sparsity": 0.85}, {"sparsity": 0.8}]
    # 95 %: +10.8 % over the dense seeds' mean; 90, 85 and 80 %: against the run's own dense seed 0
    series = written["sparsity_series"]
    assert [r["sparsity"] for r in series] == [0.95, 0.9, 0.85, 0.8]
    assert [r["sla_gap"] for r in series] == pytest.approx([0.1076, 0.0302, 0.0154, 0.0097], abs=5e-4)
    assert [r["sparse_only_gap"] for r in series] == pytest.approx([0.1074, 0.0303, 0.0151, 0.0096], abs=5e-4)
    # 80 % (80.56 % realised, +0.97 %) within the goal, 85 % (85.42 %, +1.54 %) not: a measured bracket
    goal = written["goal_sparsity"]
    assert goal["method"] == "measured bracket" and goal["realised"] == pytest.approx(0.808, abs=1e-3)
    assert sum(goal["points"], []) == pytest.approx([0.8056, 0.0097, 0.8542, 0.0154], abs=5e-4)
    text = (tmp_path / "study.md").read_text()
    assert "Merged from" in text and "sparsity=0.9" in text and "not separated" in text
    assert "80.56% (+0.97%) and 85.42% (+1.54%): a measured bracket" in text and "80.8%" in text


def test_cli_refuses_the_plain_scene_80_percent_run_as_a_textured_lever(tmp_path):
    """2026-11-30-quality-study-h200-sparsity80 fine-tunes the older plain-scene pretrain: not comparable with the
    textured study, so it must not slip into its sparsity series under a similar name."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    runs = [results / f"2026-11-30-quality-study-h200-textured{suffix}.json" for suffix in ("", "-seed1")]
    plain = results / "2026-11-30-quality-study-h200-sparsity80.json"
    with pytest.raises(ValueError, match="2026-11-30-quality-study-h200-sparsity80.json starts from other pretrained"):
        merge_runs.main([*map(str, runs), "--out", str(tmp_path / "study"), "--levers", str(plain)])
