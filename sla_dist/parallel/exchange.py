"""Fused Ulysses exchanges: q, k and v cross the Ulysses group in one all-to-all, the output in another.

DeepSpeed's ``DistributedAttention`` runs one all-to-all per tensor (three for q, k, v), each with its own
reshape / permute copies before and after. Here q, k and v are packed into one send buffer, exchanged by a single
``all_to_all_single``, and unpacked; the backward is the same collective reversed, for the three gradients together.

Layouts, with U ranks in the Ulysses group, h = H / U heads and Ll tokens per rank, L = U Ll:

* shard side: [B, H, Ll, D] with any strides (the model's q, k, v are [B, Ll, H, D] buffers viewed transposed). The
  gradients come back with the strides of their inputs (when those are dense), so no layout change follows them.
* head side: [B, h, L, D] as a transposed view of a dense [B, L, h, D] buffer, the layout DeepSpeed's exchange gives
  and the kernels read in place. The kernels give the output those strides too, and the output exchange's backward
  builds the output gradient with them again: the kernels copy q, o and do to one common layout when they differ.
* the exchanged output is a [B, Ll, H, D] buffer viewed as [B, H, Ll, D], so the model's ``o.transpose(1, 2).
  flatten(2)`` is free.

Only the other ranks' pieces travel: each is copied once into the send buffer and once out of the receive buffer,
and this rank's own piece is copied straight from input to output while the collective runs. The output exchange
also pads: it takes the attention output over the valid prefix only, sends no padded rows and zero-fills them on
arrival, and its backward hands back the gradient of that prefix.

The collectives go through torch.distributed directly. The autograd functions are for eager execution: their
collective is asynchronous (this rank's own piece is copied while it runs), which Dynamo cannot trace. Under
torch.compile the same two exchanges are written with functional collectives instead (``traced_qkv_exchange``,
``traced_output_exchange``): plain tensor ops around one differentiable ``all_to_all_single`` each, whose backward
autograd derives and which the compiler schedules (and fuses the packing copies) itself.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from .groups import group_rank, group_size

Pieces = Callable[[int], list[torch.Tensor]]
"""Rank r of the group -> the tensors exchanged with it, in an order and with shapes both sides agree on."""


def exchange(group: dist.ProcessGroup, send: Pieces, recv: Pieces) -> None:
    """One all-to-all over ``group``: on every rank, the tensors ``send(r)`` are written into rank r's ``recv(me)``.

    The pieces may be strided views: each is packed into (or unpacked from) one flat buffer. This rank's own pieces
    never enter the collective; they are copied across while it runs."""
    ranks, me = group_size(group), group_rank(group)
    sizes = [0 if r == me else sum(t.numel() for t in send(r)) for r in range(ranks)]
    recv_sizes = [0 if r == me else sum(t.numel() for t in recv(r)) for r in range(ranks)]
    like = send(me)[0]
    send_buffer = like.new_empty(sum(sizes))
    for r in range(ranks):
        if r != me:
            _copy_pieces(send(r), _slices(send_buffer, sizes, r, send(r)))
    recv_buffer = like.new_empty(sum(recv_sizes))
    work = dist.all_to_all_single(recv_buffer, send_buffer, recv_sizes, sizes, group=group, async_op=True)
    _copy_pieces(send(me), recv(me))
    work.wait()
    for r in range(ranks):
        if r != me:
            _copy_pieces(_slices(recv_buffer, recv_sizes, r, recv(r)), recv(r))


def _slices(buffer: torch.Tensor, sizes: list[int], rank: int, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of rank ``rank``'s part of a flat ``buffer`` (parts in rank order) shaped like ``pieces``."""
    offset, out = sum(sizes[:rank]), []
    for piece in pieces:
        out.append(buffer[offset:offset + piece.numel()].view(piece.shape))
        offset += piece.numel()
    return out


