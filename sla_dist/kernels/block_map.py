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

import functools
import math
from dataclasses import dataclass, field

import torch

from ..config import check_int, validate_block_sizes, validate_fractions

NEGLIGIBLE, MARGINAL, CRITICAL = 0, 1, 2


def compiled_or_eager(op, eager):
    """``op``, a torch.library custom op that torch.compile traces through its fake implementation, while compiling;
    else ``eager``, its implementation (or an autograd.Function over it), called directly: torch.library's per-call
    dispatch costs tens of microseconds of host time, and up to ~16K tokens the eager layer is bound by host time."""
    return op if torch.compiler.is_compiling() else eager


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def block_counts(nk: int, topk: float, negligible: float) -> tuple[int, int]:
    """(n_c, n_n): critical and negligible key blocks per query block out of ``nk``."""
    validate_fractions(topk, negligible)
    # int() is floor for these non-negative values; unlike math.floor, torch.compile traces it when nk is symbolic
    # (a length that changes between calls), so one graph serves every length.
    n_c = min(nk, max(1, int(topk * nk + 1e-6)))
    n_n = min(nk - n_c, int(negligible * nk + 1e-6))
    return n_c, n_n


@dataclass(frozen=True)
class BlockMap:
    """Which key blocks each query block attends to exactly, linearly, or not at all.

    Shapes (B batch, H heads, Nq = ceil(q_len / block_q) query blocks, Nk = ceil(kv_len / block_k) key blocks,
    W >= 1 the widest critical list):
        block_class   [B, H, Nq, Nk] int8   CRITICAL / MARGINAL / NEGLIGIBLE
        kv_num_blocks [B, H, Nq]     int32  critical key blocks per query block
        kv_indices    [B, H, Nq, W]  int32  their indices (ascending from the factories below, for memory locality;
                                            any order is valid); entries past kv_num_blocks are unspecified

    Construction checks dtypes, shapes and devices (no tensor is read). The values are checked by
    :meth:`check_values` when a map reaches SLA, except for maps made by :func:`predict_block_map` or
    :func:`build_block_map`, which are right by construction: reading values back synchronises with the GPU.
    """

    block_class: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    _trusted: bool = field(default=False, init=False, repr=False, compare=False)
    """Set only by this module's factories. Not an init argument, so any other map, including one derived from a
    trusted map by ``dataclasses.replace``, has its values checked."""

    def __post_init__(self) -> None:
        for name in ("q_len", "kv_len", "block_q", "block_k"):
            check_int(name, getattr(self, name), 1)
        bc, num, idx = self.block_class, self.kv_num_blocks, self.kv_indices
        for name, t, dtype in (("block_class", bc, torch.int8), ("kv_num_blocks", num, torch.int32),
                               ("kv_indices", idx, torch.int32)):
            if t.dtype != dtype:
                raise ValueError(f"{name} must be {dtype}; got {t.dtype}")
        if bc.dim() != 4:
            raise ValueError(f"block_class must be [B, H, Nq, Nk]; got shape {tuple(bc.shape)}")
        grid = (num_blocks(self.q_len, self.block_q), num_blocks(self.kv_len, self.block_k))
        if tuple(bc.shape[2:]) != grid:
            raise ValueError(f"block_class of shape {tuple(bc.shape)} does not cover q_len={self.q_len} and "
                             f"kv_len={self.kv_len} in blocks of ({self.block_q}, {self.block_k}): expected "
                             f"[B, H, {grid[0]}, {grid[1]}]")
        if num.shape != bc.shape[:3]:
            raise ValueError(f"kv_num_blocks must be [B, H, Nq] = {list(bc.shape[:3])}; got {list(num.shape)}")
        if idx.dim() != 4 or idx.shape[:3] != bc.shape[:3] or idx.shape[3] < 1:
            raise ValueError(f"kv_indices must be [B, H, Nq, W] = {list(bc.shape[:3])} + [W >= 1]; got "
                             f"{list(idx.shape)}")
        if not (bc.device == num.device == idx.device):
            raise ValueError(f"block map tensors are on different devices: block_class {bc.device}, kv_num_blocks "
                             f"{num.device}, kv_indices {idx.device}")

    @classmethod
    def _from_factory(cls, *args) -> "BlockMap":
        """A map built by this module: its lists are the CRITICAL blocks of block_class by construction."""
        block_map = cls(*args)
        object.__setattr__(block_map, "_trusted", True)
        return block_map

    def check_values(self) -> None:
        """Raise ValueError naming the first offending entry unless every class is one of NEGLIGIBLE / MARGINAL /
        CRITICAL, 0 <= kv_num_blocks <= W, and the listed kv_indices (the first kv_num_blocks of each row) are
        exactly the row's CRITICAL key blocks, each once, in any order. One device synchronisation: the kernels
        would read out of bounds (a crash on the GPU) or silently disagree with the backward otherwise."""
        bc, num, idx = self.block_class, self.kv_num_blocks, self.kv_indices
        nk, width = bc.shape[-1], idx.shape[-1]
        listed = torch.arange(width, device=idx.device) < num[..., None]
        in_range = (idx >= 0) & (idx < nk)
        counted = listed & in_range
        hits = torch.zeros(bc.shape, dtype=torch.int32, device=bc.device)
        hits.scatter_add_(-1, torch.where(counted, idx, 0).long(), counted.int())
        checks = ((bc < NEGLIGIBLE) | (bc > CRITICAL), (num < 0) | (num > width), listed & ~in_range,
                  hits != (bc == CRITICAL).int())
        failed = torch.stack([c.any() for c in checks]).tolist()
        if failed[0]:
            at = _first(checks[0])
            raise ValueError(f"block_class{at} = {bc[at].item()} is not NEGLIGIBLE {NEGLIGIBLE}, MARGINAL "
                             f"{MARGINAL} or CRITICAL {CRITICAL}")
        if failed[1]:
            at = _first(checks[1])
            raise ValueError(f"kv_num_blocks{at} = {num[at].item()} is outside [0, W={width}]")
        if failed[2]:
            at = _first(checks[2])
            raise ValueError(f"kv_indices{at} = {idx[at].item()} is outside [0, Nk={nk}) but listed "
                             f"(kv_num_blocks{at[:3]} = {num[at[:3]].item()})")
        if failed[3]:
            at = _first(checks[3])[:3]
            raise ValueError(f"kv_indices{at}[:{num[at].item()}] = {idx[at][: num[at]].tolist()} must list each "
                             f"CRITICAL key block of block_class{at} once: "
                             f"{(bc[at] == CRITICAL).nonzero().flatten().tolist()}")

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


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True element of ``mask``."""
    return tuple(mask.nonzero()[0].tolist())


def check_block_map(q: torch.Tensor, k: torch.Tensor, block_map: BlockMap, *, kernel: bool) -> None:
    """Raise ValueError unless ``block_map`` was built for ``q`` [B, H, Lq, D] and ``k`` [B, H, Lk, D] (lengths,
    batch, heads, device) with block sizes the kernels support (``kernel``; the reference takes any), and, unless one
    of this module's factories built it, holds valid values (:meth:`BlockMap.check_values`, one device sync)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    expected = (B, H, num_blocks(Lq, block_map.block_q), num_blocks(Lk, block_map.block_k))
    if (block_map.q_len, block_map.kv_len) != (Lq, Lk) or tuple(block_map.block_class.shape) != expected:
        raise ValueError(f"block map of shape {tuple(block_map.block_class.shape)} for lengths "
                         f"({block_map.q_len}, {block_map.kv_len}) does not fit q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}: expected {expected}")
    if block_map.block_class.device != q.device:
        raise ValueError(f"the block map is on {block_map.block_class.device} but q is on {q.device}")
    if kernel:
        validate_block_sizes(block_map.block_q, block_map.block_k)
    if not block_map._trusted:
        block_map.check_values()


