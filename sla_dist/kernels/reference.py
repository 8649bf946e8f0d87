"""Dense-masked PyTorch reference of SLA: the truth every kernel is tested against.

It materialises the [L, L] attention matrix, so it is for tests and small CPU runs only. It runs in any floating
dtype; in float64 it is the "exact" answer, and in the kernel's dtype it measures how much error that dtype alone
costs (the kernels must stay within a small multiple of it).

    O   = O_s + proj_l(O_l)
    O_s = softmax(Q K^T / sqrt(D) masked to the critical pairs) V,  0 for a row with no critical pair
    O_l = (A V) / (A 1),  A = phi(Q) phi(K)^T masked to the linear pairs,  0 where A 1 == 0

Like the kernels' float32 scores, the scores overflow only where the scaled ones do: the unscaled Q K^T of large
float16 inputs would overflow (|q . k| > 65504) first. A row with no critical pair (only a hand-built map has one)
gives O_s = 0 and lse = -inf, as in the kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import FEATURE_MAPS, validate_branch_options
from .block_map import CRITICAL, MARGINAL, BlockMap, check_block_map


def feature_map_ref(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi(x) applied over the head dimension."""
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"feature_map={name!r} is not one of {FEATURE_MAPS}")


def _scaled_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Q K^T / sqrt(D) in q's dtype, without overflowing before the scale does.

    Q is first divided by 2^e >= sqrt(D), which is exact, so the product is no larger than the scaled scores; the
    rest of the scale, 2^e / sqrt(D) in [1, 2), comes after. Power-of-two factors do not change rounding, so the
    scores are those of (Q K^T) * D^-0.5 bit for bit (in float16 but for a rare last-bit flip where Q / 2^e turns
    subnormal): the low-precision reference, the yardstick of the kernels' error, keeps its accuracy. Scaling Q by
    D^-0.5 itself rounds differently and made the bfloat16 / float16 reference 10-20% more accurate at D = 128."""
    shift = 2.0 ** math.ceil(math.log2(q.shape[-1]) / 2)
    return ((q / shift) @ k.transpose(-1, -2)) * (shift * q.shape[-1] ** -0.5)


def sparse_branch_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: BlockMap
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O_s [B, H, Lq, D], lse [B, H, Lq]): exact softmax attention restricted to each query's critical key blocks,
    and the natural-log log-sum-exp of its scaled scores; 0 and -inf on a row with no critical key."""
    critical = block_map.token_mask(CRITICAL)
    empty = ~critical.any(-1, keepdim=True)
    # Empty rows get finite scores, then a zero output: -inf everywhere would make softmax, logsumexp and their
    # gradients NaN.
    scores = _scaled_scores(q, k).masked_fill(~critical, float("-inf")).masked_fill(empty, 0.0)
    o_s = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0) @ v
    return o_s, torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf"))


def linear_branch_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: BlockMap, feature_map: str, linear_scope: str
) -> torch.Tensor:
    """O_l [B, H, Lq, D]: normalised linear attention over the marginal key blocks (or all keys)."""
    a = feature_map_ref(q, feature_map) @ feature_map_ref(k, feature_map).transpose(-1, -2)
    if linear_scope == "marginal":
        a = a * block_map.token_mask(MARGINAL).to(a.dtype)
    elif linear_scope != "all":
        raise ValueError(f"linear_scope={linear_scope!r} has no linear branch")
    num = a @ v
    den = a.sum(-1, keepdim=True)
    empty = den == 0
    # Divide by 1 where the denominator vanishes so that neither value nor gradient becomes NaN.
    return torch.where(empty, torch.zeros_like(num), num / torch.where(empty, torch.ones_like(den), den))


def sla_branches_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    *,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Reference twin of :func:`sla_dist.kernels.op.sla_branches`: (o_s, o_l or None, natural-log lse). Takes any
    positive block sizes; a hand-built map has its values checked first."""
    validate_branch_options(feature_map, linear_scope)
    check_block_map(q, k, block_map, kernel=False)
    o_s, lse = sparse_branch_ref(q, k, v, block_map)
    o_l = None if linear_scope == "none" else linear_branch_ref(q, k, v, block_map, feature_map, linear_scope)
    return o_s, o_l, lse


def sla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    *,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
) -> torch.Tensor:
    """Full SLA output [B, H, Lq, D] from q [B, H, Lq, D], k, v [B, H, Lk, D] and a precomputed block map."""
    return project_branches(sla_branches_ref, q, k, v, block_map, proj_weight, proj_bias, feature_map, linear_scope)


def project_branches(branches, q, k, v, block_map, proj_weight, proj_bias, feature_map, linear_scope):
    """O_s + proj_l(O_l) from a ``branches`` function (the kernels' or the reference's); no weight, no branch."""
    validate_branch_options(feature_map, linear_scope)  # before a missing weight turns any scope into 'none'
    if proj_weight is None:
        linear_scope = "none"
    out, o_l, _ = branches(q, k, v, block_map, feature_map=feature_map, linear_scope=linear_scope)
    if o_l is not None:
        out = out + F.linear(o_l, proj_weight, proj_bias)
    return out
