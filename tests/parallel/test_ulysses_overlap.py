"""The fused Ulysses exchange pipelined in chunks of heads (SequenceParallelConfig.overlap_chunks): the same results
as one chunk and as one process, and each chunk's exchanges in flight while another chunk attends."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups, SequenceParallelSLA, SequenceShard
from sla_dist.parallel.exchange import fused_ulysses

from dist_utils import assert_close, check_matches_single_process, device_params, make_sla, run_distributed

HEADS, SEQ_LEN, HEAD_DIM = 12, 999, 32
"""12 heads over 2 ranks: 6 per rank, in 1, 2 or 3 chunks; 999 tokens: shards of 512, the second with 487 valid."""


def _run(layer: SequenceParallelSLA, local: list[torch.Tensor], grad: torch.Tensor,
         checkpointed: bool = False) -> list[torch.Tensor]:
    """Output, dq, dk, dv and the proj_l weight and bias gradients of one forward and backward."""
    layer.attention.zero_grad()
    inputs = [x.detach().requires_grad_() for x in local]
    if checkpointed:
        out = checkpoint(layer, *inputs, seq_len=SEQ_LEN, use_reentrant=False)
    else:
        out = layer(*inputs, seq_len=SEQ_LEN)
    out.backward(grad)
    return [out.detach(), *(x.grad for x in inputs), *(p.grad.clone() for p in layer.attention.proj_l.parameters())]


def _check_same_as_one_chunk(device: torch.device) -> None:
    """Every head's SLA is the same computation whatever the chunking: output and q/k/v gradients equal one chunk's
    (bit for bit on CPU), proj_l's gradient, summed over the chunks' heads in another order, to rounding. Also
    under non-reentrant activation checkpointing, whose recompute issues its exchanges inside the backward."""
    attn = make_sla(HEAD_DIM, device, seed=0, topk=0.2, negligible=0.1)
    shard = SequenceShard.for_group(SEQ_LEN, SequenceParallelGroups.build(SequenceParallelConfig(2)).sp_group)
    torch.manual_seed(1)
    # the model's layout: shards of [B, L, H, D] buffers viewed as [B, H, L_local, D]
    local = [shard.split(torch.randn(2, SEQ_LEN, HEADS, HEAD_DIM, device=device), 1).transpose(1, 2)
             for _ in range(4)]

    def layer(chunks: int) -> SequenceParallelSLA:
        return SequenceParallelSLA(attn, SequenceParallelGroups.build(SequenceParallelConfig(2, overlap_chunks=chunks)))

    reference = _run(layer(1), local[:3], local[3])
    for chunks, checkpointed in ((2, False), (3, False), (3, True)):
        got = _run(layer(chunks), local[:3], local[3], checkpointed)
        what = f"overlap_chunks={chunks}{' checkpointed' if checkpointed else ''}"
        for name, x, ref in zip(("output", "dq", "dk", "dv"), got, reference):
            if device.type == "cpu":
                assert torch.equal(x, ref), f"{what}: {name} differs from one chunk by {(x - ref).abs().max()}"
            else:
                assert_close(x, ref, f"{what}: {name}")
        assert got[0].transpose(1, 2).is_contiguous(), f"{what}: output strides {got[0].stride()}"
        assert all(x.stride() == local[0].stride() for x in got[1:4]), f"{what}: gradient strides differ"
        for name, x, ref in zip(("proj_l.weight", "proj_l.bias"), got[4:], reference[4:]):
            assert_close(x, ref, f"{what}: {name} grad")


class _Mark(torch.autograd.Function):
    """Identity that records ``name`` when the forward and when the backward passes it."""

    @staticmethod
    def forward(ctx, events: list, name: str, *xs: torch.Tensor):
        ctx.events, ctx.name = events, name
        events.append(name)
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.events.append(f"{ctx.name} grad")
        return None, None, *grads


class _Recorder:
    """Patches ``dist.all_to_all_single`` to record each collective's start and wait, by start index, beside the
    marks. On gloo the collectives run on worker threads, so what the calling thread runs between a start and its
    wait overlaps the transfer, as the compute stream does NCCL's."""

    def __init__(self) -> None:
        self.events: list = []
        self.count = 0
        self._real = dist.all_to_all_single

    def __enter__(self) -> "_Recorder":
        dist.all_to_all_single = self._all_to_all
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._real

    def _all_to_all(self, *args, **kwargs):
        index, self.count = self.count, self.count + 1
        self.events.append(("start", index))
        work, events = self._real(*args, **kwargs), self.events

        class Recorded:
            def wait(self):
                events.append(("wait", index))
                return work.wait()

        return Recorded()

    def waits(self) -> list[int]:
        return [e[1] for e in self.events if isinstance(e, tuple) and e[0] == "wait"]

    def hidden(self) -> int:
        """How many collectives had a whole attention pass (forward or backward) between their start and wait."""
        total = 0
        for index in range(self.count):
            window = self.events[self.events.index(("start", index)):self.events.index(("wait", index))]
            marks = [e for e in window if isinstance(e, str)]
            passes = (("inputs", "output"), ("output grad", "inputs grad"))  # forward, backward
            total += any(a in marks and b in marks[marks.index(a):] for a, b in passes)
        return total


