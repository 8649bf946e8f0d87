"""Triton device functions for the linear branch's feature maps phi and their backward.

phi acts row-wise on a [rows, D] tile in float32. FEATURE_MAP is a constexpr id: the position of the name in
``sla_dist.config.FEATURE_MAPS`` (softmax 0, elu 1, relu 2).
"""

import triton
import triton.language as tl


@triton.jit
def phi_fwd(x, FEATURE_MAP: tl.constexpr):
    if FEATURE_MAP == 0:  # softmax over the head dimension
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        return e / tl.sum(e, axis=1)[:, None]
    elif FEATURE_MAP == 1:  # elu(x) + 1
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:  # relu
        return tl.maximum(x, 0.0)


@triton.jit
def phi_bwd(phi, dphi, FEATURE_MAP: tl.constexpr):
    """dL/dx given phi(x) and dL/dphi. Each map's derivative is a function of its value, so x need not stay live:
    elu(x) + 1 > 1 exactly where x > 0 (where x + 1 rounds to 1 the two branches agree), relu(x) > 0 exactly
    where x > 0. relu's 0/1 factor is ceil(min(phi, 1)) (exact for phi >= 0) rather than a select on phi > 0: with
    the select, Triton 3.6 compared phi in the layout it was loaded in and moved the [rows, D] i1 mask into the
    layout of dphi, which made the backward's pre-pass spill (160 B at D 128)."""
    if FEATURE_MAP == 0:
        return phi * (dphi - tl.sum(dphi * phi, axis=1)[:, None])
    elif FEATURE_MAP == 1:
        return tl.where(phi > 1.0, dphi, dphi * phi)
    else:
        return dphi * tl.ceil(tl.minimum(phi, 1.0))
