"""The reference video DiT: shapes, tiling invariance, checkpointing, input checks."""

import pytest
import torch

from sla_dist.config import SLAConfig
from sla_dist.models import VideoDiT, apply_sla, dit_config
from tests.utils import DEVICE


def _inputs(config, frames=3, height=8, width=10, batch=2, text_len=7):
    latents = torch.randn(batch, config.in_channels, frames, height, width)
    timestep = torch.rand(batch) * 1000
    text = torch.randn(batch, text_len, config.text_dim)
    return latents, timestep, text


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_forward_backward_shapes(mlp):
    torch.manual_seed(0)
    config = dit_config("tiny", mlp=mlp, out_channels=6)
    model = VideoDiT(config)
    latents, timestep, text = _inputs(config)
    out = model(latents, timestep, text)
    assert out.shape == (2, 6, 3, 8, 10)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_patchify_round_trips():
    model = VideoDiT(dit_config("tiny", in_channels=5, out_channels=5, patch_size=(2, 2, 2)))
    latents = torch.randn(2, 5, 4, 6, 8)
    tokens = model.patchify(latents)
    assert tokens.shape == (2, 2 * 3 * 4, 5 * 8)
    # patchify groups channels as (C, p); unpatchify reads (p, C) as Wan's head does.
    as_head_layout = tokens.unflatten(-1, (5, 8)).transpose(-1, -2).flatten(-2)
    assert torch.equal(model.unpatchify(as_head_layout, (2, 3, 4)), latents)


def test_tiling_leaves_outputs_unchanged():
    torch.manual_seed(1)
    raster = VideoDiT(dit_config("tiny"))
    tiled = VideoDiT(dit_config("tiny", tile_size=(2, 2, 3)))
    tiled.load_state_dict(raster.state_dict())
    latents, timestep, text = _inputs(raster.config, frames=5, height=6, width=14)
    torch.testing.assert_close(tiled(latents, timestep, text), raster(latents, timestep, text))
    inputs = tiled.embed(latents, timestep, text)
    assert inputs.tiling is not None and not torch.equal(inputs.rope[0], raster.embed(latents, timestep, text).rope[0])


def test_block_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    plain = VideoDiT(dit_config("tiny"))
    ckpt = VideoDiT(dit_config("tiny", checkpoint_blocks=True))
    ckpt.load_state_dict(plain.state_dict())
    latents, timestep, text = _inputs(plain.config)
    for model in (plain, ckpt):
        model(latents, timestep, text).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_staged_forward_equals_forward():
    torch.manual_seed(3)
    model = VideoDiT(dit_config("tiny"))
    latents, timestep, text = _inputs(model.config)
    inputs = model.embed(latents, timestep, text)
    assert inputs.tokens.shape == (2, 3 * 4 * 5, 64) and inputs.rope[0].shape == (60, 16)
    staged = model.unembed(model.forward_blocks(inputs.tokens, inputs), inputs)
    torch.testing.assert_close(staged, model(latents, timestep, text))


def test_valid_length_without_sequence_parallel_is_refused():
    """A valid length only means something for a sequence shard; without SP cores it would be silently dropped."""
    model = VideoDiT(dit_config("tiny"))
    inputs = model.embed(*_inputs(model.config))
    with pytest.raises(ValueError, match="seq_len=50 is given for a sequence shard of 60 tokens"):
        model.forward_blocks(inputs.tokens, inputs, seq_len=50)


def test_bfloat16_forward():
    torch.manual_seed(4)
    model = VideoDiT(dit_config("tiny")).to(torch.bfloat16)
    latents, timestep, text = _inputs(model.config)
    out = model(latents.bfloat16(), timestep, text.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_inputs_are_named():
    model = VideoDiT(dit_config("tiny"))
    latents, timestep, text = _inputs(model.config)
    with pytest.raises(ValueError, match=r"\(T, H, W\)=\(3, 7, 10\) do not divide"):
        model(torch.randn(2, 4, 3, 7, 10), timestep, text)
    with pytest.raises(ValueError, match="C=4"):
        model(torch.randn(2, 3, 3, 8, 10), timestep, text)
    with pytest.raises(ValueError, match=r"timestep of shape \(3,\)"):
        model(latents, torch.rand(3), text)
    with pytest.raises(ValueError, match="text_dim=32"):
        model(latents, timestep, torch.randn(2, 7, 31))


def test_unembed_is_head_tokens_then_untile_and_unpatchify():
    """head_tokens is the head on tokens (what sequence-parallel training runs on each shard); unembed goes through
    it, so the two cannot drift apart."""
    torch.manual_seed(0)
    model = VideoDiT(dit_config("tiny", tile_size=(2, 4, 4)))
    inputs = model.embed(*_inputs(model.config, height=8, width=8))
    x = torch.randn_like(inputs.tokens)
    tokens = model.head_tokens(x, inputs.t_emb)
    assert tokens.shape == (*x.shape[:2], model.config.out_channels * model.config.patch_volume)
    torch.testing.assert_close(model.unembed(x, inputs),
                               model.unpatchify(inputs.tiling.untile(tokens, dim=1), inputs.grid))
    model.head_tokens = lambda x, t_emb: torch.zeros_like(tokens)
    assert not model.unembed(x, inputs).any()


def test_sla_dit_compiles_to_one_graph(block_map_kernels):
    """The whole DiT with SLA on the Triton-kernel path (the interpreter on CPU) traces as one graph, so a user can
    compile the model (fusing the non-attention ops) or capture it in CUDA graphs; the compiled forward, whose
    backward AOTAutograd traces at compile time, gives the eager output."""
    torch.manual_seed(0)
    config = dit_config("tiny", num_layers=1)
    model = VideoDiT(config)
    apply_sla(model, SLAConfig(topk=0.5, negligible=0.25, backend="triton"))
    model.to(DEVICE)  # the interpreter on CPU, the compiled kernels on a GPU
    inputs = _inputs(config, frames=1, height=16, width=20, batch=1)  # 80 tokens: 2 query blocks
    latents, timestep, text = (t.to(DEVICE) for t in inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(latents, timestep, text), model(latents, timestep, text))
