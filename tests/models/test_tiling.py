"""3D token tiling permutation."""

import pytest
import torch

from sla_dist.models.tiling import TokenTiling, inverse_permutation, tile_permutation


def _coords(grid):
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack((t, h, w), dim=-1).reshape(-1, 3)


@pytest.mark.parametrize("grid, tile", [((8, 8, 8), (4, 4, 4)), ((5, 6, 9), (4, 4, 4)), ((21, 30, 52), (4, 4, 4)),
                                        ((3, 7, 2), (2, 8, 1))])
def test_is_a_permutation_that_round_trips(grid, tile):
    tiling = TokenTiling.build(grid, tile)
    n = grid[0] * grid[1] * grid[2]
    assert torch.equal(tiling.perm.sort().values, torch.arange(n))
    x = torch.randn(2, n, 3)
    tiled = tiling.tile(x)
    assert not torch.equal(tiled, x)
    assert torch.equal(tiling.untile(tiled), x)
    assert torch.equal(tiling.tile(tiling.untile(x)), x)


@pytest.mark.parametrize("grid", [(8, 8, 12), (5, 6, 9), (21, 30, 52)])
def test_full_tiles_come_first_as_aligned_cubes(grid):
    tile = (4, 4, 4)
    coords = _coords(grid)[tile_permutation(grid, tile)]
    num_full = (grid[0] // 4) * (grid[1] // 4) * (grid[2] // 4)
    chunks = coords[: num_full * 64].view(num_full, 64, 3)
    extent = chunks.max(1).values - chunks.min(1).values
    assert torch.equal(extent, torch.full_like(extent, 3))
    assert torch.equal(chunks.min(1).values % 4, torch.zeros_like(extent))
    # The remainder lies in partial tiles only, ordered tile by tile.
    rest = coords[num_full * 64 :]
    full_limit = torch.tensor([grid[0] // 4 * 4, grid[1] // 4 * 4, grid[2] // 4 * 4])
    assert bool((rest >= full_limit).any(-1).all())


def test_inverse_permutation():
    perm = torch.randperm(100)
    x = torch.randn(100)
    assert torch.equal(x[perm][inverse_permutation(perm)], x)


def test_errors_name_values():
    with pytest.raises(ValueError, match=r"tile=\(4, 0, 4\)"):
        tile_permutation((4, 4, 4), (4, 0, 4))
    tiling = TokenTiling.build((2, 2, 2), (2, 2, 2))
    with pytest.raises(ValueError, match="has 9 tokens but grid"):
        tiling.tile(torch.randn(1, 9, 2))
