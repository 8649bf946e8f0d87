"""The quality study's analysis tools on a tiny pretrained checkpoint: attention_mass.py (kept softmax mass and the
least-squares proj_l's error per layer) and conversion_loss.py (validation loss right after conversion)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import attention_mass  # noqa: E402
import conversion_loss  # noqa: E402
import quality_study as qs  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    assert qs.main(["--preset", "tiny", "--cpu", "--phase", "pretrain", "--pretrain-steps", "2", "--out", str(out)]) == 0
    return out


def test_attention_mass(checkpoint, tmp_path):
    out = tmp_path / "mass.json"
    attention_mass.main(["--resume-from", str(checkpoint), "--topk", "0.25", "1.0", "--clips", "2", "--json", str(out)])
    layers = json.loads(out.read_text())["layers"]
    assert len(layers) == qs.dit_config("tiny").num_layers
    for layer in layers:
        part, whole = layer["0.25"], layer["1.0"]
        assert 0 < part["kept_mass"] <= part["oracle_mass"] + 1e-9 <= 1 + 1e-9  # the oracle keeps the most mass
        assert part["best_sla_error"] <= part["sparse_error"] + 1e-9  # W = 0 is one of the candidates
        # every block kept: all the mass, and the sparse branch is full attention (float32 rounding only)
        assert whole["kept_mass"] == pytest.approx(1.0, abs=1e-5) and whole["sparse_error"] < 1e-5


def test_conversion_loss(checkpoint, tmp_path):
    out = tmp_path / "conversion.json"
    conversion_loss.main(["--resume-from", str(checkpoint), "--val-clips", "2", "--draws", "2", "--calibrate-clips",
                          "2", "--sequential", "--cpu", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["val_clips"] == 2 and r["draws"] == 2 and r["sparsity"] == qs.PRESETS["tiny"].sparsity
    assert min(r["dense"], r["sparse_only"], r["sla_calibrated"], r["sla_calibrated_sequential"]) > 0
    for report in (r["calibration"], r["calibration_sequential"]):
        assert report["calibrated_error"] < report["sparse_error"]
    # both start from the same sparse model: the first layer's fit and the proj_l = 0 errors are the same
    first = [next(iter(report["layers"].values())) for report in (r["calibration"], r["calibration_sequential"])]
    assert first[0]["calibrated_error"] == pytest.approx(first[1]["calibrated_error"], rel=1e-6)
    assert r["calibration"]["sparse_error"] != pytest.approx(r["calibration_sequential"]["sparse_error"], rel=1e-6)
