"""Attention fidelity: captured q/k/v per layer, zero error at zero sparsity, error growing with sparsity."""

import pytest
import torch

from sla_dist import SLAConfig
from sla_dist.eval.fidelity import FidelityConfig, attention_fidelity, capture_qkv, probe_layer, relative_l1
from sla_dist.models import PatchConfig, VideoDiT, apply_sla, dit_config


def _model_and_batch():
    config = dit_config("tiny")
    model = VideoDiT(config).eval()
    latents = torch.randn(1, config.in_channels, 4, 16, 16)  # 4 x 8 x 8 = 256 tokens: 4 blocks of 64
    return model, latents, torch.randn(1, 5, config.text_dim)


def test_capture_returns_each_layers_inputs():
    model, latents, text = _model_and_batch()
    captured = capture_qkv(model, latents, torch.tensor([500.0]), text)
    assert len(captured) == len(model.blocks)
    heads, head_dim = model.config.num_heads, model.config.head_dim
    assert all(t.shape == (1, heads, 256, head_dim) for qkv in captured for t in qkv)
    assert not torch.equal(captured[0][0], captured[1][0])
    assert all(not block.self_attn.core._forward_pre_hooks for block in model.blocks)  # hooks removed


def test_errors_are_zero_when_dense_and_grow_with_sparsity():
    model, latents, text = _model_and_batch()
    result = attention_fidelity(model, latents, text, FidelityConfig(sparsities=[0.0, 0.5, 0.75]))
    for entry in result["layers"]:
        zero, half, most = entry["error"]
        assert zero < 1e-5 < half < most
        assert entry["realized_sparsity"] == pytest.approx([0.0, 0.5, 0.75])
        assert not entry["sla"]


def test_sla_layers_keep_their_trained_projection():
    model, latents, text = _model_and_batch()
    apply_sla(model, PatchConfig(sla=SLAConfig(topk=0.5, feature_map="elu"), layers=[1]))
    core = model.blocks[1].self_attn.core
    torch.nn.init.normal_(core.proj_l.weight)
    probe = probe_layer(core, model.config.head_dim, 0.75)
    assert torch.equal(probe.proj_l.weight, core.proj_l.weight)
    assert probe.config.feature_map == "elu" and probe.config.topk == 0.25
    result = attention_fidelity(model, latents, text, FidelityConfig(sparsities=[0.75]))
    assert [entry["sla"] for entry in result["layers"]] == [False, True]


def test_dense_layers_are_probed_with_the_recipes_sla_settings(monkeypatch):
    torch.manual_seed(0)  # a fixed model and batch: the error comparison below is not left to chance
    model, latents, text = _model_and_batch()
    sla = SLAConfig(block_q=128, feature_map="relu", linear_scope="all", negligible=0.2)
    probe = probe_layer(model.blocks[0].self_attn.core, model.config.head_dim, 0.5, sla)
    assert (probe.config.block_q, probe.config.feature_map, probe.config.linear_scope) == (128, "relu", "all")
    assert probe.config.topk == 0.5 and probe.config.negligible == 0.2
    assert not probe.proj_l.weight.any()
    import sla_dist.eval.fidelity as fidelity

    probes = []
    original = fidelity.probe_layer
    monkeypatch.setattr(fidelity, "probe_layer", lambda *args: probes.append(original(*args)) or probes[-1])
    config = FidelityConfig(sparsities=[0.5])
    trained = attention_fidelity(model, latents, text, config, sla=sla)
    assert [(p.config.block_q, p.config.feature_map) for p in probes] == [(128, "relu")] * len(model.blocks)
    probes.clear()
    default = attention_fidelity(model, latents, text, config)
    assert [p.config.block_q for p in probes] == [SLAConfig().block_q] * len(model.blocks)
    assert trained["layers"][0]["error"] != default["layers"][0]["error"]  # 128-token query blocks pool otherwise


def test_relative_l1_and_config_validation():
    ref = torch.randn(4, 8)
    assert relative_l1(ref * 1.5, ref) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"sparsities \[1.0\]"):
        FidelityConfig(sparsities=[0.5, 1.0])
    with pytest.raises(ValueError, match="sigma=2"):
        FidelityConfig(sigma=2)
