"""benchmarks/time_layer.py and layer_inputs.py: the single-layer benchmark on model-like inputs (source, memory
layout, length, negligible), one factor at a time, in a tiny CPU run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import time_layer  # noqa: E402
from layer_inputs import layer_gradients, sla_layer_inputs  # noqa: E402
from locality_inputs import LocalityConfig, locality_qkv  # noqa: E402

L, H, D = 256, 2, 32


def _inputs(layout: str, source: str = "iid"):
    torch.manual_seed(0)
    return sla_layer_inputs(L, H, D, device="cpu", dtype=torch.float32, source=source, layout=layout,
                            locality=LocalityConfig(grid=(4, 8, 8)))


def test_layouts_hold_the_same_values_in_the_models_strides():
    _, *base = _inputs("bhld")
    _, *blhd = _inputs("blhd")
    _, *fused = _inputs("fused")
    blhd_strides = (L * H * D, D, H * D, 1)  # a [1, L, H, D] buffer seen as [1, H, L, D]
    for name, b, x, y in zip("qkvg", base, blhd, fused):
        assert b.is_contiguous(), name
        assert torch.equal(b, x) and torch.equal(b, y), name
        assert x.stride() == blhd_strides, (name, x.stride())
        assert y.stride() == (blhd_strides if name != "v" else (3 * L * H * D, D, 3 * H * D, 1)), (name, y.stride())
    # q, k, v are leaves (the timed step resets their .grad), the output gradient needs none
    assert all(t.is_leaf and t.requires_grad for t in (*blhd[:3], *fused[:3])) and not fused[3].requires_grad


def test_fused_layout_has_the_strides_videodit_hands_attention():
    from sla_dist.models import VideoDiT, dit_config
    from sla_dist.models.layers import DenseAttention

    torch.manual_seed(0)
    model = VideoDiT(dit_config("tiny")).eval()  # 2 heads of 32
    seen = []
    core = next(m for m in model.modules() if isinstance(m, DenseAttention))
    core.register_forward_pre_hook(lambda _m, args: seen.append(args))
    with torch.no_grad():  # 4 x 16 x 16 latents, patches of 1 x 2 x 2: 256 tokens
        model(torch.randn(1, 4, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 8, 32))
    _, *fused = _inputs("fused")
    assert [x.shape for x in fused[:3]] == [x.shape for x in seen[0]]
    assert [x.stride() for x in fused[:3]] == [x.stride() for x in seen[0]]


def test_layer_gradients_are_returned_not_accumulated():
    """The timed step's gradients equal .backward()'s but leave every .grad unset: accumulating would add kernels
    (an add, or a copy into a leaf's layout) that a model's step does not run."""
    layer, q, k, v, g = _inputs("fused")
    grads = layer_gradients(layer, layer(q, k, v), q, k, v, g)
    assert all(t.grad is None for t in (q, k, v, *layer.parameters()))
    layer(q, k, v).backward(g)
    for got, t in zip(grads, (q, k, v, *layer.parameters())):
        torch.testing.assert_close(got, t.grad)


def test_model_like_sources_need_their_grids_length():
    with pytest.raises(ValueError, match=r"L=100 must equal the \(32, 64, 64\) grid's 131072 tokens"):
        sla_layer_inputs(100, H, D, device="cpu", source="field")
    with pytest.raises(ValueError, match="layout 'lbhd'"):
        sla_layer_inputs(L, H, D, device="cpu", layout="lbhd")
    _, q, k, _, _ = _inputs("bhld", "field")
    assert q.shape == (1, H, L, D) and not torch.equal(q, k)


def test_gaussian_latents_change_the_dit_inputs():
    smooth = LocalityConfig(grid=(4, 8, 8), dit_model="tiny")
    gaussian = LocalityConfig(grid=(4, 8, 8), dit_model="tiny", latents="gaussian")
    q_smooth, _, _ = locality_qkv("dit", smooth, 2, 32, torch.device("cpu"))
    q_gaussian, _, _ = locality_qkv("dit", gaussian, 2, 32, torch.device("cpu"))
    assert q_smooth.shape == q_gaussian.shape and not torch.allclose(q_smooth, q_gaussian)
    with pytest.raises(ValueError, match="latents='noise' must be one of"):
        LocalityConfig(latents="noise")


@pytest.fixture
def one_thread():
    """One intra-op thread: a tiny layer's ops are too small to split, and on a loaded 2-core machine two threads
    waiting on each other made each call ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_run_times_one_line_per_setting_and_names_the_non_defaults(capsys, one_thread):
    time_layer.main(["base", "--tiny"])
    time_layer.main(["run", "--tiny", "--inputs", "iid", "dit", "--layout", "bhld", "fused", "--negligible", "0"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if " fwd+bwd " in line]
    assert [(words[0], words[1]) for words in lines] == [
        ("base", "L="), ("run+neg:0.0", "L="), ("run+fused+neg:0.0", "L="), ("run+dit+neg:0.0", "L="),
        ("run+dit+fused+neg:0.0", "L=")]
    assert all(words[2] == "256" and float(words[4]) > 0 for words in lines)


def test_variants_are_timed_one_after_the_other_and_named(capsys, monkeypatch, one_thread):
    """--fwd-loop x --tma: one line per pair, each under its own SLA_DIST_FWD_LOOP and SLA_DIST_TMA (both left as
    the last pair set them; monkeypatch restores them)."""
    seen = []
    monkeypatch.setenv(time_layer.FWD_LOOP_ENV, "baseline")
    monkeypatch.setenv(time_layer.TMA_ENV, "off")
    monkeypatch.setattr(time_layer, "time_layer", lambda L, label, inputs, args: seen.append(
        (label, os.environ[time_layer.FWD_LOOP_ENV], os.environ[time_layer.TMA_ENV])))
    time_layer.main(["v", "--tiny", "--fwd-loop", "fma", "split+fma", "--tma", "off", "fwd+dq"])
    assert seen == [("v+fwd:fma+tma:off", "fma", "off"), ("v+fwd:fma+tma:fwd+dq", "fma", "fwd+dq"),
                    ("v+fwd:split+fma+tma:off", "split+fma", "off"),
                    ("v+fwd:split+fma+tma:fwd+dq", "split+fma", "fwd+dq")]
    seen.clear()
    time_layer.main(["v", "--tiny", "--tma", "all"])
    assert seen == [("v+tma:all", "split+fma", "all")]  # the loop as the first run left it


def test_prepass_launches_are_timed_one_after_the_other(capsys, monkeypatch, one_thread):
    """--prepass x --setting: one line per pair, each under its own SLA_DIST_PREPASS (left as the last pair set it;
    monkeypatch restores it), so the loop's stages are timed beside the per-block launch in one process."""
    from sla_dist.kernels import configs

    seen = []
    monkeypatch.setenv(time_layer.PREPASS_ENV, "block")
    monkeypatch.setattr(time_layer, "time_layer", lambda L, label, inputs, args: seen.append(
        (label, os.environ[time_layer.PREPASS_ENV], configs.get_kernel("prepass_loop").num_stages)))
    time_layer.main(["p", "--tiny", "--prepass", "block", "loop", "--setting", "prepass_loop=8x1"])
    assert seen == [("p+prepass:block+set:prepass_loop=8x1", "block", 1),
                    ("p+prepass:loop+set:prepass_loop=8x1", "loop", 1)]
    assert time_layer.PREPASS_ENV == configs.PREPASS_ENV
    with pytest.raises(SystemExit):
        time_layer.main(["p", "--tiny", "--prepass", "persistent"])


def test_classify_selects_are_timed_one_after_the_other(capsys, monkeypatch, one_thread):
    """--classify: one line per value, each under its own SLA_DIST_CLASSIFY (left as the last run set it;
    monkeypatch restores it)."""
    from sla_dist.kernels import configs

    seen = []
    monkeypatch.setenv(time_layer.CLASSIFY_ENV, "separate")
    monkeypatch.setattr(time_layer, "time_layer", lambda L, label, inputs, args: seen.append(
        (label, os.environ[time_layer.CLASSIFY_ENV])))
    time_layer.main(["c", "--tiny", "--classify", "separate", "packed"])
    assert seen == [("c+classify:separate", "separate"), ("c+classify:packed", "packed")]
    assert time_layer.CLASSIFY_ENV == configs.CLASSIFY_ENV
    with pytest.raises(SystemExit):
        time_layer.main(["c", "--tiny", "--classify", "radix"])


def test_settings_are_timed_one_after_the_other_each_under_its_launch(capsys, monkeypatch, one_thread):
    """--setting: one line per value, the named kernels launched with its warps x stages during that run only."""
    from sla_dist.kernels import configs

    seen = []
    monkeypatch.setattr(time_layer, "time_layer", lambda L, label, inputs, args: seen.append(
        (label, configs.get_kernel("dq").num_warps, configs.get_kernel("dq").num_stages)))
    default = configs._KERNELS["dq"].fixed
    time_layer.main(["s", "--tiny", "--setting", "dq=4x5", "default"])
    assert seen == [("s+set:dq=4x5", 4, 5), ("s+set:default", *default)]
    assert (configs.get_kernel("dq").num_warps, configs.get_kernel("dq").num_stages) == default


def test_tiny_refuses_gpu_only_options():
    with pytest.raises(SystemExit):
        time_layer.main(["x", "--tiny", "--dense"])
    with pytest.raises(SystemExit):
        time_layer.main(["x", "--tiny", "--kernels"])


def test_tiny_run_times_each_linear_sums(capsys, one_thread):
    time_layer.main(["x", "--tiny", "--linear-sums", "save", "recompute"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if " fwd+bwd " in line]
    assert [words[0] for words in lines] == ["x+sums:save", "x+sums:recompute"]
