"""Sequence-parallel training forward (sla_dist/lightning/sequence.py) and the gradient convention SLAStrategy
relies on: under SP=2 the per-rank gradient shares of DiTModule's loss sum to the SP=1 gradient."""

from __future__ import annotations

import copy
import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from sla_dist import SLAConfig, apply_sla, dit_config
from sla_dist.lightning.checkpoint import canonical_name
from sla_dist.lightning.module import DiTModule
from sla_dist.lightning.sequence import enable_sequence_parallel, predict_full, predict_local, target_tokens
from sla_dist.models import VideoDiT, apply_compile
from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups
from tests.parallel.dist_utils import device_params, run_distributed

# 3 x 8 x 9 = 216 tokens: over 2 ranks with 128-token alignment the second shard is 88 tokens + 40 padding.
LATENT_SHAPE = (2, 4, 3, 16, 18)


def test_canonical_name_of_older_sp_checkpoints():
    """Checkpoints written while SP wrapped the SLA layer as ``core.attention`` still export / load."""
    plain = "blocks.1.self_attn.core.proj_l.weight"
    assert canonical_name("model.blocks.1.self_attn.core.attention.proj_l.weight") == plain
    assert canonical_name(f"model.{plain}") == plain


def test_target_tokens_invert_unembed():
    torch.manual_seed(random.randrange(1000))
    model = VideoDiT(dit_config("tiny", tile_size=(2, 4, 4)))
    latents, t, text = torch.randn(LATENT_SHAPE), torch.rand(2) * 1000, torch.randn(2, 5, 32)
    inputs = model.embed(latents, t, text)
    x = torch.randn_like(inputs.tokens)
    full = model.unembed(x, inputs)
    torch.testing.assert_close(target_tokens(model, full, inputs.tiling), model.head_tokens(x, inputs.t_emb))


def _module(seed: int, teacher: bool, device: torch.device = torch.device("cpu")) -> DiTModule:
    config = dit_config("tiny", tile_size=(2, 4, 4))
    module = DiTModule(config, seed=seed)
    if teacher:
        module.optim.teacher_weight = 0.5
        module.teacher = copy.deepcopy(module.model).requires_grad_(False)
    # skip_first=1 keeps layer 0 dense: both the dense and the SLA sequence-parallel cores are exercised
    apply_sla(module.model, __import__("sla_dist").PatchConfig(sla=SLAConfig(topk=0.5, negligible=0.25),
                                                               skip_first=1))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a live linear branch, and a student that differs from its teacher
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.to(device)


def _grads(module: DiTModule, batch: dict, groups) -> tuple[dict, torch.Tensor]:
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(sp_groups=groups))
    terms = module.losses(batch, torch.Generator().manual_seed(7))
    terms["loss"].backward()
    loss = module.full_value(terms["loss"])
    module._trainer = None
    return {n: p.grad.clone() for n, p in module.model.named_parameters()}, loss


def _refuse_deepspeed(*args, **kwargs):
    raise AssertionError("a compiled block ran DeepSpeed's exchange instead of the fused one")


