"""Ulysses sequence-parallel SLA (sla_dist/parallel/ulysses.py) against single-process SLA on the full sequence."""

from __future__ import annotations

import copy

import pytest
import torch

from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups, SequenceParallelSLA, SequenceShard

from dist_utils import assert_close, check_matches_single_process, device_params, make_sla, run_distributed


def _check_block_maps(device: torch.device, world: int, heads: int, seq_len: int) -> None:
    """The block map each rank's SLA computes is the single-process layer's block map of the rank's heads, and the
    q/k/v it sees are exactly the full-sequence q/k/v of those heads (padding never reaches it)."""
    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=world))
    attn = make_sla(64, device, seed=3, topk=0.2, negligible=0.1)
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, heads, seq_len, 64, device=device) for _ in range(3))
    _, _, _, single = attn.branches(q, k, v)  # the single-process layer on the whole sequence and all heads

    seen, used = [], []
    attn.register_forward_pre_hook(lambda module, args: seen.append(args))
    prepare = attn._prepare

    def recording(*args):
        result = prepare(*args)
        used.append(result[3])
        return result

    # what both forward paths (proj_l in the kernel or as a module) call: records the block map the rank really used
    attn._prepare = recording
    shard = SequenceShard.for_group(seq_len, groups.sp_group)
    SequenceParallelSLA(attn, groups)(*(shard.split(x, 2) for x in (q, k, v)), seq_len=seq_len)

    mine = slice(groups.ulysses_rank * heads // world, (groups.ulysses_rank + 1) * heads // world)
    (q_seen, k_seen, v_seen), = seen
    for got, want in ((q_seen, q), (k_seen, k), (v_seen, v)):
        assert torch.equal(got, want[:, mine]), "SLA must see the unpadded full sequence of this rank's heads"
    (block_map,) = used
    assert (block_map.q_len, block_map.kv_len) == (single.q_len, single.kv_len) == (seq_len, seq_len)
    assert torch.equal(block_map.block_class, single.block_class[:, mine])
    assert torch.equal(block_map.kv_num_blocks, single.kv_num_blocks[:, mine])


def _check_heads_error(device: torch.device, world: int) -> None:
    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=world))
    layer = SequenceParallelSLA(make_sla(64, device, seed=0), groups)
    q = torch.randn(1, world + 1, 128, 64, device=device)
    with pytest.raises(ValueError, match=f"{world + 1} heads do not divide over ulysses_degree={world}"):
        layer(q, q, q)


def _check_deepcopy(device: torch.device) -> None:
    """A deep copy (EMA, frozen teacher) shares the process groups, owns its parameters and computes the same."""
    layer = SequenceParallelSLA(make_sla(64, device, seed=6), SequenceParallelGroups.build(SequenceParallelConfig(2)))
    clone = copy.deepcopy(layer)
    assert clone.groups is layer.groups
    assert clone.attention.proj_l.weight.data_ptr() != layer.attention.proj_l.weight.data_ptr()
    # the wrapper registers nothing: the SLA layer keeps its own (and its model's) parameter names
    assert not isinstance(layer, torch.nn.Module)
    q, k, v = (torch.randn(1, 2, 128, 64, device=device) for _ in range(3))
    assert torch.equal(clone(q, k, v), layer(q, k, v))


