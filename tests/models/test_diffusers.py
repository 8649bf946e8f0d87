"""apply_sla() on tiny diffusers Wan and CogVideoX models built from configs (no downloads)."""

import pytest
import torch

from sla_dist import SLAConfig, SparseLinearAttention
from sla_dist.models import PatchConfig, apply_sla
from sla_dist.models.rope import rope_tables

diffusers = pytest.importorskip("diffusers")

FULL = SLAConfig(topk=1.0, negligible=0.0)
SPARSE = SLAConfig(topk=0.25, negligible=0.25)


def _wan(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    return diffusers.WanTransformer3DModel(**{**config, **overrides})


def _wan_inputs(batch=2):
    # 4 x 8 x 8 = 256 tokens: four 64-token key blocks.
    return torch.randn(batch, 4, 4, 16, 16), torch.rand(batch) * 1000, torch.randn(batch, 5, 16)


def _cogvideox(seed=0):
    torch.manual_seed(seed)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=13, patch_size=2,
        max_text_seq_length=6, use_rotary_positional_embeddings=True)


def _cogvideox_inputs(batch=2):
    # 4 latent frames of 8 x 8 patches = 256 video tokens after 6 text tokens; RoPE on the video part.
    cos, sin = rope_tables((4, 8, 8), 32)
    rotary = (cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1))
    return (torch.randn(batch, 4, 4, 16, 16), torch.randn(batch, 6, 16), torch.rand(batch) * 1000), rotary


def _run_wan(model, inputs):
    return model(*inputs).sample


def _run_cogvideox(model, inputs):
    (latents, text, timestep), rotary = inputs
    return model(latents, text, timestep, image_rotary_emb=rotary).sample


def _proj_params(model):
    return [m.proj_l for m in model.modules() if isinstance(m, SparseLinearAttention)]


@pytest.mark.parametrize("fused", [False, True])
def test_wan_full_topk_equals_stock(fused):
    model, inputs = _wan(), _wan_inputs()
    if fused:
        model.fuse_qkv_projections()
    with torch.no_grad():
        stock = _run_wan(model, inputs)
        assert apply_sla(model, FULL) == [0, 1]
        torch.testing.assert_close(_run_wan(model, inputs), stock, rtol=1e-5, atol=1e-5)
    assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in model.blocks)


def test_wan_sparse_trains_proj_l_and_saves_it():
    model, inputs = _wan(1), _wan_inputs()
    with torch.no_grad():
        stock = _run_wan(model, inputs)
    apply_sla(model, PatchConfig(sla=SPARSE, skip_first=1))
    out = _run_wan(model, inputs)
    assert (out - stock).abs().max() > 1e-3
    out.square().mean().backward()
    (proj,) = _proj_params(model)
    assert proj.weight.grad.abs().sum() > 0
    keys = [k for k in model.state_dict() if "proj_l" in k]
    assert keys == ["blocks.1.attn1.sla.proj_l.weight", "blocks.1.attn1.sla.proj_l.bias"]


def test_wan_errors():
    model = _wan()
    apply_sla(model)
    with pytest.raises(ValueError, match="already applied"):
        apply_sla(model)
    with pytest.raises(NotImplementedError, match="head dim 48"):
        apply_sla(_wan(attention_head_dim=48), SPARSE)


def test_cogvideox_full_topk_equals_stock():
    model, inputs = _cogvideox(), _cogvideox_inputs()
    with torch.no_grad():
        stock = _run_cogvideox(model, inputs)
        assert apply_sla(model, FULL) == [0, 1]
        torch.testing.assert_close(_run_cogvideox(model, inputs), stock, rtol=1e-5, atol=1e-5)


def test_cogvideox_sparse_forward_backward():
    model, inputs = _cogvideox(2), _cogvideox_inputs()
    with torch.no_grad():
        stock = _run_cogvideox(model, inputs)
    apply_sla(model, SPARSE)
    out = _run_cogvideox(model, inputs)
    assert (out - stock).abs().max() > 1e-3
    out.square().mean().backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in _proj_params(model))
    assert "transformer_blocks.0.attn1.sla.proj_l.weight" in model.state_dict()


@pytest.mark.gpu
def test_wan_kernels_full_topk_match_stock_bf16():
    model = _wan(3).cuda().bfloat16()
    latents, timestep, text = (t.cuda() for t in _wan_inputs())
    inputs = (latents.bfloat16(), timestep, text.bfloat16())
    with torch.no_grad():
        stock = _run_wan(model, inputs).float()
        apply_sla(model, FULL)
        torch.testing.assert_close(_run_wan(model, inputs).float(), stock, rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.slow
def test_wan_1_3b_trains_at_32760_tokens():
    model = _wan(4, num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                 freq_dim=256, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024).cuda().bfloat16()
    model.enable_gradient_checkpointing()
    apply_sla(model, SLAConfig(topk=0.05))
    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    out = model(latents, torch.tensor([500.0], device="cuda"), text).sample
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and _proj_params(model)[-1].weight.grad.abs().sum() > 0


def test_video_dit_loaded_from_wan_matches_it():
    from sla_dist.models import VideoDiT, dit_config
    from sla_dist.models.wan_weights import video_dit_state_dict_from_wan

    wan, (latents, timestep, text) = _wan(5), _wan_inputs()
    ours = VideoDiT(dit_config("tiny", dim=64, num_heads=2, num_layers=2, ffn_dim=64, text_dim=16, freq_dim=32))
    ours.load_state_dict(video_dit_state_dict_from_wan(wan.state_dict(), num_layers=2))
    with torch.no_grad():
        torch.testing.assert_close(ours(latents, timestep, text), _run_wan(wan, (latents, timestep, text)),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no 'blocks.2.attn1.norm_q.weight'"):
        video_dit_state_dict_from_wan(wan.state_dict(), num_layers=3)
