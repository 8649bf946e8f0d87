"""Sequence-parallel SLA: a Ulysses all-to-all around SLA on the full sequence (or around context parallel).

Each rank of the SP group holds a contiguous, tail-padded shard of the sequence with every head (see sharding.py).
An all-to-all over the Ulysses group (U ranks) exchanges [B, L/U, H, D] for [B, L, H/U, D], the local attention runs
on the whole sequence for H/U heads, and the reverse exchange restores the shards; the backward is the same
collective reversed. Two implementations of the exchange (``exchange=``):

* ``"fused"`` (default): q, k and v cross in one all-to-all and the output in another (exchange.py); only the
  other ranks' pieces travel, this rank's own is copied across while the collective runs. With
  ``SequenceParallelConfig.overlap_chunks`` C > 1 each rank's heads are exchanged and attended in C chunks,
  pipelined: the exchanges of one chunk run while another attends. Under torch.compile the same exchange is traced
  as functional collectives (every piece travels; the compiler fuses the packing copies), unchunked.
* ``"deepspeed"``: DeepSpeed's ``DistributedAttention``, one all-to-all per tensor with its own permute copies; eager
  only: compiled, it gave wrong gradients on two H200s (NCCL), and ``apply_compile`` refuses it.

Because the padding sits at the tail of the global sequence, after the exchange the valid tokens are exactly the
prefix ``[:seq_len]``: SLA runs on that prefix (a strided view, no copy), so padded tokens never reach pooling, the
block scores, the softmax or the linear sums, and each head's block map is bit-for-bit the single-GPU one. The
output is zero-padded back (the fused exchange sends no padded rows and zero-fills them where they arrive), so padded
positions get zero outputs and zero gradients.

With ``ring_degree > 1`` (hybrid layout) the exchange yields this ring rank's chunk of the sequence rather than the
whole of it, and context parallel (context.py) runs across the ring group instead of plain SLA.
"""

from __future__ import annotations

import copy

import torch

from ..attention import SparseLinearAttention
from .context import context_parallel_sla
from .exchange import fused_ulysses
from .groups import SequenceParallelGroups, ensure_deepspeed_comm, group_size
from .sharding import pad_along, valid_length

EXCHANGES = ("fused", "deepspeed")
"""Implementations of the Ulysses all-to-all (see the module docstring)."""


