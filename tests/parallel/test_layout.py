"""choose_layout: the Ulysses x ring split of an SP group from the head count and the exchange cost model."""

from __future__ import annotations

import pytest

from sla_dist.parallel.layout import AttentionShape, SPCostModel, choose_layout, exchange_seconds

SHAPE = AttentionShape(heads=12, seq_len=131072, head_dim=128)


def test_heads_not_divisible_by_sp_size_use_the_ring():
    # 12 heads over 8 ranks: Ulysses can take at most 4 of them, the ring the remaining factor 2.
    choice = choose_layout(8, SHAPE)
    assert (choice.ulysses_degree, choice.ring_degree) == (4, 2)
    assert set(choice.seconds) == {4, 2, 1}
    # 5 heads over 2 ranks: only context parallel can split them.
    choice = choose_layout(2, AttentionShape(heads=5, seq_len=4096, head_dim=64))
    assert (choice.ulysses_degree, choice.ring_degree) == (1, 2)
    assert "only ulysses_degree=1" in choice.reason


@pytest.mark.parametrize("fraction", [None, 1.0, 0.5])
def test_high_or_unknown_fetched_fraction_picks_ulysses(fraction):
    choice = choose_layout(2, SHAPE, fraction)
    assert (choice.ulysses_degree, choice.ring_degree) == (2, 1)
    assert choice.seconds[2] < choice.seconds[1]


def test_low_fetched_fraction_picks_context_parallel():
    choice = choose_layout(2, SHAPE, 0.02)
    assert (choice.ulysses_degree, choice.ring_degree) == (1, 2)
    assert choice.seconds[1] < choice.seconds[2]
    assert "0.02" in choice.reason


def test_worst_case_fraction_never_prefers_the_ring():
    """At f = 1 context parallel moves P / 2 times Ulysses' bytes plus its own work: the safe default."""
    for heads in (8, 12, 24, 40):
        for seq_len in (1024, 32768, 131072):
            for sp in (2, 4, 8):
                if heads % sp:
                    continue
                shape = AttentionShape(heads, seq_len, 128)
                choice = choose_layout(sp, shape, 1.0)
                assert choice.ulysses_degree == sp, (heads, seq_len, sp, choice.seconds)


def test_context_cost_grows_with_the_fetched_fraction():
    costs = [exchange_seconds(SHAPE, 1, 2, f, SPCostModel()) for f in (0.0, 0.25, 0.5, 1.0)]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    # Ulysses does not depend on it.
    assert exchange_seconds(SHAPE, 2, 1, 0.1, SPCostModel()) == exchange_seconds(SHAPE, 2, 1, 1.0, SPCostModel())


def test_ring_not_allowed_keeps_ulysses_or_names_the_heads():
    assert choose_layout(2, SHAPE, 0.0, ring_allowed=False).ulysses_degree == 2
    with pytest.raises(ValueError, match=r"5 heads .* sp_size=2"):
        choose_layout(2, AttentionShape(heads=5, seq_len=4096, head_dim=64), ring_allowed=False)


def test_one_rank_exchanges_nothing():
    choice = choose_layout(1, SHAPE)
    assert (choice.ulysses_degree, choice.ring_degree) == (1, 1)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), "high", True])
def test_bad_fraction_is_named(fraction):
    with pytest.raises(ValueError, match="fetch_fraction="):
        choose_layout(2, SHAPE, fraction)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="sp_size=0"):
        choose_layout(0, SHAPE)
    with pytest.raises(ValueError, match="heads=0"):
        AttentionShape(heads=0, seq_len=8, head_dim=8)
    with pytest.raises(ValueError, match=r"SPCostModel.bytes_per_s=0"):
        SPCostModel(bytes_per_s=0)
    with pytest.raises(ValueError, match=r"SPCostModel.latency_s=-1"):
        SPCostModel(latency_s=-1)