def critical_lists(block_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``block_class`` [..., R, C]: the number of CRITICAL columns and their indices, ascending."""
    critical = block_class == CRITICAL
    count = critical.sum(-1, dtype=torch.int32)
    # A stable sort of "not critical" puts the critical columns first, in ascending order.
    order = torch.sort((~critical).to(torch.uint8), dim=-1, stable=True).indices
    return count.contiguous(), order.to(torch.int32).contiguous()


def transposed_lists(block_class: torch.Tensor, *, kernels: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_num_blocks [..., Nk], q_indices [..., Nk, Nq]): for each key block, the query blocks that chose it,
    ascending; entries past q_num_blocks are unspecified. ``kernels``: see :func:`predict_block_map`."""
    if not _on_kernels(block_class, kernels):
        return critical_lists(block_class.transpose(-1, -2))
    return compiled_or_eager(_transposed_lists_op, _kernel_transposed_lists)(block_class)


def _kernel_transposed_lists(block_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`transposed_lists`."""
    from .configs import get_kernel

    *lead, nq, nk = block_class.shape
    block_class = block_class.contiguous()
    q_num = torch.empty((*lead, nk), dtype=torch.int32, device=block_class.device)
    q_idx = torch.empty((*lead, nk, nq), dtype=torch.int32, device=block_class.device)
    if q_num.numel():
        get_kernel("critical_columns")[(q_num.numel(),)](block_class, q_num, q_idx, nq, nk, NQ_POW2=_tile_size(nq))
    return q_num, q_idx


_transposed_lists_op = torch.library.custom_op("sla_dist::transposed_lists", mutates_args=())(_kernel_transposed_lists)


@_transposed_lists_op.register_fake
def _(block_class):
    *lead, nq, nk = block_class.shape
    return (block_class.new_empty((*lead, nk), dtype=torch.int32),
            block_class.new_empty((*lead, nk, nq), dtype=torch.int32))


def _tile_size(n: int) -> int:
    """The power of two (at least 16) that a Triton tile of ``n`` entries is padded to."""
    return max(16, 1 << (n - 1).bit_length())


def _on_kernels(x: torch.Tensor, kernels: bool | None) -> bool:
    """Whether block-map prediction runs its Triton kernels: by default on CUDA tensors only (CPU runs, also under
    the interpreter, take the PyTorch path, which is much faster than interpreting a kernel), and never for float64
    inputs, whose block sums the kernels would round to float32."""
    if x.dtype == torch.float64:
        return False
    return x.is_cuda if kernels is None else kernels


def block_sums(x: torch.Tensor, block: int, n_blocks: int | None = None, *, kernels: bool | None = None) -> torch.Tensor:
    """Sums of the rows of each block of ``x`` [B, H, L, D] in float64 -> [B, H, n_blocks, D]; blocks past the end
    of ``x`` (a context-parallel rank pads to a fixed count) sum to zero.

    Sums rather than means, in float64, so that a rank holding part of the sequence can gather them and reach the
    same scores as one GPU holding all of it. ``kernels``: see :func:`predict_block_map`."""
    B, H, L, D = x.shape
    n_blocks = num_blocks(L, block) if n_blocks is None else n_blocks
    if _on_kernels(x, kernels):
        return compiled_or_eager(_block_sums_op, _kernel_block_sums)(x, block, n_blocks)
    full = min(L // block, n_blocks)
    # Reduce in float64 without materialising an upcast copy; a partial tail block is summed on its own.
    parts = [x[:, :, : full * block].unflatten(2, (full, block)).sum(3, dtype=torch.float64)]
    if full < n_blocks and full * block < L:
        parts.append(x[:, :, full * block : (full + 1) * block].sum(2, keepdim=True, dtype=torch.float64))
    missing = n_blocks - sum(p.shape[2] for p in parts)
    if missing:
        parts.append(x.new_zeros(B, H, missing, D, dtype=torch.float64))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _kernel_block_sums(x: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """The Triton path of :func:`block_sums`."""
    from .configs import get_kernel

    B, H, L, D = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    written = min(num_blocks(L, block), n_blocks)
    # The kernel writes every block it covers; only blocks past the end of x (a padded rank) need zeros.
    new = torch.empty if written == n_blocks else torch.zeros
    sums = new(B, H, n_blocks, D, dtype=torch.float64, device=x.device)
    get_kernel("block_sums")[(written, B * H)](
        x, sums, *x.stride()[:3], H, L, n_blocks, D, BLOCK=block, D_POW2=_tile_size(D))
    return sums


_block_sums_op = torch.library.custom_op("sla_dist::block_sums", mutates_args=())(_kernel_block_sums)


@_block_sums_op.register_fake
def _(x, block, n_blocks):
    B, H, _, D = x.shape
    return x.new_empty((B, H, n_blocks, D), dtype=torch.float64)


def rows_per_block(length: int, block: int, n_blocks: int, device: torch.device) -> torch.Tensor:
    """Valid rows of each of ``n_blocks`` blocks covering ``length`` rows, as a float64 column [n_blocks, 1].

    Cached per shape in eager mode (read-only): built anew, it was five small device ops per tensor on every forward,
    which at short sequences cost more host time than the GPU spends on the whole block map. A compiled graph builds
    it in the graph instead (torch.compile would ignore the cache anyway, and warn)."""
    return compiled_or_eager(_rows_per_block, _cached_rows_per_block)(length, block, n_blocks, device)


def _rows_per_block(length: int, block: int, n_blocks: int, device: torch.device) -> torch.Tensor:
    starts = torch.arange(n_blocks, device=device, dtype=torch.float64) * block
    return (length - starts).clamp(0, block)[:, None]


_cached_rows_per_block = functools.lru_cache(maxsize=256)(_rows_per_block)


def smooth_k_scores(q_sums: torch.Tensor, q_rows: torch.Tensor, k_sums: torch.Tensor, k_rows: torch.Tensor,
                    kv_len: int) -> torch.Tensor:
    """s_ij = qbar_i . kbar_j / sqrt(D) from block sums and row counts (see the module docstring), float32.

    ``k_sums`` covers every key block, so the sequence mean of K is their total over ``kv_len``."""
    qbar = q_sums / q_rows.clamp_min(1)
    kbar = k_sums / k_rows.clamp_min(1) - k_sums.sum(2, keepdim=True) / kv_len
    products = qbar @ kbar.transpose(-1, -2)
    # Divided in float64 and rounded to float32 on the store: the values of (products / sqrt(D)).float() in one
    # kernel, without the float64 quotient.
    scores = torch.empty(products.shape, dtype=torch.float32, device=products.device)
    return torch.div(products, math.sqrt(q_sums.shape[-1]), out=scores)


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, *,
                 kernels: bool | None = None) -> torch.Tensor:
    """s_ij with smooth-K pooling of ``q`` [B, H, Lq, D] and ``k`` [B, H, Lk, D], float32 [B, H, Nq, Nk]."""
    Lq, Lk = q.shape[2], k.shape[2]
    q_sums, k_sums = block_sums(q, block_q, kernels=kernels), block_sums(k, block_k, kernels=kernels)
    if _on_kernels(q, kernels):
        return compiled_or_eager(_block_scores_op, _kernel_block_scores)(q_sums, k_sums, Lq, Lk, block_q, block_k)
    nq, nk = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    return smooth_k_scores(q_sums, rows_per_block(Lq, block_q, nq, q.device), k_sums,
                           rows_per_block(Lk, block_k, nk, k.device), Lk)


SCORE_TILE = 32
"""Query blocks and key blocks per program of the scores kernel (float64 tiles of [32, D])."""


def _kernel_block_scores(q_sums: torch.Tensor, k_sums: torch.Tensor, q_len: int, kv_len: int, block_q: int,
                         block_k: int) -> torch.Tensor:
    """The Triton path of :func:`smooth_k_scores` for the block sums of whole sequences (every block holds at least
    one row): one launch, the same float64 arithmetic."""
    from .configs import get_kernel
    from .layout import new_output

    B, H, nq, D = q_sums.shape
    nk = k_sums.shape[2]
    scores = new_output((B, H, nq, nk), q_sums, torch.float32)
    k_sums = k_sums.contiguous()
    # The sequence total of K by the op smooth_k_scores uses: the same float64 sum, so the same mean.
    k_total = k_sums.sum(2)
    get_kernel("block_scores")[(num_blocks(nq, SCORE_TILE), num_blocks(nk, SCORE_TILE), B * H)](
        q_sums.contiguous(), k_sums, k_total, scores, nq, nk, D, q_len, kv_len, block_q, block_k,
        BLOCK_M=SCORE_TILE, BLOCK_N=SCORE_TILE, D_POW2=_tile_size(D))
    return scores


_block_scores_op = torch.library.custom_op("sla_dist::block_scores", mutates_args=())(_kernel_block_scores)


@_block_scores_op.register_fake
def _(q_sums, k_sums, q_len, kv_len, block_q, block_k):
    B, H, nq, _ = q_sums.shape
    return q_sums.new_empty((B, H, nq, k_sums.shape[2]), dtype=torch.float32)


def rank_blocks(scores: torch.Tensor, topk: float, negligible: float, *,
                kernels: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank each row of ``scores`` [..., Nk]: (int8 block classes [..., Nk], critical key blocks [..., n_c] int32
    in ascending order). ``kernels``: see :func:`predict_block_map`."""
    nk = scores.shape[-1]
    n_c, n_n = block_counts(nk, topk, negligible)
    if _on_kernels(scores, kernels):
        return compiled_or_eager(_rank_blocks_op, _kernel_rank_blocks)(scores, n_c, n_n)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    by_rank = torch.full((nk,), MARGINAL, dtype=torch.int8, device=scores.device)
    by_rank[:n_c] = CRITICAL
    if n_n:
        by_rank[nk - n_n :] = NEGLIGIBLE
    block_class = torch.empty_like(order, dtype=torch.int8).scatter_(-1, order, by_rank.expand_as(order))
    # The critical list is the top n_c of the ranking, put in ascending order for memory locality.
    return block_class, order[..., :n_c].sort(dim=-1).values.to(torch.int32)


def _kernel_rank_blocks(scores: torch.Tensor, n_c: int, n_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`rank_blocks`, with the block counts of :func:`block_counts`."""
    from .configs import classify_packed, get_kernel

    nk = scores.shape[-1]
    if scores.dtype != torch.float32 or not scores.is_contiguous():  # as smooth_k_scores makes them: no call
        scores = scores.float().contiguous()
    block_class = torch.empty(scores.shape, dtype=torch.int8, device=scores.device)
    kv_indices = torch.empty((*scores.shape[:-1], n_c), dtype=torch.int32, device=scores.device)
    rows = scores.numel() // nk
    if rows:
        get_kernel("classify")[(rows,)](scores, block_class, kv_indices, nk, n_c, n_n, NK_POW2=_tile_size(nk),
                                        PACKED=classify_packed(nk))
    return block_class, kv_indices


_rank_blocks_op = torch.library.custom_op("sla_dist::rank_blocks", mutates_args=())(_kernel_rank_blocks)


@_rank_blocks_op.register_fake
def _(scores, n_c, n_n):
    return (scores.new_empty(scores.shape, dtype=torch.int8),
            scores.new_empty((*scores.shape[:-1], n_c), dtype=torch.int32))


def classify(scores: torch.Tensor, topk: float, negligible: float, *, kernels: bool | None = None) -> torch.Tensor:
    """Rank each row of ``scores`` [..., Nk] and return the int8 block classes."""
    return rank_blocks(scores, topk, negligible, kernels=kernels)[0]


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
    return BlockMap._from_factory(block_class, kv_num_blocks, order[..., : max(width, 1)].contiguous(), q_len,
                                  kv_len, block_q, block_k)


@torch.no_grad()
def predict_block_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk: float,
    negligible: float,
    block_q: int = 64,
    block_k: int = 64,
    kernels: bool | None = None,
) -> BlockMap:
    """Predict the SLA block map of ``q`` [B, H, Lq, D] and ``k`` [B, H, Lk, D].

    ``kernels``: pool and rank with the Triton kernels of block_select.py (True), with PyTorch ops (False), or by
    device (None: kernels on CUDA). Both give the same map up to float rounding of the block sums.

    ``block_q`` / ``block_k``: sizes the SLA kernels support (see :data:`sla_dist.config.SUPPORTED_BLOCK_Q`)."""
    validate_block_sizes(block_q, block_k)
    scores = block_scores(q, k, block_q, block_k, kernels=kernels)
    block_class, kv_indices = rank_blocks(scores, topk, negligible, kernels=kernels)
    kv_num_blocks = torch.full(block_class.shape[:-1], kv_indices.shape[-1], dtype=torch.int32,
                               device=block_class.device)
    return BlockMap._from_factory(block_class, kv_num_blocks, kv_indices, q.shape[2], k.shape[2], block_q, block_k)
