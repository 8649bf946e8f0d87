"""SLA-aware context parallel: the ring level of the SP layout, for head counts too small for Ulysses alone.

Notation: the ring group has R ranks; rank r holds chunk r of the tail-padded sequence, tokens [r C, (r + 1) C) of
which the first n_r are valid (``seq_len`` valid tokens in all), with h heads. C is a multiple of both block sizes,
so every SLA block lies on one rank and the global block grid is the single-GPU one: Nk = ceil(seq_len / block_k)
key blocks, the last holding ``last = seq_len - (Nk - 1) block_k`` keys.

1. Block map. Each rank pools its valid q and k rows into per-block sums (float64). The k sums of all ranks are
   all-gathered (B h Nk D numbers, tiny); smooth-K's mean is their total over seq_len, summed in the same order on
   every rank, so every rank scores its own query blocks against all key blocks exactly as one GPU would, and
   classifies them with the single-GPU rule (``classify``).
2. Fetch. A rank needs the k/v blocks that its query blocks attend exactly (critical) and, for the paper's
   ``linear_scope='marginal'``, the negligible ones too (to take them out of the linear totals). Per (b, head) the
   union of those blocks is requested from the owning ranks with one all-to-all of indices and answered with one
   all-to-all of k|v rows, instead of passing every kv chunk around a ring. The fetched blocks are packed into a
   compact key sequence of W slots per (b, head): the needed blocks in ascending order, then the global last block
   (always fetched) in slot W - 1, so a partial last block sits at the tail where ``kv_len`` cuts it off.
3. Sparse branch: SLA's sparse branch (``sla_branches`` on CUDA, its reference twin on CPU) of the local queries over
   the compact keys, with the block map re-indexed to slots.
4. Linear branch: H = sum phi(K)^T V and Z = sum phi(K) over all keys are summed over the ring (all-reduce). For
   scope 'all' they are every query block's totals; for 'marginal', H_i = H - sum over the fetched critical and
   negligible blocks of phi(K_j)^T V_j (likewise Z_i). O_l = phi(q) H_i / (phi(q) Z_i), zero where nothing is
   marginal or the denominator is zero, exactly as the single-GPU reference defines it.

All communication that carries gradients (the k|v reply and the totals) goes through one autograd function whose
backward runs the reverse all-to-all and the all-reduce in a fixed order on every rank, and every rank's output
depends on it, so the backward collectives line up even on ranks whose chunk is all padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention import SparseLinearAttention
from ..kernels.block_map import (
    CRITICAL,
    MARGINAL,
    block_sums,
    build_block_map,
    classify,
    num_blocks,
    rows_per_block,
    smooth_k_scores,
)
from ..kernels.op import check_inputs, sla_branches
from ..kernels.reference import feature_map_ref, sla_branches_ref
from .groups import group_rank, group_size
from .sharding import all_gather_along, pad_along


@dataclass(frozen=True)
class ChunkLayout:
    """Where this rank's chunk sits in the global block grid."""

    seq_len: int
    """Valid tokens in the whole sequence."""
    world: int
    """Ranks of the ring group."""
    rank: int
    """This rank's index in it."""
    chunk: int
    """Tokens per rank (C), padding included."""
    block_q: int
    block_k: int

    def __post_init__(self) -> None:
        if self.chunk % self.block_q or self.chunk % self.block_k:
            raise ValueError(f"chunks of {self.chunk} tokens are not aligned to block_q={self.block_q} and "
                             f"block_k={self.block_k}; shard with an align that both divide")
        if not 0 < self.seq_len <= self.world * self.chunk:
            raise ValueError(f"seq_len={self.seq_len} must lie in (0, {self.world * self.chunk}] for {self.world} "
                             f"chunks of {self.chunk} tokens")

    @property
    def n_valid(self) -> int:
        return min(max(self.seq_len - self.rank * self.chunk, 0), self.chunk)

    @property
    def nq_local(self) -> int:
        return num_blocks(self.n_valid, self.block_q)

    @property
    def nk(self) -> int:
        return num_blocks(self.seq_len, self.block_k)

    @property
    def k_blocks_per_rank(self) -> int:
        return self.chunk // self.block_k

    @property
    def last_len(self) -> int:
        return self.seq_len - (self.nk - 1) * self.block_k


