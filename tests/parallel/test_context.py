"""SLA-aware context parallel (sla_dist/parallel/context.py), alone and under Ulysses (hybrid layout)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sla_dist import predict_block_map
from sla_dist.kernels.block_map import MARGINAL
from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups, SequenceShard
from sla_dist.parallel.context import ChunkLayout, FetchPlan, global_block_class

from dist_utils import check_matches_single_process, device_params, run_distributed


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(seq_len=100, world=2, rank=0, chunk=96, block_q=64, block_k=64), "chunks of 96 tokens are not aligned"),
    (dict(seq_len=300, world=2, rank=0, chunk=128, block_q=64, block_k=64), r"seq_len=300 must lie in \(0, 256\]"),
])
def test_layout_invalid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChunkLayout(**kwargs)


def test_layout_blocks():
    layouts = [ChunkLayout(1000, 4, rank, 256, 128, 64) for rank in range(4)]
    assert [x.n_valid for x in layouts] == [256, 256, 256, 232]
    assert [x.nq_local for x in layouts] == [2, 2, 2, 2]
    assert (layouts[0].nk, layouts[0].last_len, layouts[0].k_blocks_per_rank) == (16, 40, 4)


def test_rows_to_send_reads_only_requested_blocks():
    """The k|v rows sent are the requested blocks of k and v side by side, also from strided [B, L, h, D] views."""
    torch.manual_seed(0)
    layout = ChunkLayout(seq_len=500, world=1, rank=0, chunk=512, block_q=64, block_k=64)
    q, k, v = (torch.randn(2, 512, 3, 32).transpose(1, 2) for _ in range(3))
    block_class = global_block_class(q[:, :, :500], k[:, :, :500], layout, 0.2, 0.1, None)
    plan = FetchPlan.build(block_class, layout, fetch_negligible=False, group=None)
    assert 0 < plan.requested.numel() < 2 * 3 * layout.k_blocks_per_rank
    want = torch.cat([k, v], -1).reshape(-1, 64, 64)[plan.requested]
    assert torch.equal(plan.rows_to_send(k, v, layout), want)


def _check_block_maps(device: torch.device, seq_len: int, topk: float, negligible: float) -> None:
    """Each rank's classification of its query blocks is the single-GPU one; the fetch is a strict subset."""
    group, rank = dist.group.WORLD, dist.get_rank()
    torch.manual_seed(5)
    q, k = (torch.randn(2, 3, seq_len, 64, device=device) for _ in range(2))
    shard = SequenceShard.for_group(seq_len, group)
    layout = ChunkLayout(seq_len, shard.world, rank, shard.local_len, 64, 64)
    n = layout.n_valid
    mine = global_block_class(shard.split(q, 2)[:, :, :n], shard.split(k, 2)[:, :, :n], layout, topk, negligible,
                              group)
    want = predict_block_map(q, k, topk=topk, negligible=negligible, block_q=64, block_k=64).block_class
    first = shard.start // 64
    assert torch.equal(mine, want[:, :, first : first + layout.nq_local])

    plan = FetchPlan.build(mine, layout, fetch_negligible=True, group=group)
    fetched = torch.tensor(sum(plan.send_counts), device=device)
    dist.all_reduce(fetched)
    assert 0 < fetched.item() < 2 * 3 * layout.nk * shard.world, "must fetch some, not all, kv blocks"
    taken = (plan.compact_class != MARGINAL).sum()
    assert taken == (mine != MARGINAL).sum(), "every critical and negligible pair has a slot"


def _two_ranks(device: torch.device) -> None:
    ring = SequenceParallelConfig(sp_size=2, ulysses_degree=1)
    # 1000 tokens: the second chunk holds 488 valid tokens and the partial last key block (40 keys)
    check_matches_single_process(device, ring, batch=2, heads=2, seq_len=1000, topk=0.2, negligible=0.1)
    check_matches_single_process(device, ring, batch=1, heads=1, seq_len=1024, topk=0.1, negligible=0.3,
                                 linear_scope="all", feature_map="elu", BLKQ=128)
    check_matches_single_process(device, ring, batch=1, heads=2, seq_len=700, topk=0.3, negligible=0.2,
                                 linear_scope="none")
    # the fused kernels (Triton's interpreter on CPU) on the compact key sequence, whose last block is partial
    check_matches_single_process(device, ring, batch=1, heads=1, seq_len=456, topk=0.3, negligible=0.2,
                                 backend="triton")
    _check_block_maps(device, 1000, topk=0.2, negligible=0.1)


def _four_ranks(device: torch.device) -> None:
    ring = SequenceParallelConfig(sp_size=4, ulysses_degree=1)
    # 1000 tokens over 4 ranks, one head (heads < P: Ulysses alone cannot split it)
    check_matches_single_process(device, ring, batch=1, heads=1, seq_len=1000, topk=0.2, negligible=0.1)
    # 200 tokens: ranks 2 and 3 hold only padding yet take part in every collective
    check_matches_single_process(device, ring, batch=1, heads=2, seq_len=200, topk=0.5, negligible=0.25,
                                 feature_map="relu")
    # hybrid: Ulysses pairs exchange heads (by either all-to-all), the two ring ranks split the sequence
    hybrid = SequenceParallelConfig(sp_size=4, ulysses_degree=2)
    for exchange in ("fused", "deepspeed"):
        check_matches_single_process(device, hybrid, batch=1, heads=2, seq_len=1000, topk=0.2, negligible=0.1,
                                     exchange=exchange)
    # the fused exchange pipelined in two chunks of each Ulysses rank's 2 heads, context parallel per chunk
    check_matches_single_process(device, SequenceParallelConfig(sp_size=4, ulysses_degree=2, overlap_chunks=2),
                                 batch=1, heads=4, seq_len=1000, topk=0.2, negligible=0.1)
    _check_block_maps(device, 1000, topk=0.15, negligible=0.1)


@pytest.mark.parametrize("device", device_params(2))
def test_context_parallel_two_ranks(device):
    run_distributed(_two_ranks, 2, device)


@pytest.mark.parametrize("device", device_params(4))
def test_context_parallel_four_ranks(device):
    run_distributed(_four_ranks, 4, device)
