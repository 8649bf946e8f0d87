"""SLA over one part of the keys merged exactly with dense attention over another, by log-sum-exp.

Joint text + video attention (CogVideoX) must not lose the few text keys to top-k selection, so video queries
attend densely to the text keys and sparsely (SLA) to the video keys. The two softmax parts combine exactly:

    O = (e^lse_s O_s + e^lse_t O_t) / (e^lse_s + e^lse_t) + proj_l(O_l)
      = O_t + sigmoid(lse_s - lse_t) (O_s - O_t) + proj_l(O_l)

so at topk = 1 with proj_l = 0 it equals dense attention over the concatenated keys.
"""

from __future__ import annotations

import torch

from ..attention import SparseLinearAttention


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
    [B, H, Lt, D]; returns [B, H, Lq, D] in q's dtype.

    The SLA part is ``sla.branches`` (its input checks and run dtype) and ``sla.project`` (proj_l called as a
    module, so ZeRO-3 gathers it), exactly as ``sla``'s own forward uses them."""
    o_s, o_l, lse_s, _ = sla.branches(q, k, v)
    o_t, lse_t = attention_with_lse(q, k_dense, v_dense)
    acc = _accumulation_dtype(q)
    weight_s = torch.sigmoid(lse_s.to(acc) - lse_t.to(acc))[..., None]
    out = torch.lerp(o_t.to(acc), o_s.to(acc), weight_s)
    if o_l is not None:
        out = out + sla.project(o_l).to(acc)
    return out.to(q.dtype)
