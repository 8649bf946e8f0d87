"""benchmarks/bench_sequence_parallel.py: the --locality inputs (context parallel fetches fewer key blocks on inputs
with video-like 3D locality than on i.i.d. ones) and the cost-model constants it fits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_sequence_parallel as bench  # noqa: E402
import scaling_model as sm  # noqa: E402
from locality_inputs import LocalityConfig, locality_qkv, smooth_field  # noqa: E402

from sla_dist.parallel.layout import SPCostModel  # noqa: E402


def test_local_inputs_fetch_fewer_key_blocks_than_iid():
    """Two gloo ranks run context parallel on a 4 x 16 x 32 token grid (32 key blocks, 8 query blocks per rank)."""
    inputs = LocalityConfig(grid=(4, 16, 32))
    config = bench.BenchConfig(seq_len=inputs.seq_len, heads=[2], head_dim=32, sizes=[2], modes=["context"],
                               topk=0.2, locality=["iid", "field", "dit"], inputs=inputs, warmup=0, iters=1,
                               cpu=True)
    rows = {r["locality"]: r for r in bench.run_world(config, 2)}
    assert set(rows) == {"iid", "field", "dit"}
    for local in ("field", "dit"):
        for key in ("fetched_block_fraction", "remote_block_fraction", "critical_block_fraction"):
            assert rows[local][key] < rows["iid"][key], (local, key, rows[local][key], rows["iid"][key])
    # i.i.d. inputs: 8 query blocks' random lists of 20 % critical + 10 % negligible cover nearly everything
    assert rows["iid"]["remote_block_fraction"] > 0.9
    assert rows["field"]["remote_block_fraction"] < 0.7


def test_smooth_field_is_correlated_over_its_length_only():
    gen = torch.Generator().manual_seed(0)
    field = smooth_field((8, 32, 32), 64, 8.0, gen, torch.device("cpu"))
    assert field.shape == (64, 8, 32, 32)
    corr = lambda a, b: float((a * b).mean())  # noqa: E731  (unit variance, zero mean per channel)
    near = corr(field[:, :, :, :-1], field[:, :, :, 1:])
    far = corr(field[:, :, :, :-16], field[:, :, :, 16:])
    assert near > 0.9 and abs(far) < 0.5


def test_inputs_are_tiled_and_reproducible():
    config = LocalityConfig(grid=(4, 8, 8))
    a = locality_qkv("field", config, 2, 32, torch.device("cpu"))
    b = locality_qkv("field", config, 2, 32, torch.device("cpu"))
    assert all(x.shape == (1, 2, 256, 32) and torch.equal(x, y) for x, y in zip(a, b))


def test_bad_locality_settings_are_named():
    with pytest.raises(ValueError, match="locality 'near'"):
        bench.BenchConfig(locality=["near"])
    with pytest.raises(ValueError, match=r"seq_len=1000 must equal the \(32, 64, 64\) grid's 131072"):
        bench.BenchConfig(seq_len=1000, locality=["field"])
    with pytest.raises(ValueError, match=r"grid=\(4, 0, 8\)"):
        LocalityConfig(grid=(4, 0, 8))
    with pytest.raises(ValueError, match="qk_init='shared'"):
        LocalityConfig(qk_init="shared")


def test_cost_model_defaults_are_the_fits_to_the_measurements():
    """SPCostModel's link constants are scaling_model's fit of DeepSpeed's exchange (whose 8 calls per layer the
    layout counts); pair_seconds is fit_context_cost on the measured 2026-11-27 context-parallel rows (i.i.d.
    inputs), which the model then reproduces within the scaling model's tolerance."""
    link = sm.calibrate().exchanges["deepspeed"]
    rows = json.loads((BENCHMARKS / "results" / "2026-11-27-h200x4-sequence-parallel.json").read_text())["results"]
    fitted = bench.fit_context_cost(rows, link.latency_s, link.bytes_per_s)
    default = SPCostModel()
    for name in ("latency_s", "bytes_per_s", "pair_seconds"):
        assert getattr(default, name) == pytest.approx(getattr(fitted, name), rel=1e-3), name
    bench.add_predictions(rows, default)
    context = [r for r in rows if r["mode"] == "context"]
    assert len(context) == 4
    for r in context:
        assert r["predicted_fwd_bwd_ms"] == pytest.approx(r["fwd_bwd_ms"], rel=sm.TOLERANCE), (r["P"], r["heads"])


def test_dit_inputs_from_a_checkpoint(tmp_path):
    from sla_dist import PatchConfig, SLAConfig, apply_sla
    from sla_dist.models import VideoDiT, dit_config

    torch.manual_seed(0)
    model = VideoDiT(dit_config("tiny"))
    apply_sla(model, PatchConfig(sla=SLAConfig()))  # an SLA checkpoint: its proj_l weights are not needed
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    config = LocalityConfig(grid=(4, 8, 8), dit_model="tiny", checkpoint=tmp_path / "dit.pt", dit_layer=1)
    q, k, v = locality_qkv("dit", config, 2, 32, torch.device("cpu"))
    assert q.shape == k.shape == v.shape == (1, 2, 256, 32) and not torch.equal(q, k)
    with pytest.raises(ValueError, match=r"model 'tiny' has 2 heads of dim 32; run the benchmark with --heads 2"):
        locality_qkv("dit", config, 4, 32, torch.device("cpu"))


def test_exchanges_are_timed_side_by_side():
    """Two gloo ranks: one Ulysses row per exchange and input layout, each with its exchange-only time and
    bandwidths."""
    config = bench.BenchConfig(seq_len=300, heads=[2], head_dim=32, sizes=[2], modes=["ulysses"],
                               exchanges=["fused", "deepspeed"], topk=0.2, warmup=0, iters=1, cpu=True,
                               input_layouts=["bhld", "blhd"])
    rows = bench.run_world(config, 2)
    assert [(r["layout"], r["exchange"]) for r in rows] == [("bhld", "fused"), ("bhld", "deepspeed"),
                                                            ("blhd", "fused"), ("blhd", "deepspeed")]
    for r in rows:
        assert 0 < r["exchange_ms"] and 0 < r["exchange_gbps"] and 0 < r["a2a_gbps"], r
    assert "| ulysses | fused | iid blhd | 2 | 2 |" in bench.table(rows)


def test_efficiency_is_against_the_single_rank_time_of_the_same_layout():
    rows = [dict(mode="ulysses", heads=12, layout=layout, P=P, fwd_bwd_ms=ms)
            for layout, P, ms in (("bhld", 1, 80.0), ("blhd", 1, 60.0), ("bhld", 2, 50.0), ("blhd", 2, 50.0))]
    bench.add_efficiency(rows)
    assert [r["efficiency"] for r in rows] == [1.0, 1.0, 0.8, 0.6]


def test_bad_exchange_and_layout_are_named():
    with pytest.raises(ValueError, match=r"exchange 'nccl' is not one of \('fused', 'deepspeed'\)"):
        bench.BenchConfig(exchanges=["nccl"])
    with pytest.raises(ValueError, match="exchanges is empty"):
        bench.BenchConfig(exchanges=[])
    with pytest.raises(ValueError, match=r"input layout 'bshd' is not one of \('bhld', 'blhd'\)"):
        bench.BenchConfig(input_layouts=["bshd"])
