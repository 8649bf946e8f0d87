"""The layer, inputs and baselines the single-layer benchmarks time (bench_attention, memory_layer, profile_sla,
time_layer, sweep_kernels, host_overhead)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from sla_dist import SparseLinearAttention
from sla_dist.kernels.block_map import block_scores, classify, critical_lists


def sla_layer_inputs(L: int, H: int, D: int, *, topk: float = 0.05, block_q: int = 128, device: str = "cuda",
                     dtype: torch.dtype = torch.bfloat16, **layer_kwargs):
    """(layer, q, k, v, g): an SLA layer whose proj_l is random (it starts at zero, which would let the linear
    branch's cost hide behind a zero product), q, k, v [1, H, L, D] that require grad, and an output gradient g."""
    layer = SparseLinearAttention(D, topk=topk, BLKQ=block_q, **layer_kwargs).to(device)
    torch.nn.init.normal_(layer.proj_l.weight, std=D**-0.5)
    q, k, v = (torch.randn(1, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return layer, q, k, v, torch.randn_like(q)


def dense_sdpa(backend):
    """Dense attention ``fn(q, k, v)`` through SDPA with only ``backend`` (e.g. ``SDPBackend.CUDNN_ATTENTION``)."""
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def flex_block_sparse(q: torch.Tensor, k: torch.Tensor, topk: float):
    """(fn(q, k, v), keys kept per query): FlexAttention with a 128x128 block mask of the same density, chosen by the
    same pooled scores (the sparse branch only); compiled on its first call."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    num, idx = critical_lists(classify(block_scores(q, k, 128, 128), topk, 0.0))
    mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=128)
    compiled = torch.compile(flex_attention)
    return (lambda q, k, v: compiled(q, k, v, block_mask=mask)), float(num[0, 0, 0]) * 128
