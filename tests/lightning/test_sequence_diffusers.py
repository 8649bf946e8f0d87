"""Sequence parallelism for a diffusers WanTransformer3DModel (sla_dist/lightning/sequence_diffusers.py): at SP=2 the
model's own forward returns the SP=1 prediction on every rank, and the per-rank gradient shares of a plain MSE loss
sum to the SP=1 gradient, on a token count that does not divide over the ranks, with and without diffusers'
gradient checkpointing."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sla_dist import PatchConfig, SLAConfig, apply_sla
from sla_dist.lightning.strategy import enable_module_sequence_parallel
from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups
from tests.parallel.dist_utils import run_distributed

diffusers = pytest.importorskip("diffusers")

from sla_dist.lightning.sequence_diffusers import enable_wan_sequence_parallel  # noqa: E402

# patch (1, 2, 2): 3 x 8 x 9 = 216 tokens; over 2 ranks with 128-token alignment the second shard holds 88 tokens
# and 40 padding
LATENT_SHAPE = (2, 4, 3, 16, 18)
TEXT_SHAPE = (2, 5, 16)


def _tiny_wan(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    # skip_first=1 keeps layer 0 dense: both the dense and the SLA sequence-parallel cores are exercised
    apply_sla(model, PatchConfig(sla=SLAConfig(topk=0.5, negligible=0.25), skip_first=1))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a live linear branch (proj_l starts at zero) and a non-zero output projection
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    pred = model(batch["x"], batch["t"], batch["text"], return_dict=False)[0]
    loss = F.mse_loss(pred, batch["target"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_sp_grads(device: torch.device, seed: int, checkpointing: bool) -> None:
    torch.manual_seed(seed)
    batch = {"x": torch.randn(LATENT_SHAPE), "t": torch.rand(2) * 1000, "text": torch.randn(TEXT_SHAPE),
             "target": torch.randn(LATENT_SHAPE)}
    reference = _tiny_wan(seed)
    want_loss, want = _loss_and_grads(copy.deepcopy(reference), batch)

    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2))
    sharded = copy.deepcopy(reference)
    if checkpointing:  # the recomputed blocks must see the same valid length (216 of 256 padded tokens)
        sharded.enable_gradient_checkpointing()
    assert enable_wan_sequence_parallel(sharded, groups) == 2
    assert enable_wan_sequence_parallel(sharded, groups) == 0, "enabling twice must not hook twice"
    # the same names at every SP size: checkpoints move between SP sizes
    assert list(sharded.state_dict()) == list(reference.state_dict())
    got_loss, got = _loss_and_grads(sharded, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert got.keys() == want.keys()
    for name, grad in got.items():
        dist.all_reduce(grad, group=groups.sp_group)  # what ZeRO does over SP (then it averages over DP)
        scale = want[name].abs().max().clamp_min(1e-12)
        err = (grad - want[name]).abs().max() / scale
        assert err < 1e-4, f"{name}: SP=2 gradient differs from SP=1 by {err:.2e} of its max"
    # a copy (EMA, teacher) runs sharded over the same groups and predicts what the unsharded model does
    with torch.no_grad():
        clone = copy.deepcopy(sharded)
        assert clone.blocks[1].attn1.processor.parallel.attention is clone.blocks[1].attn1.sla
        torch.testing.assert_close(clone(batch["x"], batch["t"], batch["text"], return_dict=False)[0],
                                   reference(batch["x"], batch["t"], batch["text"], return_dict=False)[0],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_wan_sp2_gradients_equal_sp1(checkpointing):
    run_distributed(_check_sp_grads, 2, "cpu", random.randrange(1000), checkpointing)


def _check_disagreeing_lengths(device: torch.device) -> None:
    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2))
    model = _tiny_wan(0)
    enable_wan_sequence_parallel(model, groups)
    width = 18 if groups.sp_rank == 0 else 16
    with pytest.raises(ValueError, match=r"different token sequences \(rank 0: batch=2, frames=3, height=8, "
                                         r"width=9, tokens=216; rank 1: batch=2, frames=3, height=8, width=8, "
                                         r"tokens=192\)"):
        model(torch.randn(2, 4, 3, 16, width), torch.rand(2), torch.randn(TEXT_SHAPE))


def test_wan_sp_ranks_with_different_lengths_fail_with_both_lengths():
    run_distributed(_check_disagreeing_lengths, 2, "cpu")


def test_sp_needs_a_model_it_can_shard():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    groups = type("Groups", (), {"sp_size": 2})()
    with pytest.raises(ValueError, match="sequence_parallel_size=2 needs a LightningModule holding a VideoDiT or a "
                                         "diffusers WanTransformer3DModel; Sequential holds neither"):
        enable_module_sequence_parallel(module, groups)
