"""Typed configuration for sla-dist.

Each dataclass validates itself in ``__post_init__`` and names the offending value in the error, so a bad recipe
fails at load time rather than deep inside a kernel launch. The same classes serve as omegaconf structured schemas.
"""

from __future__ import annotations

from dataclasses import dataclass

FEATURE_MAPS = ("softmax", "elu", "relu")
LINEAR_SCOPES = ("marginal", "all", "none")
BACKENDS = ("auto", "triton", "reference")
SUPPORTED_BLOCK_Q = (64, 128)
SUPPORTED_BLOCK_K = (64,)


@dataclass
class SLAConfig:
    """How one Sparse-Linear Attention layer splits and computes attention."""

    topk: float = 0.05
    """Fraction of key blocks per query block computed exactly (critical). At least one block is always critical."""

    negligible: float = 0.10
    """Fraction of key blocks per query block skipped entirely (the lowest-scoring ones)."""

    block_q: int = 64
    """Query tokens per block (BLKQ): 64 or 128."""

    block_k: int = 64
    """Key tokens per block (BLKK): 64."""

    feature_map: str = "softmax"
    """Feature map phi of the linear branch: 'softmax' (over the head dim), 'elu' (elu + 1) or 'relu'."""

    linear_scope: str = "marginal"
    """Keys the linear branch sums over: 'marginal' (the paper), 'all' (the public main branch) or 'none'
    (sparse branch only, for ablations)."""

    backend: str = "auto"
    """'triton' (fused kernels), 'reference' (dense PyTorch) or 'auto' (Triton on CUDA, reference on CPU)."""

    def __post_init__(self) -> None:
        validate_fractions(self.topk, self.negligible)
        if self.block_q not in SUPPORTED_BLOCK_Q:
            raise ValueError(f"block_q={self.block_q} is not supported; choose one of {SUPPORTED_BLOCK_Q}")
        if self.block_k not in SUPPORTED_BLOCK_K:
            raise ValueError(f"block_k={self.block_k} is not supported; choose one of {SUPPORTED_BLOCK_K}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={self.feature_map!r} is not one of {FEATURE_MAPS}")
        if self.linear_scope not in LINEAR_SCOPES:
            raise ValueError(f"linear_scope={self.linear_scope!r} is not one of {LINEAR_SCOPES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")

    @property
    def sparsity(self) -> float:
        """Nominal fraction of key blocks that the sparse branch skips."""
        return 1.0 - self.topk


def validate_fractions(topk: float, negligible: float) -> None:
    """Check the two block fractions; shared by SLAConfig and the block-map builder."""
    if not 0.0 <= topk <= 1.0:
        raise ValueError(f"topk={topk} must lie in [0, 1]")
    if not 0.0 <= negligible <= 1.0:
        raise ValueError(f"negligible={negligible} must lie in [0, 1]")
    if topk + negligible > 1.0 + 1e-9:
        raise ValueError(f"topk + negligible = {topk} + {negligible} = {topk + negligible} exceeds 1")
