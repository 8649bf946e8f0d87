"""Launch settings per kernel and shape.

One table so that tuning (issue: SLA kernel performance on Hopper) has a single place to land. The interpreter
ignores warps and stages; these values are starting points for Hopper.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    num_warps: int
    num_stages: int


def launch_config(kernel: str, block_q: int, head_dim: int) -> LaunchConfig:
    """Warps and pipeline depth for ``kernel`` in {'fwd', 'summaries', 'delta', 'dq', 'dkdv'}."""
    if kernel == "delta":
        return LaunchConfig(num_warps=4, num_stages=1)
    if kernel == "summaries":
        return LaunchConfig(num_warps=8 if head_dim >= 128 else 4, num_stages=1)
    wide = head_dim >= 128 or block_q >= 128
    if kernel == "fwd":
        return LaunchConfig(num_warps=8 if wide else 4, num_stages=2)
    if kernel in ("dq", "dkdv"):
        return LaunchConfig(num_warps=8 if wide else 4, num_stages=1)
    raise ValueError(f"unknown kernel {kernel!r}")
