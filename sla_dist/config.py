"""Typed configuration for sla-dist.

Each dataclass validates itself in ``__post_init__`` and names the offending value in the error, so a bad recipe
fails at load time rather than deep inside a kernel launch. The same classes serve as omegaconf structured schemas.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

FEATURE_MAPS = ("softmax", "elu", "relu")
LINEAR_SCOPES = ("marginal", "all", "none")
LINEAR_SUMS = ("save", "recompute")
DKDV_SPLIT_CHOICES = ("env", "off", "long")
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

    linear_sums: str = "save"
    """What the Triton backward does for the linear branch's per-query-block sums H_i, Z_i (one [B H, Nq, D D + D]
    buffer; one row per head for scope 'all'): 'save' keeps the forward's for the backward (it skips a summaries
    kernel and a 0/1 product), 'recompute' makes them again in the backward (the buffer is not held between forward
    and backward: 97 MiB at H 12, L 32768, D 128, BLKQ 128 in bfloat16). Nothing to keep for scope 'none'."""

    dkdv_split: str = "env"
    """Whether the Triton backward's dK/dV kernel splits long query-block lists (a key block that most query
    blocks chose) over extra programs: 'long' for this layer, 'off' for whole lists, 'env' (default) as the
    SLA_DIST_DKDV_SPLIT switch says (whole lists when unset). Worth it for skewed block maps, such as a video DiT's
    (on an H200 the 1.3B DiT's dK/dV took 1939 instead of 2084 us); on i.i.d. maps it costs ~1 % and float32
    scratch (64 MiB at H 12, L 32768, D 128)."""

    backend: str = "auto"
    """'triton' (fused kernels), 'reference' (dense PyTorch) or 'auto' (Triton on CUDA, reference on CPU)."""

    def __post_init__(self) -> None:
        validate_fractions(self.topk, self.negligible)
        validate_block_sizes(self.block_q, self.block_k)
        validate_branch_options(self.feature_map, self.linear_scope)
        validate_linear_sums(self.linear_sums)
        validate_dkdv_split(self.dkdv_split)
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


def is_int(value: object) -> bool:
    """An integer, and not a bool (``True`` is an int to Python but never a meaningful size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError naming ``value`` unless it is an integer (not a bool) of at least ``minimum``."""
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name}={value!r} must be an integer of at least {minimum}")


def validate_block_sizes(block_q: object, block_k: object) -> None:
    """The block sizes the Triton kernels support; shared by SLAConfig, block-map prediction and the kernel op."""
    for name, value, supported in (("block_q", block_q, SUPPORTED_BLOCK_Q), ("block_k", block_k, SUPPORTED_BLOCK_K)):
        if not is_int(value) or value not in supported:
            raise ValueError(f"{name}={value!r} is not supported; choose one of {supported}")


def validate_branch_options(feature_map: object, linear_scope: object) -> None:
    """The linear branch's feature map and scope; shared by SLAConfig and the functional API."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r} is not one of {FEATURE_MAPS}")
    if linear_scope not in LINEAR_SCOPES:
        raise ValueError(f"linear_scope={linear_scope!r} is not one of {LINEAR_SCOPES}")


def validate_dkdv_split(dkdv_split: object) -> None:
    """A layer's dK/dV split choice; shared by SLAConfig and the functional API."""
    if dkdv_split not in DKDV_SPLIT_CHOICES:
        raise ValueError(f"dkdv_split={dkdv_split!r} is not one of {DKDV_SPLIT_CHOICES}")


def validate_linear_sums(linear_sums: object) -> None:
    """The Triton backward's choice for the linear branch's sums; shared by SLAConfig and the functional API."""
    if linear_sums not in LINEAR_SUMS:
        raise ValueError(f"linear_sums={linear_sums!r} is not one of {LINEAR_SUMS}")
