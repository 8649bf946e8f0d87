"""Block-aligned split and gather of token sequences across a sequence-parallel group, with tail padding.

A sequence of ``seq_len`` valid tokens is padded at its tail to ``padded_len``, the next multiple of
``world * align``, and cut into ``world`` equal contiguous pieces, piece i on rank i. Padding only at the tail keeps
every valid token at its global position, so after a Ulysses all-to-all the valid tokens are exactly the prefix
``[:seq_len]`` and SLA can run on that prefix unchanged; aligned pieces mean no SLA block straddles two ranks.

The same :class:`SequenceShard` splits q/k/v activations, RoPE tables and per-token conditioning, so they always
line up. Video token counts rarely divide evenly (32760 = 21 x 30 x 52 for Wan 480p), so the last ranks usually hold
some padding; :meth:`SequenceShard.valid_mask` says which local tokens are real (e.g. for a masked loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import check_int, is_int
from ..kernels.block_map import num_blocks
from .groups import group_rank, group_size

DEFAULT_ALIGN = 128
"""Tokens per aligned unit: a multiple of every supported SLA block size (block_q 64/128, block_k 64)."""


@dataclass(frozen=True)
class SequenceShard:
    """Where one rank's piece of a padded token sequence lies."""

    seq_len: int
    """Valid tokens in the full sequence."""

    world: int
    """Ranks the sequence is split over."""

    rank: int
    """This rank's index among them; it holds tokens [start, start + local_len) of the padded sequence."""

    align: int = DEFAULT_ALIGN
    """Each piece is a multiple of this many tokens (use a multiple of the SLA block sizes for context parallel)."""

    group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    """The process group of the ``world`` ranks; needed by :meth:`gather` and by the backward of :meth:`split`."""

    def __post_init__(self) -> None:
        check_int("seq_len", self.seq_len, 1)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank={self.rank} is not in [0, world={self.world})")
        if self.align < 1:
            raise ValueError(f"align={self.align} must be at least 1")
        if self.world > 1:
            if self.group is None:
                raise ValueError(f"a shard over world={self.world} ranks needs their process group, got group=None "
                                 "(use SequenceShard.for_group)")
            if dist.is_available() and dist.is_initialized() and group_size(self.group) != self.world:
                raise ValueError(f"world={self.world} but the process group has {group_size(self.group)} ranks")

    @classmethod
    def for_group(cls, seq_len: int, group: dist.ProcessGroup | None, align: int = DEFAULT_ALIGN) -> "SequenceShard":
        return cls(seq_len, group_size(group), group_rank(group), align, group)

    @property
    def padded_len(self) -> int:
        unit = self.world * self.align
        return num_blocks(self.seq_len, unit) * unit

    @property
    def local_len(self) -> int:
        return self.padded_len // self.world

    @property
    def start(self) -> int:
        return self.rank * self.local_len

    @property
    def num_valid(self) -> int:
        """Valid tokens in this rank's piece (0 when the whole piece is padding)."""
        return min(max(self.seq_len - self.start, 0), self.local_len)

    def valid_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[local_len] bool: True where this rank's token is real, False on tail padding."""
        return torch.arange(self.start, self.start + self.local_len, device=device) < self.seq_len

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's piece of ``x`` (the full ``seq_len`` sequence along ``dim``, the same on every rank of the
        group), zero-padded at the tail. Its gradient is all-gathered back to the full sequence."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim}; this shard expects seq_len={self.seq_len}")
        return _Split.apply(x, dim, self)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The full ``seq_len`` sequence from every rank's piece ``x`` (padding dropped), the same on every rank.
        The downstream computation is taken to be replicated across the group, so the gradient of this rank's piece
        is its slice of the full gradient."""
        if x.shape[dim] != self.local_len:
            raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim}; this shard holds local_len="
                             f"{self.local_len}")
        return _Gather.apply(x, dim, self)

    def pad_to_padded(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` with ``seq_len`` tokens along ``dim`` zero-padded at the tail to ``padded_len``."""
        return pad_along(x, dim, self.padded_len)

    def local_piece(self, padded: torch.Tensor, dim: int) -> torch.Tensor:
        return padded.narrow(dim, self.start, self.local_len)


def valid_length(seq_len: object, local_len: int, sp_size: int) -> int:
    """The valid token count of a sequence held as shards of ``local_len`` tokens over ``sp_size`` ranks (None: no
    padding, every token); ValueError naming the value unless it is an integer in (0, local_len * sp_size]."""
    padded_len = local_len * sp_size
    if seq_len is None:
        return padded_len
    if not is_int(seq_len) or not 0 < seq_len <= padded_len:
        raise ValueError(f"seq_len={seq_len!r} must be an integer in (0, {padded_len}] for shards of {local_len} "
                         f"tokens over sp_size={sp_size}")
    return seq_len


def pad_along(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero-pad ``x`` at the tail of ``dim`` to ``length`` (a no-op when it is already that long)."""
    extra = length - x.shape[dim]
    if extra < 0:
        raise ValueError(f"cannot pad {x.shape[dim]} tokens down to {length}")
    if extra == 0:
        return x
    dim = dim % x.dim()
    return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, extra))


def all_gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate equal-shaped ``x`` from every rank of ``group`` along ``dim``, in rank order (no autograd)."""
    world = group_size(group)
    if world == 1:
        return x
    if group is None:
        raise ValueError(f"a group of {world} ranks needs a process group to gather over")
    front = x.movedim(dim, 0).contiguous()
    pieces = [torch.empty_like(front) for _ in range(world)]
    dist.all_gather(pieces, front, group=group)
    return torch.cat(pieces, 0).movedim(0, dim)


def check_same_sequence(group: dist.ProcessGroup | None, device: torch.device | str, **sizes: int) -> None:
    """Raise ValueError on every rank of ``group`` unless all of them were given the same ``sizes`` (a few ints
    describing the token sequence, e.g. batch and token grid), naming each rank's values.

    Call it before the first sequence-parallel collective of a forward: ranks holding different sequences would
    otherwise enter all-to-alls of different sizes, which hangs (NCCL) or fails far from the cause. It is one
    all-gather of ``len(sizes)`` ints and a host sync per call. It cannot be skipped for shapes seen before: a rank
    skipping it while a peer (with a new shape) runs it would pair the peer's all-gather with its all-to-all."""
    if group_size(group) == 1:
        return
    mine = torch.tensor([list(sizes.values())], dtype=torch.int64, device=device)
    table = all_gather_along(mine, 0, group).tolist()
    if any(row != table[0] for row in table):
        per_rank = "; ".join(f"rank {r}: " + ", ".join(f"{k}={v}" for k, v in zip(sizes, row))
                             for r, row in zip(dist.get_process_group_ranks(group), table))
        raise ValueError(f"the ranks of a sequence-parallel group were given different token sequences ({per_rank}); "
                         "every rank of an SP group must run the same samples")


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, shard: SequenceShard) -> torch.Tensor:
        ctx.dim, ctx.shard = dim, shard
        return shard.local_piece(shard.pad_to_padded(x, dim), dim).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard: SequenceShard = ctx.shard
        full = all_gather_along(grad, ctx.dim, shard.group)
        return full.narrow(ctx.dim, 0, shard.seq_len), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, shard: SequenceShard) -> torch.Tensor:
        ctx.dim, ctx.shard = dim, shard
        return all_gather_along(x, dim, shard.group).narrow(dim, 0, shard.seq_len).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard: SequenceShard = ctx.shard
        return shard.local_piece(shard.pad_to_padded(grad, ctx.dim), ctx.dim).contiguous(), None, None
