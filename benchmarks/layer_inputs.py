"""The layer, inputs and baselines the single-layer benchmarks time (bench_attention, memory_layer, profile_sla,
time_layer, sweep_kernels, host_overhead)."""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from locality_inputs import LOCALITIES, LocalityConfig, add_locality_arguments, locality_config, locality_qkv
from sla_dist import SparseLinearAttention
from sla_dist.kernels.block_map import block_scores, classify, critical_lists

LAYOUTS = ("bhld", "blhd", "fused")
"""Memory orders of the layer's q, k, v and output gradient, all seen as [B, H, L, D]:

    bhld   contiguous [B, H, L, D] (what the single-layer benchmarks always timed)
    blhd   each a [B, L, H, D] buffer viewed as [B, H, L, D], and so is the output gradient: how a model that
           splits heads off its token stream hands them over
    fused  as VideoDiT's SelfAttention: q and k blhd (fresh tensors out of the q / k norms and RoPE), v a view of
           the fused qkv projection's [B, L, 3 H D] output (row stride 3 H D), the output gradient blhd
"""


def sla_layer_inputs(L: int, H: int, D: int, *, topk: float = 0.05, block_q: int = 128, device: str = "cuda",
                     dtype: torch.dtype = torch.bfloat16, source: str = "iid", layout: str = "bhld",
                     locality: LocalityConfig | None = None, **layer_kwargs):
    """(layer, q, k, v, g): an SLA layer whose proj_l is random (it starts at zero, which would let the linear
    branch's cost hide behind a zero product), q, k, v [1, H, L, D] leaves that require grad, and an output
    gradient g.

    ``source``: i.i.d. Gaussian q, k, v ('iid'), or q, k from locality_inputs.py's 'field' / 'dit' sources over
    ``locality``'s token grid, which must hold L tokens. ``layout``: one of :data:`LAYOUTS`; the values are the
    same in every layout."""
    if source not in LOCALITIES:
        raise ValueError(f"input source {source!r} is not one of {LOCALITIES}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    layer = SparseLinearAttention(D, topk=topk, BLKQ=block_q, **layer_kwargs).to(device)
    torch.nn.init.normal_(layer.proj_l.weight, std=D**-0.5)
    if source == "iid":
        q, k, v = (torch.randn(1, H, L, D, device=device, dtype=dtype) for _ in range(3))
    else:
        locality = LocalityConfig() if locality is None else locality
        if locality.seq_len != L:
            raise ValueError(f"L={L} must equal the {locality.grid} grid's {locality.seq_len} tokens for input "
                             f"source {source!r}")
        q, k, v = (x.to(dtype) for x in locality_qkv(source, locality, H, D, torch.device(device)))
    g = torch.randn_like(q)
    if layout == "bhld":
        return layer, q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g
    q, k, g = (_blhd(x) for x in (q, k, g))
    v = _fused_v(v) if layout == "fused" else _blhd(v)
    # detach(): leaves with the views' strides, as the model's q, k, v (a leaf made by contiguous() would not be)
    return (layer, *(x.detach().requires_grad_() for x in (q, k, v)), g)


def layer_gradients(layer: torch.nn.Module, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of q, k, v and the layer's parameters for output gradient g, returned rather than accumulated into
    .grad, as a model step's q, k, v gradients are (they are not leaves there): accumulating adds a q-sized add into
    an existing .grad, and AccumulateGrad copies a gradient whose strides differ from its leaf's into the leaf's
    layout (dV of the 'fused' layout, which the kernels return in k's layout)."""
    return torch.autograd.grad(out, (q, k, v, *layer.parameters()), g, allow_unused=True)


def _blhd(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] stored as a [B, L, H, D] buffer, seen as [B, H, L, D]."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _fused_v(v: torch.Tensor) -> torch.Tensor:
    """v [B, H, L, D] stored as the last third of a [B, L, 3 H D] fused projection output, seen as [B, H, L, D]."""
    B, H, L, D = v.shape
    fused = v.new_zeros(B, L, 3 * H * D)
    fused[..., 2 * H * D:] = v.transpose(1, 2).flatten(2)
    return fused[..., 2 * H * D:].unflatten(-1, (H, D)).transpose(1, 2)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Options picking the layer's inputs (source, layout, block-map config, the sources' token grid)."""
    parser.add_argument("--inputs", nargs="+", choices=LOCALITIES, default=["iid"],
                        help="q, k sources (locality_inputs.py), one run each; any but iid time at the --grid's "
                        "T H W tokens instead of --L")
    parser.add_argument("--layout", nargs="+", choices=LAYOUTS, default=["bhld"],
                        help="memory orders of q, k, v and dO (layer_inputs.LAYOUTS), one run each")
    parser.add_argument("--negligible", type=float, default=None,
                        help="the layer's negligible fraction (default: the layer's default)")
    add_locality_arguments(parser)


def input_lengths(args: argparse.Namespace, lengths: list[int]) -> list[int]:
    """The sequence lengths to run: ``lengths``, or the --grid's token count when a source other than iid runs."""
    return [locality_config(args).seq_len] if set(args.inputs) - {"iid"} else lengths


def input_settings(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(source, layout, sla_layer_inputs keywords) of every input combination the options ask for."""
    extra = {} if args.negligible is None else {"negligible": args.negligible}
    locality = locality_config(args)
    return [(source, layout, dict(source=source, layout=layout, locality=locality, **extra))
            for source in args.inputs for layout in args.layout]


def dense_sdpa(backend):
    """Dense attention ``fn(q, k, v)`` through SDPA with only ``backend`` (e.g. ``SDPBackend.CUDNN_ATTENTION``)."""
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


@functools.cache
def _compiled_flex():
    """One compiled FlexAttention per process, static shapes: a fresh ``torch.compile`` per call would not share
    Dynamo's cache, and automatic dynamic shapes would time other kernels than a single-shape run compiles."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse(q: torch.Tensor, k: torch.Tensor, topk: float):
    """(fn(q, k, v), keys kept per query): FlexAttention with a 128x128 block mask of the same density, chosen by the
    same pooled scores (the sparse branch only); compiled on its first call for each shape."""
    from torch.nn.attention.flex_attention import BlockMask

    num, idx = critical_lists(classify(block_scores(q, k, 128, 128), topk, 0.0))
    # seq_lengths: a length that is not a multiple of 128 (75600) ends in a partial block
    mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=128, seq_lengths=(q.shape[-2], k.shape[-2]))
    compiled = _compiled_flex()
    return (lambda q, k, v: compiled(q, k, v, block_mask=mask)), float(num[0, 0, 0]) * 128
