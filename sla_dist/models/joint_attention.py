"""SLA over one part of the keys merged exactly with dense attention over another, by log-sum-exp.

Joint text + video attention (CogVideoX) must not lose the few text keys to top-k selection, so video queries
attend densely to the text keys and sparsely (SLA) to the video keys. The two softmax parts combine exactly:

    O = (e^lse_s O_s + e^lse_t O_t) / (e^lse_s + e^lse_t) + proj_l(O_l)
      = O_t + sigmoid(lse_s - lse_t) (O_s - O_t) + proj_l(O_l)

so at topk = 1 with proj_l = 0 it equals dense attention over the concatenated keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import SparseLinearAttention
from ..kernels.block_map import predict_block_map
from ..kernels.op import sla_branches
from ..kernels.reference import sla_branches_ref


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention and its natural-log LSE [B, H, Lq] (float32, or float64 for float64 inputs); for
    short key sets, as it materialises the [Lq, Lk] scores."""
    acc = _accumulation_dtype(q)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = scores.logsumexp(dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return (probs.to(v.dtype) @ v), lse


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def sla_with_dense_keys(
    sla: SparseLinearAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_dense: torch.Tensor,
    v_dense: torch.Tensor,
) -> torch.Tensor:
    """Queries q [B, H, Lq, D] attend with ``sla`` to k, v [B, H, Lk, D] and densely to k_dense, v_dense
    [B, H, Lt, D]; returns [B, H, Lq, D] in q's dtype."""
    c = sla.config
    block_map = predict_block_map(q, k, topk=c.topk, negligible=c.negligible, block_q=c.block_q, block_k=c.block_k)
    branches = sla_branches if sla.uses_kernels(q.device) else sla_branches_ref
    o_s, o_l, lse_s = branches(q, k, v, block_map, feature_map=c.feature_map, linear_scope=c.linear_scope)
    o_t, lse_t = attention_with_lse(q, k_dense, v_dense)
    acc = _accumulation_dtype(q)
    weight_s = torch.sigmoid(lse_s.to(acc) - lse_t.to(acc))[..., None]
    out = torch.lerp(o_t.to(acc), o_s.to(acc), weight_s).to(q.dtype)
    if o_l is not None:
        out = out + F.linear(o_l.to(q.dtype), sla.proj_l.weight.to(q.dtype), sla.proj_l.bias.to(q.dtype))
    return out