def _check_exchanges_agree(device: torch.device, world: int, batch: int, seq_len: int) -> None:
    """The fused exchange and DeepSpeed's give the same outputs and q/k/v/proj_l gradients, on the model's layout
    (shards of [B, L_local, H, D] buffers viewed as [B, H, L_local, D]); the fused one returns the gradients in
    the inputs' layout and the output as a [B, L_local, H, D] buffer, so the model's reshapes around it are views."""
    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=world))
    attn = make_sla(64, device, seed=7, topk=0.2, negligible=0.1)
    shard = SequenceShard.for_group(seq_len, groups.sp_group)
    torch.manual_seed(8)
    q, k, v, grad_out = (shard.split(torch.randn(batch, seq_len, 2 * world, 64, device=device), 1)
                         for _ in range(4))
    results, strides = {}, []
    for exchange in ("fused", "deepspeed"):
        attn.zero_grad()
        local = [x.detach().requires_grad_() for x in (q, k, v)]
        views = [x.transpose(1, 2) for x in local]
        if exchange == "fused":  # the gradients as the exchange returns them (a leaf's .grad takes the leaf's layout)
            for x in views:
                x.register_hook(lambda grad: strides.append(grad.stride()))
        out = SequenceParallelSLA(attn, groups, exchange)(*views, seq_len=seq_len)
        out.backward(grad_out.transpose(1, 2))
        results[exchange] = [out, *(x.grad for x in local), *(p.grad.clone() for p in attn.proj_l.parameters())]
    names = ("output", "dq", "dk", "dv", "proj_l.weight grad", "proj_l.bias grad")
    for name, fused, reference in zip(names, results["fused"], results["deepspeed"]):
        if device.type == "cpu":  # the same arithmetic on the same values: bit-equal
            assert torch.equal(fused, reference), f"{name}: fused and deepspeed exchanges differ"
        else:  # cuBLAS may choose its algorithms by layout
            assert_close(fused, reference, f"{name} (fused vs deepspeed exchange)")
    out = results["fused"][0]
    assert out.transpose(1, 2).is_contiguous(), f"output strides {out.stride()}: not a [B, L_local, H, D] buffer"
    assert strides == [views[0].stride()] * 3, f"gradient strides {strides} differ from the inputs' {views[0].stride()}"
    if shard.num_valid < shard.local_len:
        assert out[:, :, shard.num_valid:].abs().max().item() == 0, "padded positions must have zero output"


def _refuse_deepspeed(*args, **kwargs):
    raise AssertionError("the compiled fused exchange fell back to DeepSpeed's")


def _check_compiled_fused_exchange(device: torch.device, seq_len: int, overlap_chunks: int = 1) -> None:
    """Under torch.compile the fused exchange is traced whole (no graph break, DeepSpeed's exchange never called)
    and gives the eager fused exchange's output, output layout and q/k/v/proj_l gradients. ``overlap_chunks`` > 1
    pipelines the eager exchange and is ignored by the traced one."""
    groups = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2, overlap_chunks=overlap_chunks))
    attn = make_sla(64, device, seed=9, topk=0.3, negligible=0.1)
    shard = SequenceShard.for_group(seq_len, groups.sp_group)
    torch.manual_seed(10)
    q, k, v, grad_out = (shard.split(torch.randn(2, seq_len, 4, 64, device=device), 1) for _ in range(4))
    layer = SequenceParallelSLA(attn, groups)
    layer.distributed = _refuse_deepspeed
    torch._dynamo.reset()
    compiled = torch.compile(lambda *x: layer(*x, seq_len=seq_len), backend="aot_eager", fullgraph=True)
    results = []
    for run in (lambda *x: layer(*x, seq_len=seq_len), compiled):
        attn.zero_grad()
        local = [x.detach().requires_grad_() for x in (q, k, v)]
        out = run(*(x.transpose(1, 2) for x in local))
        out.backward(grad_out.transpose(1, 2))
        results.append([out, *(x.grad for x in local), *(p.grad.clone() for p in attn.proj_l.parameters())])
    names = ("output", "dq", "dk", "dv", "proj_l.weight grad", "proj_l.bias grad")
    for name, got, want in zip(names, results[1], results[0]):
        assert_close(got, want, f"{name} (compiled vs eager fused exchange, seq_len={seq_len})")
    out = results[1][0]
    assert out.transpose(1, 2).is_contiguous(), f"output strides {out.stride()}: not a [B, L_local, H, D] buffer"
    if shard.num_valid < shard.local_len:
        assert out[:, :, shard.num_valid:].abs().max().item() == 0, "padded positions must have zero output"


