"""Block-map prediction: pooling, block scores and the critical / marginal / negligible split.

Notation (per batch b and head h): Lq queries are cut into Nq = ceil(Lq / block_q) query blocks and Lk keys into
Nk = ceil(Lk / block_k) key blocks (Lq == Lk for self-attention); the last block of each may be partial. For query block i and key block j:

    qbar_i = mean of the valid rows of Q in block i
    kbar_j = mean of the valid rows of (K - mean over all keys of K) in block j        ("smooth-K")
    s_ij   = qbar_i . kbar_j / sqrt(D)

Per query block, key blocks are ranked by s_ij (ties go to the lower index); the top n_c are critical, the bottom
n_n negligible, the rest marginal:

    n_c = min(Nk, max(1, floor(topk * Nk + 1e-6)))      (never zero)
    n_n = min(Nk - n_c, floor(negligible * Nk + 1e-6))

The result is a :class:`BlockMap` whose names follow FlexAttention's BlockMask: ``kv_num_blocks`` / ``kv_indices``
list the critical key blocks of each query block (the forward and dQ walk these); ``q_num_blocks`` / ``q_indices``
list, for each key block, the query blocks that chose it (dK/dV walk these). ``block_class`` holds the full
classification that the linear branch needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import validate_fractions

NEGLIGIBLE, MARGINAL, CRITICAL = 0, 1, 2


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def block_counts(nk: int, topk: float, negligible: float) -> tuple[int, int]:
    """(n_c, n_n): critical and negligible key blocks per query block out of ``nk``."""
    validate_fractions(topk, negligible)
    n_c = min(nk, max(1, math.floor(topk * nk + 1e-6)))
    n_n = min(nk - n_c, math.floor(negligible * nk + 1e-6))
    return n_c, n_n


@dataclass(frozen=True)
class BlockMap:
    """Which key blocks each query block attends to exactly, linearly, or not at all.

    Shapes (B batch, H heads, Nq query blocks, Nk key blocks, W = the widest critical list):
        block_class   [B, H, Nq, Nk] int8   CRITICAL / MARGINAL / NEGLIGIBLE
        kv_num_blocks [B, H, Nq]     int32  critical key blocks per query block
        kv_indices    [B, H, Nq, W]  int32  their indices, ascending; entries past kv_num_blocks are unspecified
    """

    block_class: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_len: int
    kv_len: int
    block_q: int
    block_k: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.block_class.shape)  # type: ignore[return-value]

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_num_blocks [B, H, Nk] int32, q_indices [B, H, Nk, Nq] int32): the query blocks that chose each key
        block, ascending. Built on demand (the backward needs it) so that it is never saved between passes."""
        return transposed_lists(self.block_class)

    def critical_fraction(self) -> float:
        """Realised fraction of (query block, key block) pairs computed by the sparse branch."""
        return float((self.block_class == CRITICAL).float().mean())

    def token_mask(self, cls: int) -> torch.Tensor:
        """Token-level [B, H, Lq, Lk] boolean mask of the pairs in class ``cls`` (for references and tests)."""
        m = (self.block_class == cls).repeat_interleave(self.block_q, dim=2)[:, :, : self.q_len]
        return m.repeat_interleave(self.block_k, dim=3)[..., : self.kv_len]


