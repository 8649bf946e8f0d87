"""Building blocks of the reference video DiT: conditioning embeddings, attention, MLP.

Per-token tensors are [B, L, C] throughout (sequence parallelism shards L); attention heads are split as
[B, L, H, D] and seen as [B, H, L, D] views by the attention kernels, without copies.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.norm_rope import norm_rope


def timestep_features(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] (cos half first) of diffusion timesteps [B], in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    angles = timestep.float()[:, None] * freqs
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, one fused multiply-add over the token stream."""
    return torch.addcmul(shift, x, 1 + scale)


class DenseAttention(nn.Module):
    """Softmax attention over q, k, v [B, H, L, D] via SDPA (FlashAttention / cuDNN / memory-efficient on GPU).

    It is the self-attention site that :func:`sla_dist.models.patch.apply_sla` replaces with
    :class:`sla_dist.SparseLinearAttention`, which takes and returns the same shapes."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class NormRoPE(nn.Module):
    """RMS norm across all heads with a learned ``weight`` (nn.RMSNorm's parameter and state_dict key), then 3D RoPE
    per head: x [B, L, dim], tables [L, D / 2] -> [B, L, heads, D]. On CUDA one fused Triton pass each way
    (:func:`sla_dist.kernels.norm_rope.norm_rope`), elsewhere the PyTorch reference. A module of its own, so that
    ZeRO-3 gathers its weight before the call, as for any module."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return norm_rope(x, self.weight, cos, sin, self.heads, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, heads={self.heads}, eps={self.eps}"


class SelfAttention(nn.Module):
    """Fused QKV projection, RMS q/k norms across heads, 3D RoPE, then ``core`` (dense or SLA).

    ``parallel``, when set (sequence parallelism: ``sla_dist.lightning.sequence.enable_sequence_parallel``), runs
    ``core`` over a token sequence sharded across ranks: it is called as ``parallel(q, k, v, seq_len)`` on this
    rank's tail-padded shard in place of ``core`` (``seq_len``: valid tokens of the whole sequence, None for no
    padding) and calls ``core`` itself. It is a plain callable, not a module, so ``core`` stays where it
    is and the model's modules, parameter names and state_dict keys are the same at every sequence-parallel size.
    """

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = NormRoPE(dim, num_heads, eps)
        self.norm_k = NormRoPE(dim, num_heads, eps)
        self.core: nn.Module = DenseAttention()
        self.out = nn.Linear(dim, dim)
        self.parallel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int | None], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seq_len: int | None = None) -> torch.Tensor:
        """x [B, L, dim], RoPE tables [L, D / 2] -> [B, L, dim]; ``seq_len`` only with ``parallel`` (see above)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.norm_q(q, cos, sin), self.norm_k(k, cos, sin)
        v = v.unflatten(-1, (self.num_heads, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.parallel is not None:
            o = self.parallel(q, k, v, seq_len)
        elif seq_len is None:
            o = self.core(q, k, v)
        else:
            raise ValueError(f"seq_len={seq_len} is given for a sequence shard of {x.shape[1]} tokens, but this "
                             "attention is not sequence-parallel (enable_sequence_parallel was not applied)")
        return self.out(o.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Dense attention of video tokens to text tokens (few keys, so SLA has nothing to save here)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], context [B, Lt, dim] -> [B, L, dim]."""
        k, v = self.kv(context).chunk(2, dim=-1)
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads).transpose(1, 2)
        k = self.norm_k(k).unflatten(-1, heads).transpose(1, 2)
        v = v.unflatten(-1, heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """'gelu': Linear -> tanh-GELU -> Linear (Wan). 'swiglu': one fused Linear to both branches -> SiLU(a) * b."""

    def __init__(self, dim: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)
