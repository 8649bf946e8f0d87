"""3D rotary position embedding over (t, h, w) token coordinates, Wan-style.

The head dim D is split into three groups of rotation pairs: h and w get ``2 * (D // 6)`` channels each and t the
rest. Pairs are interleaved (channels 2i, 2i+1 rotate together), as in Wan, so diffusers Wan weights and tables
line up with these. Tables are [L, D/2] per-token rows: sequence-parallel code splits or permutes them along L
exactly as it does the tokens.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dim rotated by t, h and w positions."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """[N] positions -> [N, dim / 2] rotation angles, frequencies theta^(-2i / dim)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return positions.to(torch.float64)[:, None] * inv_freq


def rope_tables(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 [T * H * W, head_dim / 2], for tokens in raster (t, h, w) order."""
    T, H, W = grid
    angles = []
    for size, dim, shape in zip(grid, axis_dims(head_dim), ((T, 1, 1), (1, H, 1), (1, 1, W))):
        per_axis = _axis_angles(torch.arange(size, device=device), dim, theta)
        angles.append(per_axis.view(*shape, dim // 2).expand(T, H, W, dim // 2))
    # Angles are built in float64 so that large positions keep their precision before cos / sin.
    table = torch.cat(angles, dim=-1).reshape(T * H * W, head_dim // 2)
    return table.cos().float(), table.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` [B, L, H, D] by per-token tables ``cos``, ``sin`` [L, D / 2].

    Computed in float32 (float64 for float64 x) and returned in x's dtype."""
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