@pytest.mark.parametrize("device", device_params(2))
def test_compiled_fused_exchange(device):
    run_distributed(_compiled_fused_exchange, 2, device)


def _compiled_fused_exchange(device: torch.device) -> None:
    _check_compiled_fused_exchange(device, seq_len=1000)  # the second shard holds 24 padded tokens
    _check_compiled_fused_exchange(device, seq_len=100)  # the second shard holds nothing but padding
    _check_compiled_fused_exchange(device, seq_len=1000, overlap_chunks=2)  # eager: one head per chunk


def _two_ranks(device: torch.device) -> None:
    ulysses = SequenceParallelConfig(sp_size=2)
    # odd length: 1000 tokens padded to 1024, the second shard holds 24 padded tokens; both exchanges
    for exchange in ("fused", "deepspeed"):
        check_matches_single_process(device, ulysses, batch=2, heads=4, seq_len=1000, topk=0.2, negligible=0.1,
                                     exchange=exchange)
    _check_exchanges_agree(device, 2, batch=2, seq_len=1000)
    _check_exchanges_agree(device, 2, batch=1, seq_len=1024)  # one sample, no padding: the output is sent in place
    # no padding; the paper's other linear scope and feature map
    check_matches_single_process(device, ulysses, batch=1, heads=2, seq_len=1024, topk=0.25, negligible=0.25,
                                 linear_scope="all", feature_map="elu")
    # the fused kernels (Triton's interpreter on CPU) reading the exchanged [B, L, H/P, D] buffers in place
    check_matches_single_process(device, ulysses, batch=1, heads=2, seq_len=456, topk=0.3, negligible=0.2,
                                 backend="triton")
    _check_block_maps(device, 2, heads=4, seq_len=1000)
    _check_heads_error(device, 2)
    _check_deepcopy(device)


def _four_ranks(device: torch.device) -> None:
    ulysses = SequenceParallelConfig(sp_size=4)
    # 1000 tokens over 4 ranks: shards of 256, the last with 232 valid tokens; block_q 128
    check_matches_single_process(device, ulysses, batch=1, heads=4, seq_len=1000, topk=0.2, negligible=0.1, BLKQ=128)
    # a short sequence: ranks 2 and 3 hold nothing but padding
    check_matches_single_process(device, ulysses, batch=1, heads=8, seq_len=200, topk=0.3, negligible=0.0,
                                 feature_map="relu")
    _check_block_maps(device, 4, heads=8, seq_len=1000)
    _check_heads_error(device, 4)
    _check_exchanges_agree(device, 4, batch=1, seq_len=200)  # ranks 2 and 3 hold nothing but padding


@pytest.mark.parametrize("device", device_params(2))
def test_ulysses_two_ranks(device):
    run_distributed(_two_ranks, 2, device)


@pytest.mark.parametrize("device", device_params(4))
def test_ulysses_four_ranks(device):
    run_distributed(_four_ranks, 4, device)


@pytest.mark.parametrize("seq_len", [100.0, True, 0, 129])
def test_seq_len_must_be_an_integer_in_range(seq_len):
    """One process, sp_size 1: a [1, 2, 128, 64] shard holds at most 128 valid tokens."""
    layer = SequenceParallelSLA(make_sla(64, torch.device("cpu"), seed=0),
                                SequenceParallelGroups.build(SequenceParallelConfig()))
    q = torch.randn(1, 2, 128, 64)
    with pytest.raises(ValueError, match=rf"seq_len={seq_len!r} must be an integer in \(0, 128\]"):
        layer(q, q, q, seq_len=seq_len)


def test_exchange_must_be_known():
    with pytest.raises(ValueError, match=r"exchange='nccl' is not one of \('fused', 'deepspeed'\)"):
        SequenceParallelSLA(make_sla(64, torch.device("cpu"), seed=0),
                            SequenceParallelGroups.build(SequenceParallelConfig()), exchange="nccl")