class SequenceParallelSLA:
    """SLA over a sequence sharded across the SP group of ``groups``: wraps an SLA layer without becoming a module.

    Args:
        attention: the layer's SLA module; its parameters (``proj_l``), settings and hooks are used unchanged. It is
            *not* registered here (this object is no ``nn.Module``): the SLA layer stays wherever it sits in the
            model (e.g. ``block.self_attn.core``, run through ``SelfAttention.parallel``), so parameter and
            state_dict names are those of the unsharded model at every SP size, and checkpoints move between them.
        groups: the process groups; ``ulysses_degree`` must divide the head count.
        exchange: the Ulysses all-to-all, one of ``EXCHANGES``: ``"fused"`` (one collective for q, k, v) or
            ``"deepspeed"`` (DeepSpeed's DistributedAttention). Both give the same results eagerly; under
            torch.compile only the fused one is supported (``apply_compile`` refuses the other). The fused one
            pipelines its exchange with the attention in ``groups.config.overlap_chunks`` chunks of heads (eager
            only); DeepSpeed's cannot, and takes only ``overlap_chunks=1``.

    ``forward(q, k, v, seq_len)`` (also ``self(...)``) takes this rank's shard [B, H, L_local, D] (all heads) of a
    sequence with ``seq_len`` valid tokens (default: no padding, ``L_local * sp_size``) and returns the output shard
    of the same shape, zero on padded positions. Under pure Ulysses the SLA layer is called as a module on its heads'
    whole (unpadded) sequence, so its forward hooks see exactly what a single GPU would give those heads (one call
    per chunk of heads with ``overlap_chunks`` > 1; hooks that collect per call, such as SLACallback's measurements
    and calibration's statistics, combine the calls).
    """

    def __init__(self, attention: SparseLinearAttention, groups: SequenceParallelGroups,
                 exchange: str = "fused") -> None:
        if not isinstance(attention, SparseLinearAttention):
            raise TypeError(f"SequenceParallelSLA wraps a SparseLinearAttention, not {type(attention).__name__}")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}")
        if exchange == "deepspeed" and groups.config.overlap_chunks > 1:
            raise ValueError(f"overlap_chunks={groups.config.overlap_chunks} needs exchange='fused': DeepSpeed's "
                             "exchange runs all heads at once")
        self.attention = attention
        self.groups = groups
        self.exchange = exchange
        self.ulysses_group = groups.ulysses_group if groups.ulysses_degree > 1 else None
        self.ring_group = groups.ring_group if groups.ring_degree > 1 else None
        if self.ulysses_group is not None:
            from deepspeed.sequence.layer import DistributedAttention

            ensure_deepspeed_comm()
            # batch-first [B, L, H, D]: scatter heads (dim 2), gather the sequence (dim 1). The local attention is a
            # bound method and DistributedAttention has no parameters of its own.
            self.distributed = DistributedAttention(self._local_attention, self.ulysses_group, scatter_idx=2,
                                                    gather_idx=1)

    def __deepcopy__(self, memo: dict) -> "SequenceParallelSLA":
        """Copies (an EMA or teacher model) wrap the copy of the SLA layer (the same one the copied model holds,
        through ``memo``) but share the process groups, which are handles to this process's communicators and
        cannot be copied."""
        clone = type(self)(copy.deepcopy(self.attention, memo), self.groups, self.exchange)
        memo[id(self)] = clone
        return clone

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        g = self.groups
        return (f"sp_size={g.sp_size}, ulysses_degree={g.ulysses_degree}, ring_degree={g.ring_degree}, "
                f"exchange={self.exchange!r}, overlap_chunks={g.config.overlap_chunks}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        if not (q.dim() == 4 and q.shape == k.shape == v.shape):
            raise ValueError(f"q, k, v must be equal [B, H, L_local, D] shards; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        heads, local_len = q.shape[1], q.shape[2]
        ulysses = group_size(self.ulysses_group)
        if heads % ulysses:
            raise ValueError(f"{heads} heads do not divide over ulysses_degree={ulysses}; choose a ulysses_degree "
                             f"that divides the head count and give the rest of sp_size={self.groups.sp_size} to "
                             f"ring_degree (context parallel)")
        seq_len = valid_length(seq_len, local_len, self.groups.sp_size)
        if self.ulysses_group is None:
            return self._attend(q, k, v, seq_len)
        if self.exchange == "fused":
            return fused_ulysses(self.ulysses_group, q, k, v, lambda *qkv: self._attend_valid(*qkv, seq_len),
                                 self.groups.config.overlap_chunks)
        out = self.distributed(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, seq_len=seq_len)
        return out.transpose(1, 2)

    def _local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Called by DistributedAttention between the exchanges, on [B, L_chunk, H/U, D]."""
        out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seq_len)
        return out.transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Attention of this rank's heads over its (ring) chunk [B, h, L_chunk, D] of the padded sequence."""
        return pad_along(self._attend_valid(q, k, v, seq_len), 2, q.shape[2])

    def _attend_valid(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``_attend`` without the zero padding: the output [B, h, n, D] over the chunk's first n tokens, n the valid
        ones (all of them under context parallel, whose padded rows are zero already)."""
        if self.ring_group is not None:
            return context_parallel_sla(self.attention, q, k, v, seq_len, self.ring_group)
        if seq_len == q.shape[2]:
            return self.attention(q, k, v)
        return self.attention(q[:, :, :seq_len], k[:, :, :seq_len], v[:, :, :seq_len])