def _copy_pieces(sources: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    for source, target in zip(sources, targets):
        target.copy_(source)


def _valid_rows(valid: int, local_len: int, rank: int) -> int:
    """How many of rank ``rank``'s ``local_len`` tokens lie in the first ``valid`` tokens of the sequence."""
    return min(max(valid - rank * local_len, 0), local_len)


class FusedQKVExchange(torch.autograd.Function):
    """Shards [B, H, Ll, D] of q, k, v -> [B, h, L, D] views for this rank's heads, over the whole sequence."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        ranks = group_size(group)
        B, H, Ll, D = q.shape
        h = H // ranks
        outs = [q.new_empty(B, ranks * Ll, h, D) for _ in range(3)]  # [B, L, h, D]
        exchange(group, lambda r: [x[:, r * h:(r + 1) * h].transpose(1, 2) for x in (q, k, v)],
                 lambda r: [out[:, r * Ll:(r + 1) * Ll] for out in outs])
        ctx.group = group
        # shapes and strides only (meta tensors hold no memory): the gradients are built in the inputs' layouts
        ctx.layouts = [torch.empty_like(x, device="meta") for x in (q, k, v)]
        return tuple(out.transpose(1, 2) for out in outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        ranks = group_size(ctx.group)
        B, H, Ll, D = ctx.layouts[0].shape
        h = H // ranks
        ref = next(g for g in grads if g is not None)
        rows = [(ref.new_zeros(B, h, ranks * Ll, D) if g is None else g).transpose(1, 2) for g in grads]
        out = [torch.empty_strided(x.shape, x.stride(), device=ref.device, dtype=ref.dtype) for x in ctx.layouts]
        exchange(ctx.group, lambda r: [g[:, r * Ll:(r + 1) * Ll] for g in rows],
                 lambda r: [x[:, r * h:(r + 1) * h].transpose(1, 2) for x in out])
        return None, *(x if needed else None for x, needed in zip(out, ctx.needs_input_grad[1:]))


class OutputExchange(torch.autograd.Function):
    """This rank's heads' output [B, h, n, D] over the valid prefix (n <= U Ll tokens) -> the output shard
    [B, H, Ll, D] with every head, zero on the padded tail."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, o: torch.Tensor, padded_len: int) -> torch.Tensor:
        ranks, me = group_size(group), group_rank(group)
        B, h, n, D = o.shape
        Ll = padded_len // ranks
        tokens = o.transpose(1, 2)  # [B, n, h, D]
        out = o.new_empty(B, Ll, ranks, h, D)
        mine = _valid_rows(n, Ll, me)  # every rank sends this many rows of this rank's chunk: no padding travels
        exchange(group, lambda r: [tokens[:, r * Ll:r * Ll + _valid_rows(n, Ll, r)]],
                 lambda r: [out[:, :mine, r]])
        out[:, mine:].zero_()
        ctx.group, ctx.valid, ctx.padded_len = group, n, padded_len
        return out.flatten(2, 3).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ranks, me = group_size(ctx.group), group_rank(ctx.group)
        B, H, Ll, D = grad.shape
        h, n = H // ranks, ctx.valid
        heads = grad.transpose(1, 2).unflatten(2, (ranks, h))  # [B, Ll, U, h, D]
        # [B, L, h, D]; transposed, its prefix has the strides the kernels give the output (those of the exchanged
        # q). Rows past n are never read.
        full = grad.new_empty(B, ctx.padded_len, h, D)
        exchange(ctx.group, lambda r: [heads[:, :_valid_rows(n, Ll, me), r]],
                 lambda r: [full[:, r * Ll:r * Ll + _valid_rows(n, Ll, r)]])
        return None, full[:, :n].transpose(1, 2), None


def traced_qkv_exchange(group: dist.ProcessGroup, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``FusedQKVExchange`` for torch.compile: the same result (views [B, h, L, D] of dense [B, L, h, D] buffers),
    one all-to-all for q, k and v, written in traceable ops (this rank's own piece travels through the collective)."""
    ranks = group_size(group)
    B, H, Ll, D = q.shape
    h = H // ranks
    # [3, B, U, h, Ll, D] -> [U, 3, B, Ll, h, D]: the piece for rank r (its heads, all my tokens) first
    send = torch.stack((q, k, v)).unflatten(2, (ranks, h)).permute(2, 0, 1, 4, 3, 5).contiguous()
    recv = funcol.all_to_all_single(send.flatten(), None, None, group).view(send.shape)
    # piece r holds rank r's tokens, the r-th chunk of the sequence: [3, B, U Ll, h, D]
    full = recv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)
    return tuple(x.transpose(1, 2) for x in full.unbind(0))


def traced_output_exchange(group: dist.ProcessGroup, o: torch.Tensor, padded_len: int) -> torch.Tensor:
    """``OutputExchange`` for torch.compile: this rank's heads' output [B, h, n, D] over the valid prefix -> the
    output shard [B, H, Ll, D] with every head, zero on the padded tail (padding travels here, as zeros)."""
    ranks = group_size(group)
    B, h, n, D = o.shape
    Ll = padded_len // ranks
    padded = torch.nn.functional.pad(o, (0, 0, 0, padded_len - n))
    # [B, h, U, Ll, D] -> [U, B, Ll, h, D]: rank r's tokens of my heads first
    send = padded.unflatten(2, (ranks, Ll)).permute(2, 0, 3, 1, 4).contiguous()
    recv = funcol.all_to_all_single(send.flatten(), None, None, group).view(send.shape)
    # piece r holds head group r of my tokens: [B, Ll, U h, D], viewed [B, H, Ll, D] like OutputExchange's result
    return recv.permute(1, 2, 0, 3, 4).flatten(2, 3).transpose(1, 2)


def fused_ulysses(group: dist.ProcessGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Shards [B, H, Ll, D] of q, k, v -> ``attend`` on this rank's heads over the whole sequence ([B, h, L, D] in,
    [B, h, n, D] out over the first n valid tokens) -> the output shard [B, H, Ll, D], zero on padded positions.
    The autograd functions in eager mode, their traceable form under torch.compile."""
    if torch.compiler.is_compiling():
        q, k, v = traced_qkv_exchange(group, q, k, v)
        return traced_output_exchange(group, attend(q, k, v), q.shape[2])
    q, k, v = FusedQKVExchange.apply(group, q, k, v)
    return OutputExchange.apply(group, attend(q, k, v), q.shape[2])
