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

Pipelining (``chunks`` C > 1, ``SequenceParallelConfig.overlap_chunks``): each rank's h heads are cut into C chunks
and each exchange into C collectives, one per chunk (q, k and v of a chunk still in one): all C q|k|v exchanges are
started at once, chunk c attends as soon as its own has arrived, and its output exchange starts right after, so
the exchanges run under the other chunks' attention; the backward does the same in reverse (``fused_ulysses``).
Each exchange is a pair of autograd nodes, one starting its collective and one waiting for it, joined by an empty
token tensor so that autograd orders them (the data wait in ``UlyssesPipeline``); in backward the roles swap, the
waiting node starting the reverse collective. C = 1 is the unpipelined exchange, through the same code.

The collectives go through torch.distributed directly. The autograd functions are for eager execution: their
collective is asynchronous (this rank's own piece is copied while it runs), which Dynamo cannot trace. Under
torch.compile the same two exchanges are written with functional collectives instead (``traced_qkv_exchange``,
``traced_output_exchange``): plain tensor ops around one differentiable ``all_to_all_single`` each, whose backward
autograd derives and which the compiler schedules (and fuses the packing copies) itself. ``chunks`` is ignored
there (a no-op rather than an error): the pipeline rests on work handles waited for in other autograd nodes, which
Dynamo cannot trace, and an exception raised while tracing does not reach the user as such (without ``fullgraph``
Dynamo falls back to running the frame eagerly, with ``fullgraph`` it reports its own error), while the traced
exchange gives the same results.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from .groups import group_rank, group_size

Pieces = Callable[[int], list[torch.Tensor]]
"""Rank r of the group -> the tensors exchanged with it, in an order and with shapes both sides agree on."""


class PendingExchange:
    """An all-to-all in flight (``start_exchange``): the collective runs while the caller goes on; ``wait`` makes
    the current stream wait for it (NCCL; gloo blocks the host) and unpacks what arrived."""

    def __init__(self, work: dist.Work, buffers: tuple[torch.Tensor, torch.Tensor], recv_sizes: list[int],
                 recv: Pieces, me: int) -> None:
        self.work, self.buffers, self.recv_sizes, self.recv, self.me = work, buffers, recv_sizes, recv, me

    def wait(self) -> None:
        self.work.wait()
        recv_buffer = self.buffers[1]
        for r in range(len(self.recv_sizes)):
            if r != self.me:
                _copy_pieces(_slices(recv_buffer, self.recv_sizes, r, self.recv(r)), self.recv(r))
        # the send buffer too is kept until here: the collective reads it on NCCL's stream
        self.buffers = ()


def start_exchange(group: dist.ProcessGroup, send: Pieces, recv: Pieces) -> PendingExchange:
    """Start one all-to-all over ``group``: on every rank, the tensors ``send(r)`` are written into rank r's
    ``recv(me)`` once the returned exchange has been waited for.

    The pieces may be strided views: each is packed into (or unpacked from) one flat buffer. This rank's own pieces
    never enter the collective; they are copied across here, while it runs."""
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
    return PendingExchange(work, (send_buffer, recv_buffer), recv_sizes, recv, me)


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


class UlyssesPipeline:
    """Shapes of one fused Ulysses exchange cut into ``chunks`` chunks of heads, and the exchanges in flight between
    the autograd nodes below (one forward and its backward; each pass leaves nothing behind).

    Shard side [B, H, Ll, D] (H heads, Ll tokens per rank), head side [B, h, L, D] with h = H / U heads per rank
    and L = U Ll; chunk c of rank r holds heads ``r h + c hc`` to ``r h + (c + 1) hc`` (hc = h / chunks) of the
    shard side, so every head stays on the rank it has without chunks."""

    def __init__(self, group: dist.ProcessGroup, shape: torch.Size, chunks: int) -> None:
        self.group, self.ranks, self.me, self.chunks = group, group_size(group), group_rank(group), chunks
        B, H, Ll, D = shape
        self.local_heads = H // self.ranks
        if self.local_heads % chunks:
            raise ValueError(f"overlap_chunks={chunks} does not divide the {self.local_heads} heads each rank "
                             f"attends to ({H} heads over ulysses_degree={self.ranks}); choose a divisor of "
                             f"{self.local_heads}")
        self.B, self.H, self.Ll, self.D, self.hc = B, H, Ll, D, self.local_heads // chunks
        self.valid = self.padded_len = self.ranks * Ll
        """The attention output's valid tokens n (set by its first chunk) and the padded sequence length L."""
        self.pending: dict[tuple[str, int], PendingExchange] = {}
        """The exchanges in flight by (what, chunk): started by one node, waited for by the next one."""
        # What the nodes hand on beside their tokens: the tensors the exchanges in flight write into.
        self.received: dict[int, list[torch.Tensor]] = {}
        """Forward, per chunk: its q, k, v [B, L, hc, D] (from _SendQKV to _WaitQKV)."""
        self.out: torch.Tensor | None = None
        """Forward: the output shard [B, Ll, U, h, D] (from _SendOutput to _WaitOutput)."""
        self.out_grads: dict[int, torch.Tensor] = {}
        """Backward, per chunk: its output gradient [B, L, hc, D] (from _WaitOutput to _SendOutput)."""
        self.grads: list[torch.Tensor] | None = None
        """Backward: dq, dk, dv of the shards (from the _WaitQKV nodes to _SendQKV)."""
        self.layouts: list[torch.Tensor] = []
        """Meta tensors with the shapes and strides of q, k, v: the gradients are built in the inputs' layouts."""

    def heads(self, rank: int, chunk: int) -> slice:
        """Chunk ``chunk`` of rank ``rank``'s heads, as indices into all H heads."""
        first = rank * self.local_heads + chunk * self.hc
        return slice(first, first + self.hc)

    def tokens(self, rank: int, valid: int | None = None) -> slice:
        """Rank ``rank``'s tokens in the whole (padded) sequence; with ``valid``, only those among the first
        ``valid`` tokens."""
        count = self.Ll if valid is None else _valid_rows(valid, self.Ll, rank)
        return slice(rank * self.Ll, rank * self.Ll + count)

    def start(self, what: str, chunk: int, send: Pieces, recv: Pieces) -> None:
        self.pending[what, chunk] = start_exchange(self.group, send, recv)

    def wait(self, what: str, chunk: int) -> None:
        self.pending.pop((what, chunk)).wait()


def _token(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor that carries an autograd edge between two nodes of one exchange: the data travel beside it
    (in ``UlyssesPipeline``), the edge keeps the order of the nodes in both passes."""
    return like.new_zeros(0)


class _SendQKV(torch.autograd.Function):
    """Shards [B, H, Ll, D] of q, k, v -> one started all-to-all per chunk of heads, q, k and v together (one
    token per chunk). Backward: waits for the chunks' gradient exchanges, which ``_WaitQKV`` started, and returns
    dq, dk, dv in the inputs' layouts."""

    @staticmethod
    def forward(ctx, pipe: UlyssesPipeline, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        p = pipe
        for c in range(p.chunks):
            p.received[c] = outs = [q.new_empty(p.B, p.padded_len, p.hc, p.D) for _ in range(3)]
            p.start("qkv", c, lambda r, c=c: [x[:, p.heads(r, c)].transpose(1, 2) for x in (q, k, v)],
                    lambda r, outs=outs: [out[:, p.tokens(r)] for out in outs])
        ctx.pipe = pipe
        p.layouts = [torch.empty_like(x, device="meta") for x in (q, k, v)]  # meta tensors hold no memory
        return tuple(_token(q) for _ in range(p.chunks))

    @staticmethod
    def backward(ctx, *tokens: torch.Tensor):
        p: UlyssesPipeline = ctx.pipe
        for c in reversed(range(p.chunks)):  # in the order _WaitQKV started them
            p.wait("dqkv", c)
        grads, p.grads = p.grads, None
        return None, *(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[1:]))


class _WaitQKV(torch.autograd.Function):
    """A chunk's token -> its q, k, v [B, hc, L, D] (views of dense [B, L, hc, D] buffers), once its exchange has
    arrived. Backward: starts the reverse exchange of the chunk's gradients into the shards' dq, dk, dv."""

    @staticmethod
    def forward(ctx, pipe: UlyssesPipeline, chunk: int, token: torch.Tensor):
        pipe.wait("qkv", chunk)
        ctx.pipe, ctx.chunk = pipe, chunk
        return tuple(out.transpose(1, 2) for out in pipe.received.pop(chunk))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        p, c = ctx.pipe, ctx.chunk
        if p.grads is None:  # the first chunk to get here (the last one: see fused_ulysses)
            p.grads = [torch.empty_strided(x.shape, x.stride(), device=grads[0].device, dtype=grads[0].dtype)
                       for x in p.layouts]
        rows, shards = [g.transpose(1, 2) for g in grads], p.grads  # [B, L, hc, D]
        p.start("dqkv", c, lambda r: [g[:, p.tokens(r)] for g in rows],
                lambda r: [x[:, p.heads(r, c)].transpose(1, 2) for x in shards])
        return None, None, _token(grads[0])


class _SendOutput(torch.autograd.Function):
    """A chunk's output [B, hc, n, D] over the valid prefix (n <= L tokens) -> its started exchange into the output
    shards (a token). No padded rows travel. Backward: waits for the output gradient's exchange, which
    ``_WaitOutput`` started, and returns its valid prefix."""

    @staticmethod
    def forward(ctx, pipe: UlyssesPipeline, chunk: int, o: torch.Tensor):
        p, c = pipe, chunk
        p.valid = n = o.shape[2]
        if c == 0:
            p.out = o.new_empty(p.B, p.Ll, p.ranks, p.local_heads, p.D)
        out, tokens = p.out, o.transpose(1, 2)  # [B, n, hc, D]
        mine = _valid_rows(n, p.Ll, p.me)  # every rank sends this many rows of this rank's tokens
        heads = slice(c * p.hc, (c + 1) * p.hc)
        p.start("out", c, lambda r: [tokens[:, p.tokens(r, n)]], lambda r: [out[:, :mine, r, heads]])
        ctx.pipe, ctx.chunk = pipe, chunk
        return _token(o)

    @staticmethod
    def backward(ctx, token: torch.Tensor):
        p, c = ctx.pipe, ctx.chunk
        p.wait("dout", c)
        return None, None, p.out_grads.pop(c)[:, :p.valid].transpose(1, 2)


class _WaitOutput(torch.autograd.Function):
    """The chunks' tokens -> the output shard [B, H, Ll, D] with every head, zero on the padded tail (a
    [B, Ll, H, D] buffer viewed transposed). Backward: starts every chunk's output-gradient exchange."""

    @staticmethod
    def forward(ctx, pipe: UlyssesPipeline, *tokens: torch.Tensor) -> torch.Tensor:
        p = pipe
        for c in range(p.chunks):
            p.wait("out", c)
        out, p.out = p.out, None
        out[:, _valid_rows(p.valid, p.Ll, p.me):].zero_()
        ctx.pipe = pipe
        return out.flatten(2, 3).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p = ctx.pipe
        heads = grad.transpose(1, 2).unflatten(2, (p.ranks, p.local_heads))  # [B, Ll, U, h, D]
        mine = _valid_rows(p.valid, p.Ll, p.me)
        # The chunks' backward runs last chunk first (see fused_ulysses): NCCL runs a communicator's collectives in
        # the order they are issued, so the first one needed goes first.
        for c in reversed(range(p.chunks)):
            # [B, L, hc, D]; transposed, its prefix has the strides the kernels give the output (those of the
            # exchanged q). Rows past the valid ones are never read.
            p.out_grads[c] = full = grad.new_empty(p.B, p.padded_len, p.hc, p.D)
            chunk = slice(c * p.hc, (c + 1) * p.hc)
            p.start("dout", c, lambda r, chunk=chunk: [heads[:, :mine, r, chunk]],
                    lambda r, full=full: [full[:, p.tokens(r, p.valid)]])
        return None, *(_token(grad) for _ in range(p.chunks))


def traced_qkv_exchange(group: dist.ProcessGroup, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager q|k|v exchange (``_SendQKV``, ``_WaitQKV``) for torch.compile: the same result (views [B, h, L, D]
    of dense [B, L, h, D] buffers), one all-to-all for q, k and v, written in traceable ops (this rank's own piece
    travels through the collective)."""
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
    """The eager output exchange (``_SendOutput``, ``_WaitOutput``) for torch.compile: this rank's heads' output
    [B, h, n, D] over the valid prefix -> the output shard [B, H, Ll, D] with every head, zero on the padded tail
    (padding travels here, as zeros)."""
    ranks = group_size(group)
    B, h, n, D = o.shape
    Ll = padded_len // ranks
    padded = torch.nn.functional.pad(o, (0, 0, 0, padded_len - n))
    # [B, h, U, Ll, D] -> [U, B, Ll, h, D]: rank r's tokens of my heads first
    send = padded.unflatten(2, (ranks, Ll)).permute(2, 0, 3, 1, 4).contiguous()
    recv = funcol.all_to_all_single(send.flatten(), None, None, group).view(send.shape)
    # piece r holds head group r of my tokens: [B, Ll, U h, D], viewed [B, H, Ll, D] like _WaitOutput's result
    return recv.permute(1, 2, 0, 3, 4).flatten(2, 3).transpose(1, 2)


def fused_ulysses(group: dist.ProcessGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  chunks: int = 1) -> torch.Tensor:
    """Shards [B, H, Ll, D] of q, k, v -> ``attend`` on this rank's heads over the whole sequence ([B, h, L, D] in,
    [B, h, n, D] out over the first n valid tokens) -> the output shard [B, H, Ll, D], zero on padded positions.

    Eagerly, the exchange is cut into ``chunks`` chunks of each rank's heads (it must divide them: ValueError
    otherwise), ``attend`` is called once per chunk, and the exchanges run under the other chunks' attention (see
    the module docstring). Under torch.compile ``chunks`` is ignored: the traceable form exchanges all heads at
    once."""
    if torch.compiler.is_compiling():
        q, k, v = traced_qkv_exchange(group, q, k, v)
        return traced_output_exchange(group, attend(q, k, v), q.shape[2])
    pipe = UlyssesPipeline(group, q.shape, chunks)
    # Every q, k, v exchange is started first; NCCL runs them in order on its stream, so chunk c + 1's travels
    # while chunk c attends (the compute stream waits for one chunk at a time, in _WaitQKV), and chunk c's output
    # travels while chunk c + 1 attends.
    tokens = _SendQKV.apply(pipe, q, k, v)
    outputs = []
    for c, token in enumerate(tokens):
        outputs.append(_SendOutput.apply(pipe, c, attend(*_WaitQKV.apply(pipe, c, token))))
    # Backward: autograd runs the ready node created last first (nodes of one device share a queue ordered by
    # creation, latest first). After _WaitOutput, which starts every chunk's output-gradient exchange, all
    # _SendOutput nodes are ready: the last chunk's runs first, then that chunk's attention backward and its
    # _WaitQKV (created after the previous chunk's _SendOutput), which starts the chunk's dq|dk|dv exchange; then
    # the previous chunk, whose output gradient has arrived meanwhile, attends under that exchange. _SendQKV waits
    # for them all at the end. proj_l is shared by the chunks: autograd sums its gradient over them before
    # accumulating it.
    return _WaitOutput.apply(pipe, *outputs)