def context_parallel_sla(attention: SparseLinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         seq_len: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """SLA of this rank's chunk of queries [B, h, C, D] over the whole sequence spread across ``group``.

    Equals rows [r C, r C + n_r) of ``attention`` applied to the full ``seq_len`` tokens; padded rows are zero.
    """
    c = attention.config
    layout = ChunkLayout(seq_len, group_size(group), group_rank(group), q.shape[2], c.block_q, c.block_k)
    kernel = attention.uses_kernels(q.device)
    check_inputs(q, k, v, kernel=kernel)
    out_dtype, run_dtype = q.dtype, attention.run_dtype(q)
    q, k, v = q.to(run_dtype), k.to(run_dtype), v.to(run_dtype)
    n = layout.n_valid
    q_valid, k_valid, v_valid = q[:, :, :n], k[:, :, :n], v[:, :, :n]

    block_class = global_block_class(q_valid, k_valid, layout, c.topk, c.negligible, group)
    plan = FetchPlan.build(block_class, layout, fetch_negligible=c.linear_scope == "marginal", group=group)
    has_linear = c.linear_scope != "none"
    if has_linear:
        phi_k = feature_map_ref(k_valid.float(), c.feature_map)
        h_local, z_local = phi_k.transpose(-1, -2) @ v_valid.float(), phi_k.sum(2)
    else:
        h_local = z_local = q.new_zeros(())
    rows = plan.rows_to_send(k, v, layout)
    received, h_total, z_total = _RingExchange.apply(rows, h_local, z_local, plan, group)

    out = q.new_zeros(q.shape[0], q.shape[1], n, q.shape[3])
    if n:
        k_c, v_c = plan.compact_kv(received, q.shape[0], q.shape[1], layout)
        kv_len = (plan.width - 1) * layout.block_k + layout.last_len
        compact_map = build_block_map(plan.compact_class, n, kv_len, layout.block_q, layout.block_k)
        branches = sla_branches if kernel else sla_branches_ref
        out, _, _ = branches(q_valid, k_c[:, :, :kv_len], v_c[:, :, :kv_len], compact_map,
                             feature_map=c.feature_map, linear_scope="none")
        if has_linear:
            o_l = _linear_branch(q_valid, k_c, v_c, block_class, plan, h_total, z_total, layout, c.feature_map,
                                 c.linear_scope)
            out = out + attention.project(o_l.to(out.dtype))
    elif has_linear:
        # A chunk of pure padding applies proj_l to no rows: it returns zero gradients for proj_l rather than none
        # (ZeRO's bucketed reduction expects every rank's), and proj_l is used only through its module call, which
        # wrappers that gather parameters in module hooks (ZeRO-3) see.
        out = out + attention.project(out)
    # Zero-weighted use of every exchanged tensor: a rank whose output would not depend on them (a chunk of pure
    # padding) must still run their backward collectives, or its peers wait forever. q joins so that such a rank
    # returns a zero gradient for it rather than none.
    anchor = received.sum() + h_total.sum() + z_total.sum() + q_valid.sum()
    out = out + (anchor * 0).to(out.dtype)
    return pad_along(out, 2, layout.chunk).to(out_dtype)


@torch.no_grad()
def global_block_class(q_valid: torch.Tensor, k_valid: torch.Tensor, layout: ChunkLayout, topk: float,
                       negligible: float, group: dist.ProcessGroup | None) -> torch.Tensor:
    """int8 [B, h, nq_local, Nk]: the single-GPU classification of this rank's query blocks against every key
    block. Pooled sums are gathered raw and reduced in float64 in one fixed order, so every rank agrees."""
    k_sums = block_sums(k_valid, layout.block_k, layout.k_blocks_per_rank)
    k_sums = all_gather_along(k_sums, 2, group)[:, :, : layout.nk]
    q_sums = block_sums(q_valid, layout.block_q, layout.nq_local)
    device = q_sums.device
    scores = smooth_k_scores(q_sums, rows_per_block(layout.n_valid, layout.block_q, layout.nq_local, device),
                             k_sums, rows_per_block(layout.seq_len, layout.block_k, layout.nk, device),
                             layout.seq_len)
    return classify(scores, topk, negligible)


@dataclass(frozen=True)
class FetchPlan:
    """Which k/v blocks this rank fetches, from whom, and where they land in its compact key sequence."""

    compact_class: torch.Tensor
    """int8 [B, h, nq_local, W]: the block classes re-indexed to slots (empty slots MARGINAL, i.e. unused by the
    sparse branch, and excluded from the linear correction)."""
    slot_flat: torch.Tensor
    """int64 [P]: (b h) * W + slot of each fetched block, in the order the replies arrive."""
    width: int
    """W: slots per (b, head), the last one holding the global last key block."""
    send_counts: list[int]
    """Blocks this rank requests from each rank."""
    recv_counts: list[int]
    """Blocks each rank requests from this rank."""
    requested: torch.Tensor
    """int64 [sum(recv_counts)]: (b h) * k_blocks_per_rank + local block index of each block to send, grouped by
    requesting rank."""

    @classmethod
    @torch.no_grad()
    def build(cls, block_class: torch.Tensor, layout: ChunkLayout, fetch_negligible: bool,
              group: dist.ProcessGroup | None) -> "FetchPlan":
        B, h, nq, nk = block_class.shape
        fetch = block_class != MARGINAL if fetch_negligible else block_class == CRITICAL
        needed = fetch.any(2)
        width = 0
        if nq:
            needed[..., nk - 1] = True
            width = int(needed[..., : nk - 1].sum(-1).max()) + 1
        slot = needed[..., : nk - 1].long().cumsum(-1) - 1
        slot = torch.cat([slot, slot.new_full((B, h, 1), width - 1)], -1)
        b, hh, j = needed.nonzero(as_tuple=True)
        bh = b * h + hh
        # Which global key block each slot holds (-1: empty), to re-index the classification.
        slot_block = torch.full((B * h, max(width, 1)), -1, dtype=torch.long, device=block_class.device)
        slot_block[bh, slot[b, hh, j]] = j
        slot_block = slot_block.view(B, h, 1, -1).expand(B, h, nq, -1)
        compact = block_class.gather(-1, slot_block.clamp(min=0)[..., :width])
        compact = torch.where(slot_block[..., :width] >= 0, compact, torch.full_like(compact, MARGINAL))

        owner = j // layout.k_blocks_per_rank
        order = torch.argsort(owner, stable=True)
        requests = (bh * layout.k_blocks_per_rank + j - owner * layout.k_blocks_per_rank)[order]
        send = torch.bincount(owner, minlength=layout.world)
        recv = _all_to_all(send, [1] * layout.world, [1] * layout.world, group)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        requested = _all_to_all(requests, recv_counts, send_counts, group)
        return cls(compact, (bh * width + slot[b, hh, j])[order], width, send_counts, recv_counts, requested)

    def rows_to_send(self, k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
        """[sum(recv_counts), block_k, 2D]: the k|v blocks others asked this rank for (k, v are [B, h, C, D], possibly
        strided views). Only the requested blocks are read and concatenated, never the whole chunk."""
        heads, per_rank = k.shape[1], layout.k_blocks_per_rank
        b, hh, j = self.requested // (heads * per_rank), self.requested // per_rank % heads, self.requested % per_rank
        return torch.cat([x.unflatten(2, (per_rank, layout.block_k))[b, hh, j] for x in (k, v)], dim=-1)

    def compact_kv(self, received: torch.Tensor, batch: int, heads: int, layout: ChunkLayout):
        """(k, v) [B, h, W block_k, D]: the fetched blocks placed in their slots, empty slots zero."""
        compact = received.new_zeros(batch * heads * self.width, layout.block_k, received.shape[-1])
        compact = compact.index_put((self.slot_flat,), received)
        compact = compact.view(batch, heads, self.width * layout.block_k, -1)
        return compact.chunk(2, dim=-1)


def _linear_branch(q, k_c, v_c, block_class, plan: FetchPlan, h_total, z_total, layout: ChunkLayout,
                   feature_map: str, scope: str) -> torch.Tensor:
    """O_l [B, h, n, D] in float32 of the local queries, from the ring totals and the fetched blocks."""
    B, h, n, D = q.shape
    nq, bq, bk, width = layout.nq_local, layout.block_q, layout.block_k, plan.width
    h_i, z_i = h_total[:, :, None], z_total[:, :, None]
    if scope == "marginal":
        phi_k = feature_map_ref(k_c.float(), feature_map).view(B, h, width, bk, D)
        # The last slot holds the global last key block, of which only last_len rows are keys.
        rows = torch.arange(width * bk, device=q.device).view(width, bk)
        phi_k = phi_k * (rows < (width - 1) * bk + layout.last_len)[..., None]
        h_blocks = phi_k.transpose(-1, -2) @ v_c.float().view(B, h, width, bk, D)
        taken = (plan.compact_class != MARGINAL).float()
        h_i = h_i - torch.einsum("bhiw,bhwde->bhide", taken, h_blocks)
        z_i = z_i - taken @ phi_k.sum(3)
    phi_q = pad_along(feature_map_ref(q.float(), feature_map), 2, nq * bq).view(B, h, nq, bq, D)
    num = phi_q @ h_i
    den = (phi_q * z_i[..., None, :]).sum(-1, keepdim=True)
    empty = den == 0
    if scope == "marginal":
        # A query block with no marginal key block has an empty sum; the subtraction leaves rounding noise.
        empty = empty | (block_class != MARGINAL).all(-1)[..., None, None]
    o_l = torch.where(empty, torch.zeros_like(num), num / torch.where(empty, torch.ones_like(den), den))
    return o_l.view(B, h, nq * bq, D)[:, :, :n]


def _all_to_all(x: torch.Tensor, out_counts: list[int], in_counts: list[int],
                group: dist.ProcessGroup | None) -> torch.Tensor:
    """all_to_all_single along dim 0 with the given split sizes (rows received from / sent to each rank)."""
    if group_size(group) == 1:
        return x.clone()
    out = x.new_empty(sum(out_counts), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_counts, in_counts, group=group)
    return out


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    x = x.clone()
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


class _RingExchange(torch.autograd.Function):
    """(fetched rows, ring-summed H, ring-summed Z) from (rows to send, local H, local Z); the backward runs the
    reverse all-to-all and the all-reduce of the totals' gradients, in that order on every rank."""

    @staticmethod
    def forward(ctx, rows, h_local, z_local, plan: FetchPlan, group):
        ctx.plan, ctx.group = plan, group
        received = _all_to_all(rows, plan.send_counts, plan.recv_counts, group)
        return received, _all_reduce(h_local, group), _all_reduce(z_local, group)

    @staticmethod
    def backward(ctx, d_received, d_h, d_z):
        plan: FetchPlan = ctx.plan
        d_rows = _all_to_all(d_received, plan.recv_counts, plan.send_counts, ctx.group)
        return d_rows, _all_reduce(d_h, ctx.group), _all_reduce(d_z, ctx.group), None, None
