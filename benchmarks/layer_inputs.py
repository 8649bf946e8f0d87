"""The layer and inputs the single-layer benchmarks time (profile_sla, time_layer, sweep_kernels, host_overhead)."""

from __future__ import annotations

import torch

from sla_dist import SparseLinearAttention


def sla_layer_inputs(L: int, H: int, D: int, *, topk: float = 0.05, block_q: int = 128, device: str = "cuda",
                     dtype: torch.dtype = torch.bfloat16, **layer_kwargs):
    """(layer, q, k, v, g): an SLA layer whose proj_l is random (it starts at zero, which would let the linear
    branch's cost hide behind a zero product), q, k, v [1, H, L, D] that require grad, and an output gradient g."""
    layer = SparseLinearAttention(D, topk=topk, BLKQ=block_q, **layer_kwargs).to(device)
    torch.nn.init.normal_(layer.proj_l.weight, std=D**-0.5)
    q, k, v = (torch.randn(1, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return layer, q, k, v, torch.randn_like(q)
