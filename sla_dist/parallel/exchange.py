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

Per direction every tensor is copied once into the send buffer and once out of the receive buffer (the output's send
copy is skipped where the buffer already is in rank order: one sample, no padding). The output exchange also pads:
it takes the attention output over the valid prefix only and sends zeros for the padded tail, and its backward
hands back the gradient of that prefix.

The collectives go through torch.distributed directly. These are plain autograd functions for eager execution;
DeepSpeed's exchange (``exchange="deepspeed"`` in ulysses.py) is the one that registers a custom op for
torch.compile.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import group_size


def _all_to_all(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i of ``group``; chunk i of the result came from rank i."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def _empty_like_layout(like: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(like.shape, like.stride(), device=device, dtype=dtype)


class FusedQKVExchange(torch.autograd.Function):
    """Shards [B, H, Ll, D] of q, k, v -> [B, h, L, D] views for this rank's heads, over the whole sequence."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        ranks = group_size(group)
        B, H, Ll, D = q.shape
        h = H // ranks
        send = q.new_empty(ranks, 3, B, Ll, h, D)
        for i, x in enumerate((q, k, v)):
            send[:, i].copy_(x.unflatten(1, (ranks, h)).permute(1, 0, 3, 2, 4))
        recv = _all_to_all(send, group)  # [source rank (sequence chunk), 3, B, Ll, h, D]
        outs = []
        for i in range(3):
            out = q.new_empty(B, ranks * Ll, h, D)
            out.unflatten(1, (ranks, Ll)).copy_(recv[:, i].transpose(0, 1))
            outs.append(out.transpose(1, 2))
        ctx.group = group
        # shapes and strides only (meta tensors hold no memory): the gradients are built in the inputs' layouts
        ctx.layouts = [torch.empty_like(x, device="meta") for x in (q, k, v)]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        ranks = group_size(ctx.group)
        B, H, Ll, D = ctx.layouts[0].shape
        h = H // ranks
        ref = next(g for g in grads if g is not None)
        send = ref.new_empty(ranks, 3, B, Ll, h, D)
        for i, g in enumerate(grads):
            if g is None:
                send[:, i].zero_()
            else:
                send[:, i].copy_(g.transpose(1, 2).unflatten(1, (ranks, Ll)).transpose(0, 1))
        recv = _all_to_all(send, ctx.group)  # [source rank (head group), 3, B, Ll, h, D]
        out = []
        for i, like in enumerate(ctx.layouts):
            if not ctx.needs_input_grad[i + 1]:
                out.append(None)
                continue
            grad = _empty_like_layout(like, ref.device, ref.dtype)
            grad.unflatten(1, (ranks, h)).copy_(recv[:, i].permute(1, 0, 3, 2, 4))
            out.append(grad)
        return None, *out


class OutputExchange(torch.autograd.Function):
    """This rank's heads' output [B, h, n, D] over the valid prefix (n <= U Ll tokens) -> the output shard
    [B, H, Ll, D] with every head, zero on the padded tail."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, o: torch.Tensor, padded_len: int) -> torch.Tensor:
        ranks = group_size(group)
        B, h, n, D = o.shape
        Ll = padded_len // ranks
        tokens = o.transpose(1, 2)  # [B, n, h, D]
        if n == padded_len:
            send = tokens.unflatten(1, (ranks, Ll)).transpose(0, 1).contiguous()
        else:  # pad while packing: chunk r holds tokens [r Ll, (r + 1) Ll), zeros past n
            send = o.new_empty(ranks, B, Ll, h, D)
            for r in range(ranks):
                valid = min(max(n - r * Ll, 0), Ll)
                send[r, :, :valid].copy_(tokens[:, r * Ll:r * Ll + valid])
                send[r, :, valid:].zero_()
        recv = _all_to_all(send, group)  # [source rank (head group), B, Ll, h, D]
        out = o.new_empty(B, Ll, ranks, h, D)
        out.copy_(recv.permute(1, 2, 0, 3, 4))
        ctx.group, ctx.valid, ctx.padded_len = group, n, padded_len
        return out.flatten(2, 3).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ranks = group_size(ctx.group)
        B, H, Ll, D = grad.shape
        send = grad.transpose(1, 2).unflatten(2, (ranks, H // ranks)).permute(2, 0, 1, 3, 4).contiguous()
        recv = _all_to_all(send, ctx.group)  # [source rank (sequence chunk), B, Ll, h, D]
        # [B, L, h, D]: a view for one sample, else one copy; transposed, its prefix has the strides the kernels give
        # the output (those of the exchanged q)
        full = recv.transpose(0, 1).reshape(B, ctx.padded_len, H // ranks, D)
        return None, full[:, :ctx.valid].transpose(1, 2), None
