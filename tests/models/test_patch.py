"""apply_sla() on the reference DiT: equivalence at topk = 1, trainable proj_l, layer selection, errors."""

import pytest
import torch
import torch.nn as nn

from sla_dist import SLAConfig, SparseLinearAttention
from sla_dist.models import PatchConfig, VideoDiT, apply_sla, dit_config
from sla_dist.models.layers import DenseAttention


# 4 x 8 x 8 = 256 tokens: four 64-token key blocks, so topk 0.25 / negligible 0.25 leaves two marginal blocks.
GRID_LATENTS = (4, 16, 16)


def _pair(seed=0, **overrides):
    torch.manual_seed(seed)
    dense = VideoDiT(dit_config("tiny", **overrides))
    patched = VideoDiT(dense.config)
    patched.load_state_dict(dense.state_dict())
    return dense, patched


def _inputs(config, batch=2, device="cpu"):
    latents = torch.randn(batch, config.in_channels, *GRID_LATENTS, device=device)
    return latents, torch.rand(batch, device=device) * 1000, torch.randn(batch, 5, config.text_dim, device=device)


@pytest.mark.parametrize("tile_size", [None, (2, 4, 4)])
def test_full_topk_equals_dense(tile_size):
    dense, patched = _pair(tile_size=tile_size)
    assert apply_sla(patched, SLAConfig(topk=1.0, negligible=0.0)) == [0, 1]
    inputs = _inputs(dense.config)
    torch.testing.assert_close(patched(*inputs), dense(*inputs), rtol=1e-5, atol=1e-5)


def test_sparse_differs_and_trains_proj_l():
    dense, patched = _pair(seed=1)
    apply_sla(patched, SLAConfig(topk=0.25, negligible=0.25))
    inputs = _inputs(dense.config)
    out = patched(*inputs)
    assert (out - dense(*inputs)).abs().max() > 1e-3
    out.square().mean().backward()
    proj = [m.proj_l for m in patched.modules() if isinstance(m, SparseLinearAttention)]
    assert len(proj) == 2
    for p in proj:
        assert p.weight.grad.abs().sum() > 0 and p.bias.grad.abs().sum() > 0
    names = {n for n, _ in patched.named_parameters()}
    assert "blocks.1.self_attn.core.proj_l.weight" in names
    # A step of plain SGD on proj_l changes the model's output: the linear branch is now live.
    with torch.no_grad():
        for p in proj:
            p.weight -= 10.0 * p.weight.grad
    assert (patched(*inputs) - out).abs().max() > 1e-4


def test_state_dict_round_trip():
    _, patched = _pair(seed=2)
    apply_sla(patched, SLAConfig(topk=0.25, negligible=0.25))
    with torch.no_grad():
        for m in patched.modules():
            if isinstance(m, SparseLinearAttention):
                m.proj_l.weight.normal_()
    fresh = VideoDiT(patched.config)
    apply_sla(fresh, SLAConfig(topk=0.25, negligible=0.25))
    fresh.load_state_dict(patched.state_dict())
    inputs = _inputs(patched.config)
    torch.testing.assert_close(fresh(*inputs), patched(*inputs))


@pytest.mark.parametrize(
    "patch, expected",
    [(PatchConfig(skip_first=1), [1]), (PatchConfig(layers=[-2]), [0]), (PatchConfig(layers=[1, 0]), [0, 1])],
)
def test_layer_selection(patch, expected):
    model = VideoDiT(dit_config("tiny"))
    assert apply_sla(model, patch) == expected
    kinds = [type(block.self_attn.core) for block in model.blocks]
    assert kinds == [SparseLinearAttention if i in expected else DenseAttention for i in range(2)]


def test_settings_reach_each_layer():
    model = VideoDiT(dit_config("tiny"))
    apply_sla(model, SLAConfig(topk=0.1, negligible=0.2, block_q=128, feature_map="elu", linear_scope="all"))
    sla = model.blocks[0].self_attn.core
    assert (sla.config.topk, sla.config.negligible, sla.config.block_q) == (0.1, 0.2, 128)
    assert (sla.config.feature_map, sla.config.linear_scope, sla.head_dim) == ("elu", "all", 32)


def test_errors():
    model = VideoDiT(dit_config("tiny"))
    apply_sla(model)
    with pytest.raises(ValueError, match="already applied"):
        apply_sla(model)
    with pytest.raises(NotImplementedError, match="torch.nn.modules.linear.Linear"):
        apply_sla(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"layers \[2\] are out of range for a model with 2 layers"):
        apply_sla(VideoDiT(dit_config("tiny")), PatchConfig(layers=[2]))
    with pytest.raises(ValueError, match="layers=\\[1, -1\\] name the same layer twice"):
        apply_sla(VideoDiT(dit_config("tiny")), PatchConfig(layers=[1, -1]))
    # a literal repeat is the same check (one place: after the modulo in select())
    with pytest.raises(ValueError, match="layers=\\[0, 0\\] name the same layer twice"):
        apply_sla(VideoDiT(dit_config("tiny")), PatchConfig(layers=[0, 0]))
    with pytest.raises(ValueError, match="skip_first=2 leaves none"):
        apply_sla(VideoDiT(dit_config("tiny")), PatchConfig(skip_first=2))
    with pytest.raises(ValueError, match="either layers"):
        PatchConfig(skip_first=1, layers=[0])
    with pytest.raises(ValueError, match="config must be"):
        apply_sla(VideoDiT(dit_config("tiny")), {"topk": 0.1})


def test_unsupported_head_dim():
    config = dit_config("tiny", dim=96, num_heads=2)
    with pytest.raises(NotImplementedError, match="head dim 48"):
        apply_sla(VideoDiT(config))
    model = VideoDiT(config)
    apply_sla(model, SLAConfig(backend="reference"))
    assert torch.isfinite(model(*_inputs(config))).all()


@pytest.mark.gpu
def test_kernels_full_topk_match_dense_bf16():
    dense, patched = _pair(seed=5)
    dense, patched = dense.cuda().bfloat16(), patched.cuda().bfloat16()
    apply_sla(patched, SLAConfig(topk=1.0, negligible=0.0))
    latents, timestep, text = _inputs(dense.config, device="cuda")
    inputs = (latents.bfloat16(), timestep, text.bfloat16())
    torch.testing.assert_close(patched(*inputs).float(), dense(*inputs).float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.slow
def test_wan_1_3b_shape_trains_at_32760_tokens():
    torch.manual_seed(6)
    model = VideoDiT(dit_config("wan2.1-1.3b", checkpoint_blocks=True)).cuda().bfloat16()
    apply_sla(model, SLAConfig(topk=0.05))
    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    out = model(latents, torch.tensor([500.0], device="cuda"), text)
    out.float().square().mean().backward()
    assert out.shape == latents.shape and torch.isfinite(out).all()
    assert model.blocks[-1].self_attn.core.proj_l.weight.grad.abs().sum() > 0