def _check_overlap(device: torch.device) -> None:
    """Per chunk, four collectives (q|k|v, output, and their gradients): all but the first of each kind wait with
    another chunk's attention (forward or backward) between their start and their wait, and the collectives are
    waited for in the order they were started (NCCL runs them in that order: a later one waited for first would
    leave the compute stream idle behind an earlier one)."""
    group = SequenceParallelGroups.build(SequenceParallelConfig(2)).ulysses_group
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, HEADS, 256, HEAD_DIM, device=device, requires_grad=True) for _ in range(3))
    for chunks in (1, 2, 3):
        recorder = _Recorder()

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = _Mark.apply(recorder.events, "inputs", q, k, v)
            (out,) = _Mark.apply(recorder.events, "output", F.scaled_dot_product_attention(q, k, v))
            return out

        with recorder:
            fused_ulysses(group, q, k, v, attend, chunks).sum().backward()
        assert recorder.count == 4 * chunks, recorder.events
        assert recorder.waits() == list(range(4 * chunks)), recorder.events
        assert recorder.hidden() == 4 * (chunks - 1), recorder.events


def _check_errors(device: torch.device) -> None:
    layer = SequenceParallelSLA(make_sla(HEAD_DIM, device, seed=0),
                                SequenceParallelGroups.build(SequenceParallelConfig(2, overlap_chunks=4)))
    q = torch.randn(1, HEADS, 64, HEAD_DIM, device=device)
    with pytest.raises(ValueError, match=r"overlap_chunks=4 does not divide the 6 heads each rank attends to "
                                         r"\(12 heads over ulysses_degree=2\); choose a divisor of 6"):
        layer(q, q, q)


def _two_ranks(device: torch.device) -> None:
    # chunked against one process (and the padded tail's zero output and gradient)
    for chunks in (2, 3):
        check_matches_single_process(device, SequenceParallelConfig(2, overlap_chunks=chunks), batch=2,
                                     heads=HEADS, seq_len=SEQ_LEN, head_dim=HEAD_DIM, topk=0.2, negligible=0.1)
    # 100 tokens: the second shard holds nothing but padding (it sends no output rows, receives only zeros)
    check_matches_single_process(device, SequenceParallelConfig(2, overlap_chunks=3), batch=1, heads=HEADS,
                                 seq_len=100, head_dim=HEAD_DIM, topk=0.3, negligible=0.0)
    _check_same_as_one_chunk(device)
    _check_overlap(device)
    _check_errors(device)


@pytest.mark.parametrize("device", device_params(2))
def test_overlap_two_ranks(device):
    run_distributed(_two_ranks, 2, device)


@pytest.mark.parametrize("chunks", [0, -1, 1.5, True, "2"])
def test_overlap_chunks_must_be_a_positive_integer(chunks):
    with pytest.raises(ValueError, match=f"overlap_chunks={chunks!r} must be an integer of at least 1"):
        SequenceParallelConfig(overlap_chunks=chunks)


def test_overlap_needs_the_fused_exchange():
    groups = SequenceParallelGroups.build(SequenceParallelConfig(overlap_chunks=2))
    with pytest.raises(ValueError, match="overlap_chunks=2 needs exchange='fused'"):
        SequenceParallelSLA(make_sla(HEAD_DIM, torch.device("cpu"), seed=0), groups, exchange="deepspeed")
