"""Block-aligned sequence sharding (sla_dist/parallel/sharding.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sla_dist.parallel import SequenceShard

from dist_utils import device_params, run_distributed


# A stand-in process group for layout arithmetic in this process, where torch.distributed is not initialised and
# no collective runs.
LAYOUT_ONLY = object()


@pytest.mark.parametrize(("seq_len", "world", "align", "padded", "valid"), [
    (1000, 4, 64, 1024, [256, 256, 256, 232]),
    (1024, 2, 128, 1024, [512, 512]),
    (200, 4, 128, 512, [128, 72, 0, 0]),
    (32760, 8, 128, 32768, [4096] * 7 + [4088]),
    (7, 1, 1, 7, [7]),
])
def test_layout(seq_len, world, align, padded, valid):
    shards = [SequenceShard(seq_len, world, rank, align, LAYOUT_ONLY) for rank in range(world)]
    assert all(s.padded_len == padded and s.local_len == padded // world for s in shards)
    assert [s.num_valid for s in shards] == valid
    assert [s.start for s in shards] == [r * padded // world for r in range(world)]
    masks = torch.cat([s.valid_mask() for s in shards])
    assert masks.tolist() == [True] * seq_len + [False] * (padded - seq_len)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(seq_len=0, world=2, rank=0), "seq_len=0"),
    (dict(seq_len=100.0, world=1, rank=0), "seq_len=100.0 must be an integer"),
    (dict(seq_len=True, world=1, rank=0), "seq_len=True must be an integer"),
    (dict(seq_len=10, world=2, rank=2), "rank=2 is not in"),
    (dict(seq_len=10, world=2, rank=0, align=0), "align=0"),
    (dict(seq_len=10, world=2, rank=1), "world=2 ranks needs their process group, got group=None"),
])
def test_invalid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceShard(**kwargs)


def test_wrong_lengths():
    shard = SequenceShard(100, 1, 0, align=64)
    with pytest.raises(ValueError, match="101 tokens along dim 1; this shard expects seq_len=100"):
        shard.split(torch.randn(2, 101, 3), dim=1)
    with pytest.raises(ValueError, match="100 tokens along dim 0; this shard holds local_len=128"):
        shard.gather(torch.randn(100, 3), dim=0)


def _split_gather(device: torch.device, seq_len: int) -> None:
    """split and gather invert each other and are each other's adjoint, on activations [B, L, C] and RoPE-like
    tables [L, C]; padding is zero and gets no gradient."""
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = SequenceShard.for_group(seq_len, dist.group.WORLD, align=64)
    torch.manual_seed(0)
    for x, dim in ((torch.randn(2, seq_len, 5, device=device), 1), (torch.randn(seq_len, 6, device=device), 0)):
        x.requires_grad_()
        piece = shard.split(x, dim)
        assert piece.shape[dim] == shard.local_len
        assert torch.equal(piece.narrow(dim, 0, shard.num_valid), x.detach().narrow(dim, shard.start, shard.num_valid))
        assert not piece.narrow(dim, shard.num_valid, shard.local_len - shard.num_valid).any()

        # Each rank weights its own piece: the gradient of the sum over ranks reaches the full x on every rank.
        weights = torch.randn(world, *piece.shape, generator=torch.Generator().manual_seed(1)).to(device)
        (piece * weights[rank]).sum().backward()
        expected = weights.movedim(0, dim).flatten(dim, dim + 1).narrow(dim, 0, seq_len)
        assert torch.equal(x.grad, expected)

        # A replicated computation on the gathered sequence sends each piece its own slice of the gradient.
        leaf = piece.detach().requires_grad_()
        whole = shard.gather(leaf, dim)
        assert torch.equal(whole, x.detach())
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
        (whole * upstream).sum().backward()
        assert torch.equal(leaf.grad, shard.split(upstream, dim))
    assert world == shard.world and rank == shard.rank
    with pytest.raises(ValueError, match=f"world={2 * world} but the process group has {world} ranks"):
        SequenceShard(seq_len, 2 * world, rank, 64, dist.group.WORLD)


@pytest.mark.parametrize("device", device_params(4))
def test_split_gather_four_ranks(device):
    run_distributed(_split_gather, 4, device, 1000)


@pytest.mark.parametrize("device", device_params(2))
def test_split_gather_two_ranks(device):
    run_distributed(_split_gather, 2, device, 100)
