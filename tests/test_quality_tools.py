"""The quality study's analysis tools on a tiny pretrained checkpoint: attention_mass.py (kept softmax mass and the
least-squares proj_l's error per layer), conversion_loss.py (validation loss right after conversion) and
linear_branch.py (what the linear branch holds and how much of it a proj_l reaches)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import attention_mass  # noqa: E402
import conversion_loss  # noqa: E402
import linear_branch  # noqa: E402
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


def test_linear_branch(checkpoint, tmp_path):
    out = tmp_path / "branch.json"
    linear_branch.main(["--resume-from", str(checkpoint), "--topk", "0.25", "--clips", "2", "--layers", "0",
                        "--reach", "0", "1e9", "--adam-lr", "1e-2", "--adam-steps", "20", "--json", str(out)])
    (layer,) = json.loads(out.read_text())["layers"]
    assert layer["layer"] == 0 and 0 < layer["spread"] <= 1 and 1 <= layer["effective_rank"] <= 32
    # the least-squares W, b beat W = 0 with the best b, which beats proj_l = 0 (b = 0 is a candidate)
    assert layer["best_error"] <= layer["bias_error"] + 1e-9 <= layer["sparse_error"] + 2e-9
    # a norm bound of 0 leaves the bias fit; no bound reaches the least-squares W (the smallest ridge)
    assert layer["error_reach_0"] == pytest.approx(layer["bias_error"])
    assert layer["error_reach_1e+09"] == pytest.approx(layer["best_error"], rel=1e-6)
    assert layer["error_adam_0.01x20"] < layer["sparse_error"] and layer["weight_norm_adam_0.01x20"] > 0
    assert layer["held_out_sparse_error"] > 0 and layer["held_out_error_best_ridge"] <= layer["held_out_error_of_fit"]
    assert layer["held_out_error_adam_0.01x20"] > 0


def test_branch_stats_on_known_rows():
    """A residual O - O_s that is exactly O_l W^T + b: the least-squares fit recovers it (error 0, ||W*|| = ||W||);
    a constant O_l has no spread and leaves the bias fit as the best."""
    g = torch.Generator().manual_seed(0)
    o_s, o_l = torch.randn(2, 500, 8, generator=g)
    weight, bias = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
    stats = linear_branch.BranchStats(8)
    stats.add_head(o_s, o_l, o_s + o_l @ weight.T + bias, clip=0)
    summary = stats.summary([])
    assert summary["best_error"] < 1e-6 and summary["best_weight_norm"] == pytest.approx(float(weight.norm()), rel=1e-4)
    flat = linear_branch.BranchStats(8)
    flat.add_head(o_s, o_l[:1].expand(500, 8), o_s + o_l @ weight.T, clip=0)
    summary = flat.summary([])
    assert summary["spread"] < 1e-6 and summary["best_error"] == pytest.approx(summary["bias_error"], rel=1e-4)


def test_linear_variants_change_only_o_l():
    """The screens act on O_l alone: a phi scale of 1 is the default branch, another scale changes O_l but not O_s or
    the reference, and centring leaves O_l with zero mean over the queries and the same query-dependent part."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 1, 1, 500, 16, generator=g)
    sla = linear_branch.SLAConfig(block_q=64, block_k=64)
    base = linear_branch.head_branches(q, k, v, sla, 0.25)
    same = linear_branch.head_branches(q, k, v, sla, 0.25, linear_branch.LinearVariant(phi_scale=1.0))
    sharp = linear_branch.head_branches(q, k, v, sla, 0.25, linear_branch.LinearVariant(phi_scale=4.0))
    centred = linear_branch.head_branches(q, k, v, sla, 0.25, linear_branch.LinearVariant(center=True))
    assert all(torch.equal(a, b) for a, b in zip(base, same))
    assert torch.equal(sharp[0], base[0]) and torch.equal(sharp[2], base[2])
    assert (sharp[1] - base[1]).norm() > 0.05 * base[1].norm()
    assert centred[1].mean(dim=0).abs().max() < 1e-6
    torch.testing.assert_close(centred[1], base[1] - base[1].mean(dim=0, keepdim=True))
