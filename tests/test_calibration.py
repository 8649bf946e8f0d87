"""calibrate_projections: proj_l set to the least-squares fit of O_s + O_l W^T + b to full attention."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sla_dist import PatchConfig, SLAConfig, SparseLinearAttention, VideoDiT, apply_sla, calibrate_projections, dit_config
from sla_dist.calibration import ProjectionCalibration, ProjectionFit
from sla_dist.attention import dense_attention
from tests.parallel.dist_utils import run_distributed


def _qkv(seed: int, L: int = 201, H: int = 2, D: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, L, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _layer(**kwargs) -> SparseLinearAttention:
    return SparseLinearAttention(16, topk=0.25, negligible=0.0, backend="reference", **kwargs).double()


@torch.no_grad()
def _error(layer: SparseLinearAttention, inputs: list[list[torch.Tensor]]) -> float:
    """Relative L2 of the layer against full attention over all rows of ``inputs``."""
    diff = sum(float((layer(*qkv) - dense_attention(*qkv)).square().sum()) for qkv in inputs)
    return (diff / sum(float(dense_attention(*qkv).square().sum()) for qkv in inputs)) ** 0.5


def test_calibration_is_the_least_squares_fit_over_every_forward():
    layer = _layer()
    inputs = [_qkv(0), _qkv(1, L=77)]  # two forwards of different lengths: their rows are pooled
    sparse_error = _error(layer, inputs)
    report = calibrate_projections(layer, lambda: [layer(*qkv) for qkv in inputs], ridge=0.0)
    assert report[""]["rows"] == 2 * (201 + 77)
    assert report[""]["sparse_error"] == pytest.approx(sparse_error, rel=1e-9)
    # the closed form on the concatenated rows, independently
    xs, ys = [], []
    for q, k, v in inputs:
        o_s, o_l, _, _ = layer.branches(q, k, v)
        xs.append(torch.cat([o_l.flatten(0, -2), torch.ones(o_l[..., :1].numel(), 1, dtype=torch.float64)], 1))
        ys.append((dense_attention(q, k, v) - o_s).flatten(0, -2))
    solution = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution
    torch.testing.assert_close(layer.proj_l.weight.detach(), solution[:-1].T, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(layer.proj_l.bias.detach(), solution[-1], rtol=1e-6, atol=1e-8)
    calibrated = _error(layer, inputs)
    assert report[""]["calibrated_error"] == pytest.approx(calibrated, rel=1e-6)
    assert calibrated < 0.9 * sparse_error
    assert not layer._forward_hooks


def test_merged_fits_equal_one_fit_over_all_rows():
    g = torch.Generator().manual_seed(3)
    o_s, o_l, ref = torch.randn(3, 300, 8, generator=g, dtype=torch.float64)
    whole, first, second = (ProjectionFit.empty(8, torch.device("cpu")) for _ in range(3))
    whole.add(o_s, o_l, ref)
    first.add(o_s[:120], o_l[:120], ref[:120])
    second.add(o_s[120:], o_l[120:], ref[120:])
    first.merge(second)
    assert first.rows == whole.rows == 300
    torch.testing.assert_close(first.gram, whole.gram)
    torch.testing.assert_close(first.cross, whole.cross)
    assert first.residual_sq == pytest.approx(whole.residual_sq)
    assert first.reference_sq == pytest.approx(whole.reference_sq)
    assert first.solve(1e-9)[2] == pytest.approx(whole.solve(1e-9)[2])


def test_a_dit_is_calibrated_layer_by_layer():
    torch.manual_seed(0)
    model = VideoDiT(dit_config("tiny"))
    apply_sla(model, PatchConfig(sla=SLAConfig(topk=0.25, negligible=0.0, block_q=64, block_k=64)))
    before = {n: p.clone() for n, p in model.named_parameters() if "proj_l" not in n}
    x, t, text = torch.randn(2, 4, 2, 16, 16), torch.full((2,), 500.0), torch.randn(2, 5, 32)
    report = calibrate_projections(model, lambda: model(x, t, text))
    assert sorted(report) == [f"blocks.{i}.self_attn.core" for i in range(len(model.blocks))]
    for name, r in report.items():
        assert r["calibrated_error"] < r["sparse_error"], name
        assert model.get_submodule(name).proj_l.weight.abs().sum() > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "proj_l" not in n)


def _measured_errors(model: VideoDiT, run) -> dict[str, float]:
    """Each layer's error against full attention on its inputs in ``run()``, with proj_l as it is now."""
    with ProjectionCalibration(model) as measure, torch.no_grad():
        run()
    return {name: fit.error(layer.proj_l.weight.double(), layer.proj_l.bias.double())
            for (name, fit), layer in zip(measure.fits.items(), measure.layers.values())}


