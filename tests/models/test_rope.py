"""3D RoPE tables and rotation."""

import torch

from sla_dist.models.rope import apply_rope, axis_dims, rope_tables


def test_axis_split_covers_head_dim():
    for head_dim in (32, 64, 128):
        t, h, w = axis_dims(head_dim)
        assert t + h + w == head_dim and h == w and min(t, h, w) % 2 == 0


def test_rotation_keeps_pair_norms():
    grid = (3, 4, 5)
    cos, sin = rope_tables(grid, 32)
    assert cos.shape == sin.shape == (60, 16)
    x = torch.randn(2, 60, 3, 32)
    y = apply_rope(x, cos, sin)
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    assert not torch.allclose(y[:, 1:], x[:, 1:])


def test_scores_depend_only_on_relative_position():
    grid, head_dim = (4, 5, 6), 64
    cos, sin = rope_tables(grid, head_dim, theta=100.0)
    q, k = torch.randn(2, 1, 1, head_dim, dtype=torch.float64).unbind(0)
    index = lambda t, h, w: (t * grid[1] + h) * grid[2] + w  # noqa: E731

    def score(pos_q, pos_k):
        iq, ik = index(*pos_q), index(*pos_k)
        rq = apply_rope(q, cos[iq : iq + 1].double(), sin[iq : iq + 1].double())
        rk = apply_rope(k, cos[ik : ik + 1].double(), sin[ik : ik + 1].double())
        return float((rq * rk).sum())

    base = score((0, 1, 2), (2, 0, 4))
    assert abs(score((1, 2, 1), (3, 1, 3)) - base) < 1e-4
    assert abs(score((0, 1, 2), (2, 0, 3)) - base) > 1e-3
