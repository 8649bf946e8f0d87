"""3D token tiling: reorder a video's token sequence so that consecutive tokens form compact (t, h, w) tiles.

In raster order a 64-token SLA block is a thin strip of one frame row, so its pooled query / key mixes tokens that
are far apart in the other two axes and block scores blur. Tiled order makes each block a small cube (4 x 4 x 4 =
64 tokens by default), whose tokens attend alike.

Grids whose sizes don't divide by the tile leave partial tiles at the far edges. All full tiles come first, in
raster order of tiles, then the partial ones: so every full tile stays aligned with the SLA blocks (the first
``num_full_tiles * tile_volume`` tokens split into whole tiles), and only the edge remainder forms mixed blocks.

The permutation is a pure index map: a model applies it to tokens *and* their RoPE tables (or to q, k, v after
RoPE), runs attention, and undoes it; every per-token operation commutes with it, so outputs are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.block_map import num_blocks


def tile_permutation(
    grid: tuple[int, int, int], tile: tuple[int, int, int], device: torch.device | None = None
) -> torch.Tensor:
    """perm [T*H*W] int64 with ``tiled = raster[perm]``: the raster index of each token in tiled order."""
    for name, values in (("grid", grid), ("tile", tile)):
        if len(values) != 3 or any(int(v) <= 0 for v in values):
            raise ValueError(f"{name}={tuple(values)} must be three positive sizes (t, h, w)")
    (T, H, W), (tt, th, tw) = grid, tile
    t, h, w = torch.meshgrid(torch.arange(T, device=device), torch.arange(H, device=device),
                             torch.arange(W, device=device), indexing="ij")
    n_h, n_w = num_blocks(H, th), num_blocks(W, tw)
    tile_index = ((t // tt) * n_h + h // th) * n_w + w // tw
    within = ((t % tt) * th + h % th) * tw + w % tw
    partial = ((t // tt + 1) * tt > T) | ((h // th + 1) * th > H) | ((w // tw + 1) * tw > W)
    num_tiles = num_blocks(T, tt) * n_h * n_w
    volume = tt * th * tw
    # One integer key per token: (partial, tile, position in tile), lexicographic; keys are distinct.
    key = (partial.long() * num_tiles + tile_index) * volume + within
    return torch.argsort(key.flatten())


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with ``x[perm][inv] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


@dataclass(frozen=True)
class TokenTiling:
    """A tile permutation of one token grid and its inverse, applied along a sequence dimension."""

    grid: tuple[int, int, int]
    tile_size: tuple[int, int, int]
    perm: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def build(cls, grid: tuple[int, int, int], tile: tuple[int, int, int],
              device: torch.device | None = None) -> "TokenTiling":
        perm = tile_permutation(grid, tile, device)
        return cls(tuple(grid), tuple(tile), perm, inverse_permutation(perm))

    @property
    def num_tokens(self) -> int:
        return self.perm.numel()

    def _check(self, x: torch.Tensor, dim: int) -> None:
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"dimension {dim} of shape {tuple(x.shape)} has {x.shape[dim]} tokens but grid "
                             f"{self.grid} has {self.num_tokens}")

    def tile(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Raster order -> tiled order along ``dim``."""
        self._check(x, dim)
        return x.index_select(dim, self.perm)

    def untile(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Tiled order -> raster order along ``dim``."""
        self._check(x, dim)
        return x.index_select(dim, self.inverse)
