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

from ..kernels.gelu_mlp import FUSED_MLP_DTYPES, gelu_mlp
from ..kernels.norm_rope import norm_rope
from ..kernels.projection import plain_linear


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


# Key-block width of the SDPA backward kernels (cuDNN's and FlashAttention's tiles are 64 or 128 keys wide): the
# unit that few_key_attention counts programs in.
_BACKWARD_KEY_TILE = 64
# Most query chunks folded into the batch: each chunk copies k and v (a text context's few hundred keys, ~1.5 MiB
# at 512 x 12 x 128 bf16), and each chunk's dK / dV partials are summed in the backward.
_MAX_QUERY_CHUNKS = 8


def query_chunks(batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> int:
    """How many query chunks :func:`few_key_attention` folds into the batch: on CUDA, while the backward's programs
    (one per batch x head x key tile) number fewer than 4x the SMs, the most chunks up to 8 that divide ``q_len``
    and keep at least 4x the keys' count of queries per chunk; otherwise 1 (and always 1 off CUDA).

    Measured on an H200 (cuDNN, Lq 32760, 512 keys, 12 heads: 96 programs): fwd+bwd 1.474 ms unfolded, 0.960 /
    1.154 / 0.975 / 0.987 / 0.880 ms with 2 / 3 / 4 / 6 / 8 chunks (results/2026-12-01-h200-cross-attention.md):
    the most chunks wins, and counts that leave a partial wave of programs (3) lose part of the gain."""
    if device.type != "cuda":
        return 1
    programs = batch * heads * -(-k_len // _BACKWARD_KEY_TILE)
    if programs >= 4 * torch.cuda.get_device_properties(device).multi_processor_count:
        return 1
    return max(c for c in range(1, _MAX_QUERY_CHUNKS + 1) if q_len % c == 0 and (c == 1 or q_len // c >= 4 * k_len))


def few_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """SDPA of many queries over few keys (video tokens over a text context): q [B, H, Lq, D], k, v [B, H, Lk, D]
    -> [B, H, Lq, D], the same values as ``F.scaled_dot_product_attention(q, k, v)``.

    The SDPA backward runs one program per (batch, head, key tile), each walking every query: with 512 text keys
    and 12 heads that is 96 programs on a 132-SM GPU, each over 32K queries. Each query attends independently, so
    ``chunks`` query ranges are folded into the batch (k and v repeated per chunk) and the backward runs ``chunks``
    times the programs over ``1 / chunks`` of the queries each; autograd sums the chunks' dK / dV. ``chunks``
    defaults to :func:`query_chunks`; it must divide Lq."""
    B, H, Lq, D = q.shape
    if chunks is None:
        chunks = query_chunks(B, H, Lq, k.shape[2], q.device)
    if chunks < 1 or Lq % chunks:
        raise ValueError(f"chunks={chunks} must be a positive divisor of the query length {Lq}")
    if chunks == 1:
        return F.scaled_dot_product_attention(q, k, v)

    def fold(t: torch.Tensor) -> torch.Tensor:  # [B, H, c * n, D] -> [B * c, H, n, D]
        return t.unflatten(2, (chunks, -1)).transpose(1, 2).flatten(0, 1)

    def repeat(t: torch.Tensor) -> torch.Tensor:  # [B, H, Lk, D] -> [B * c, H, Lk, D]
        return t.unsqueeze(1).expand(-1, chunks, -1, -1, -1).flatten(0, 1)

    o = F.scaled_dot_product_attention(fold(q), repeat(k), repeat(v))
    return o.unflatten(0, (B, chunks)).transpose(1, 2).flatten(2, 3)


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
        o = few_key_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """'gelu': Linear -> tanh-GELU -> Linear (Wan). 'swiglu': one fused Linear to both branches -> SiLU(a) * b.

    ``fused`` ('gelu' only): run :func:`sla_dist.kernels.gelu_mlp.gelu_mlp`, the GELU's backward as one Triton pass
    that also sums the up projection's bias gradient. None (default): on CUDA inputs when both projections are plain
    ``nn.Linear`` modules (:func:`~sla_dist.kernels.projection.plain_linear`: not hooked, adapted or ZeRO-3
    partitioned); False: the module calls; True: always (CUDA, or any device under TRITON_INTERPRET=1)."""

    def __init__(self, dim: int, hidden: int, kind: str, fused: bool | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.fused = fused
        self.up = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden)
        self.down = nn.Linear(hidden, dim)

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` takes the fused GELU path for ``x``."""
        if self.kind != "gelu" or self.fused is False:
            return False
        return self.fused or (x.is_cuda and x.dtype in FUSED_MLP_DTYPES and plain_linear(self.up)
                              and plain_linear(self.down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuses(x):
            return gelu_mlp(x, self.up.weight, self.up.bias, self.down.weight, self.down.bias)
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)
