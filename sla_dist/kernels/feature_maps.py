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
def phi_bwd(x, phi, dphi, FEATURE_MAP: tl.constexpr):
    """dL/dx given x, phi(x) and dL/dphi."""
    if FEATURE_MAP == 0:
        return phi * (dphi - tl.sum(dphi * phi, axis=1)[:, None])
    elif FEATURE_MAP == 1:
        return tl.where(x > 0, dphi, dphi * phi)
    else:
        return tl.where(x > 0, dphi, 0.0)