def critical_lists(block_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``block_class`` [..., R, C]: the number of CRITICAL columns and their indices, ascending."""
    critical = block_class == CRITICAL
    count = critical.sum(-1, dtype=torch.int32)
    # A stable sort of "not critical" puts the critical columns first, in ascending order.
    order = torch.sort((~critical).to(torch.uint8), dim=-1, stable=True).indices
    return count.contiguous(), order.to(torch.int32).contiguous()


def transposed_lists(block_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_num_blocks [..., Nk], q_indices [..., Nk, Nq]): for each key block, the query blocks that chose it."""
    return critical_lists(block_class.transpose(-1, -2))


def block_sums(x: torch.Tensor, block: int, n_blocks: int | None = None) -> torch.Tensor:
    """Sums of the rows of each block of ``x`` [B, H, L, D] in float64 -> [B, H, n_blocks, D]; blocks past the end
    of ``x`` (a context-parallel rank pads to a fixed count) sum to zero.

    Sums rather than means, in float64, so that a rank holding part of the sequence can gather them and reach the
    same scores as one GPU holding all of it."""
    B, H, L, D = x.shape
    n_blocks = num_blocks(L, block) if n_blocks is None else n_blocks
    full = min(L // block, n_blocks)
    # Reduce in float64 without materialising an upcast copy; a partial tail block is summed on its own.
    parts = [x[:, :, : full * block].unflatten(2, (full, block)).sum(3, dtype=torch.float64)]
    if full < n_blocks and full * block < L:
        parts.append(x[:, :, full * block : (full + 1) * block].sum(2, keepdim=True, dtype=torch.float64))
    missing = n_blocks - sum(p.shape[2] for p in parts)
    if missing:
        parts.append(x.new_zeros(B, H, missing, D, dtype=torch.float64))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def rows_per_block(length: int, block: int, n_blocks: int, device: torch.device) -> torch.Tensor:
    """Valid rows of each of ``n_blocks`` blocks covering ``length`` rows, as a float64 column [n_blocks, 1]."""
    starts = torch.arange(n_blocks, device=device, dtype=torch.float64) * block
    return (length - starts).clamp(0, block)[:, None]


def smooth_k_scores(q_sums: torch.Tensor, q_rows: torch.Tensor, k_sums: torch.Tensor, k_rows: torch.Tensor,
                    kv_len: int) -> torch.Tensor:
    """s_ij = qbar_i . kbar_j / sqrt(D) from block sums and row counts (see the module docstring), float32.

    ``k_sums`` covers every key block, so the sequence mean of K is their total over ``kv_len``."""
    qbar = q_sums / q_rows.clamp_min(1)
    kbar = k_sums / k_rows.clamp_min(1) - k_sums.sum(2, keepdim=True) / kv_len
    return (qbar @ kbar.transpose(-1, -2) / math.sqrt(q_sums.shape[-1])).float()


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """s_ij with smooth-K pooling of ``q`` [B, H, Lq, D] and ``k`` [B, H, Lk, D], float32 [B, H, Nq, Nk]."""
    Lq, Lk = q.shape[2], k.shape[2]
    nq, nk = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    return smooth_k_scores(block_sums(q, block_q), rows_per_block(Lq, block_q, nq, q.device),
                           block_sums(k, block_k), rows_per_block(Lk, block_k, nk, k.device), Lk)


def _rank(scores: torch.Tensor, topk: float, negligible: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(int8 block classes, key blocks by descending score, n_c) for each row of ``scores`` [..., Nk]."""
    nk = scores.shape[-1]
    n_c, n_n = block_counts(nk, topk, negligible)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    by_rank = torch.full((nk,), MARGINAL, dtype=torch.int8, device=scores.device)
    by_rank[:n_c] = CRITICAL
    if n_n:
        by_rank[nk - n_n :] = NEGLIGIBLE
    block_class = torch.empty_like(order, dtype=torch.int8).scatter_(-1, order, by_rank.expand_as(order))
    return block_class, order, n_c


def classify(scores: torch.Tensor, topk: float, negligible: float) -> torch.Tensor:
    """Rank each row of ``scores`` [..., Nk] and return the int8 block classes."""
    return _rank(scores, topk, negligible)[0]


def build_block_map(
    block_class: torch.Tensor, q_len: int, kv_len: int, block_q: int, block_k: int, width: int | None = None
) -> BlockMap:
    """Wrap a classification (from :func:`classify` or elsewhere, e.g. a context-parallel rank) as a BlockMap.

    ``width`` is the longest critical list when the caller knows it (classify() gives every row n_c); otherwise it
    is read off the tensor, which synchronises with the device.
    """
    kv_num_blocks, order = critical_lists(block_class)
    if width is None:
        width = int(kv_num_blocks.max()) if kv_num_blocks.numel() else 0
    return BlockMap(
        block_class=block_class,
        kv_num_blocks=kv_num_blocks,
        kv_indices=order[..., : max(width, 1)].contiguous(),
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
    )


@torch.no_grad()
def predict_block_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk: float,
    negligible: float,
    block_q: int = 64,
    block_k: int = 64,
) -> BlockMap:
    """Predict the SLA block map of ``q`` [B, H, Lq, D] and ``k`` [B, H, Lk, D]."""
    block_class, order, n_c = _rank(block_scores(q, k, block_q, block_k), topk, negligible)
    # The critical list is the top n_c of the ranking, put in ascending order for memory locality.
    kv_indices = order[..., :n_c].sort(dim=-1).values.to(torch.int32)
    kv_num_blocks = torch.full(block_class.shape[:-1], n_c, dtype=torch.int32, device=block_class.device)
    return BlockMap(block_class, kv_num_blocks, kv_indices, q.shape[2], k.shape[2], block_q, block_k)