def _check_sp_grads(device: torch.device, seed: int, checkpoint_blocks: bool = False, compiled: bool = False,
                    exchange: str = "fused") -> None:
    torch.manual_seed(seed)
    batch = {"latents": torch.randn(LATENT_SHAPE, device=device), "text": torch.randn(2, 5, 32, device=device),
             "index": torch.arange(2)}
    reference = _module(seed, teacher=True, device=device)
    want, want_loss = _grads(copy.deepcopy(reference), batch, None)

    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2))
    sharded = copy.deepcopy(reference)
    # recomputing a block in backward must see the same valid length (216 of 256 padded tokens) as its forward
    sharded.model.config = dataclasses.replace(sharded.model.config, checkpoint_blocks=checkpoint_blocks)
    assert enable_sequence_parallel(sharded.model, groups) == 2
    assert enable_sequence_parallel(sharded.teacher, groups) == 2
    assert enable_sequence_parallel(sharded.model, groups) == 0, "enabling twice must not wrap twice"
    # the same names at every SP size: a ZeRO checkpoint saved at SP=2 resumes at SP=1 and the other way round
    assert list(sharded.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in sharded.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(canonical_name(n) == n.removeprefix("model.") for n in sharded.state_dict())
    # copies of an SP model (EMA, teacher) run their own SLA layers, sharded over the same groups
    clone = copy.deepcopy(sharded.model).blocks[1].self_attn
    assert clone.parallel.attention is clone.core and clone.parallel.groups is groups
    assert clone.core is not sharded.model.blocks[1].self_attn.core
    for attn in sharded.model.modules():  # the dense and the SLA layers' Ulysses all-to-all
        if getattr(attn, "parallel", None) is not None:
            attn.parallel.exchange = exchange
    if compiled:  # as DiTModule.configure_model (model.compile) does, before the sequence-parallel forward
        apply_compile(sharded.model, backend="aot_eager")
        # the compiled blocks trace the fused exchange (functional collectives), never DeepSpeed's
        for attn in sharded.model.modules():
            if getattr(attn, "parallel", None) is not None:
                attn.parallel.distributed = _refuse_deepspeed
    got, got_loss = _grads(sharded, batch, groups)
    if compiled:
        from torch._dynamo.utils import counters

        # the blocks compiled, the sequence-parallel attention and the checkpoint inside them without a break
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    # on CUDA the SLA layers run the Triton kernels, whose summation order differs from the reference's
    rtol, grad_tol = (1e-5, 1e-4) if device.type == "cpu" else (1e-3, 1e-2)
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=0)
    assert got.keys() == want.keys()
    for name, grad in got.items():
        dist.all_reduce(grad, group=groups.sp_group)  # what ZeRO does over SP (then it averages over DP)
        scale = want[name].abs().max().clamp_min(1e-12)
        err = (grad - want[name]).abs().max() / scale
        assert err < grad_tol, f"{name}: SP=2 gradient differs from SP=1 by {err:.2e} of its max"
    # the gathered prediction equals the unsharded forward (used for sampling)
    with torch.no_grad():
        x, t, text = torch.randn(LATENT_SHAPE, device=device), torch.full((2,), 500.0, device=device), batch["text"]
        torch.testing.assert_close(predict_full(sharded.model, x, t, text, groups), reference.model(x, t, text),
                                   rtol=100 * rtol, atol=1e-5 if device.type == "cpu" else 1e-3)


@pytest.mark.parametrize("checkpoint_blocks, compiled, exchange",
                         [(False, False, "fused"), (False, False, "deepspeed"), (True, False, "fused"),
                          (True, True, "fused")],
                         ids=["plain", "plain-deepspeed", "checkpointed", "compiled-checkpointed"])
@pytest.mark.parametrize("device", device_params(2))
def test_sp2_gradients_equal_sp1(device, checkpoint_blocks, compiled, exchange):
    run_distributed(_check_sp_grads, 2, device, random.randrange(1000), checkpoint_blocks, compiled, exchange)


def _check_disagreeing_lengths(device: torch.device) -> None:
    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2))
    torch.manual_seed(0)
    model = VideoDiT(dit_config("tiny")).to(device)
    enable_sequence_parallel(model, groups)
    # rank 1 reads a clip 2 latent columns narrower: 216 vs 192 tokens, shards of 128 vs 128 tokens, so the
    # all-to-alls would even line up and silently mix two different videos
    width = 18 if groups.sp_rank == 0 else 16
    latents = torch.randn(2, 4, 3, 16, width, device=device)
    t, text = torch.full((2,), 500.0, device=device), torch.randn(2, 5, 32, device=device)
    with pytest.raises(ValueError, match=r"different token sequences \(rank 0: batch=2, frames=3, height=8, "
                                         r"width=9, tokens=216; rank 1: batch=2, frames=3, height=8, width=8, "
                                         r"tokens=192\)"):
        predict_local(model, latents, t, text, groups)


@pytest.mark.parametrize("device", device_params(2))
def test_sp_ranks_with_different_lengths_fail_with_both_lengths(device):
    run_distributed(_check_disagreeing_lengths, 2, device)


@pytest.mark.parametrize("seq_len", [100.0, True, 0, 129])
def test_sharded_dense_seq_len_must_be_an_integer_in_range(seq_len):
    """sp_size 1: a [1, 2, 128, 16] shard holds at most 128 valid tokens (the same rule as SLA's). Built without its
    constructor, which starts DeepSpeed's communication backend for the whole process: the length is checked before
    the exchange is reached."""
    from sla_dist.lightning.sequence import ShardedDense
    from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups

    dense = object.__new__(ShardedDense)
    dense.groups = SequenceParallelGroups.build(SequenceParallelConfig())
    q = torch.randn(1, 2, 128, 16)
    with pytest.raises(ValueError, match=rf"seq_len={seq_len!r} must be an integer in \(0, 128\]"):
        dense(q, q, q, seq_len=seq_len)


def test_sharded_dense_exchange_must_be_known():
    from sla_dist.lightning.sequence import ShardedDense

    with pytest.raises(ValueError, match=r"exchange='nccl' is not one of \('fused', 'deepspeed'\)"):
        ShardedDense(SequenceParallelGroups.build(SequenceParallelConfig()), exchange="nccl")