def test_sequential_calibration_fits_each_layer_on_the_fitted_layers_outputs():
    """sequential=True: layer l is fitted with layers < l already calibrated, so the reported errors are those of
    the final model; the one-pass fit's later layers were fitted on inputs that no longer occur."""
    x, t, text = torch.randn(2, 4, 2, 16, 16), torch.full((2,), 500.0), torch.randn(2, 5, 32)
    models = {}
    for sequential in (False, True):
        torch.manual_seed(0)
        models[sequential] = model = VideoDiT(dit_config("tiny")).double()
        apply_sla(model, PatchConfig(sla=SLAConfig(topk=0.25, negligible=0.0, block_q=64, block_k=64)))
        run = lambda model=model: model(x.double(), t.double(), text.double())  # noqa: E731
        report = calibrate_projections(model, run, sequential=sequential)
        measured = _measured_errors(model, run)
        names = list(report)
        assert names == [f"blocks.{i}.self_attn.core" for i in range(len(model.blocks))]
        reported = [report[n]["calibrated_error"] for n in names]
        if sequential:
            assert reported == pytest.approx([measured[n] for n in names], rel=1e-6)
        else:  # the first layer's inputs never change; the later layers' do
            assert reported[0] == pytest.approx(measured[names[0]], rel=1e-6)
            assert max(abs(r / measured[n] - 1) for r, n in zip(reported[1:], names[1:])) > 1e-3
    first = [m.blocks[0].self_attn.core.proj_l.weight for m in models.values()]
    torch.testing.assert_close(first[0], first[1])  # same inputs, same fit
    last = [m.blocks[-1].self_attn.core.proj_l.weight for m in models.values()]
    assert not torch.allclose(last[0], last[1])
    with pytest.raises(ValueError, match=r"names \['blocks.9'\] are not SLA layers"):
        ProjectionCalibration(models[True], ["blocks.9"])


def test_layers_without_a_linear_branch_and_bad_calls():
    sparse_only = _layer(linear_scope="none")
    q, k, v = _qkv(2)
    assert calibrate_projections(sparse_only, lambda: sparse_only(q, k, v)) == {}
    assert sparse_only.proj_l.weight.abs().sum() == 0
    layer = _layer()
    with pytest.raises(ValueError, match=r"ridge=-1 must be a non-negative number"):
        calibrate_projections(layer, lambda: layer(q, k, v), ridge=-1)
    with pytest.raises(ValueError, match="the calibration run called none of the model's 1 SLA layers"):
        calibrate_projections(layer, lambda: None)

    def failing_run():
        layer(q, k, v)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibrate_projections(layer, failing_run)
    assert not layer._forward_hooks and layer.proj_l.weight.abs().sum() == 0


def _two_rank_calibration(device: torch.device) -> None:
    rank = dist.get_rank()
    layer = _layer().to(device)
    inputs = [[t.to(device) for t in _qkv(seed, L=120 + 31 * seed)] for seed in (0, 1)]
    report = calibrate_projections(layer, lambda: layer(*inputs[rank]), group=dist.group.WORLD)
    alone = _layer().to(device)  # one process, both ranks' inputs
    want = calibrate_projections(alone, lambda: [alone(*qkv) for qkv in inputs])
    assert report[""]["rows"] == want[""]["rows"] == 2 * (120 + 151)
    for a, b in ((layer.proj_l.weight, alone.proj_l.weight), (layer.proj_l.bias, alone.proj_l.bias)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12)
    assert report[""]["calibrated_error"] == pytest.approx(want[""]["calibrated_error"], rel=1e-9)


def test_ranks_fit_one_proj_l_over_all_their_rows():
    run_distributed(_two_rank_calibration, 2, "cpu")
