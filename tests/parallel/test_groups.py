"""Sequence / data parallel process groups (sla_dist/parallel/groups.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from sla_dist.lightning.strategy import SequenceParallelUnit
from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups
from sla_dist.parallel.groups import group_timeout

from dist_utils import TIMEOUT, device_params, run_distributed


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(sp_size=0), "sp_size=0"),
    (dict(sp_size=2.0), "sp_size=2.0 must be an integer"),
    (dict(sp_size=True), "sp_size=True must be an integer"),
    (dict(sp_size=4, ulysses_degree=2.0), "ulysses_degree=2.0 must be a positive divisor"),
    (dict(sp_size=4, ulysses_degree=3), "ulysses_degree=3 must be a positive divisor of sp_size=4"),
    (dict(sp_size=4, ulysses_degree=0), "ulysses_degree=0"),
])
def test_config_invalid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceParallelConfig(**kwargs)


def test_config_split():
    assert SequenceParallelConfig(sp_size=8).ring_degree == 1
    config = SequenceParallelConfig(sp_size=8, ulysses_degree=2)
    assert (config.ulysses_degree, config.ring_degree) == (2, 4)


def test_without_torch_distributed():
    groups = SequenceParallelGroups.build(SequenceParallelConfig())
    assert (groups.world_size, groups.sp_size, groups.dp_size, groups.sp_rank) == (1, 1, 1, 0)
    assert groups.sp_group is None
    with pytest.raises(ValueError, match="sp_size=2 needs torch.distributed"):
        SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2))


def _members(group) -> list[int]:
    ranks = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, dist.get_rank(), group=group)
    return ranks


def _layouts(device) -> None:
    rank = dist.get_rank()
    # world 4 = dp 2 x sp 2 (pure Ulysses)
    g = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2))
    assert (g.dp_size, g.dp_rank, g.sp_rank, g.ring_degree) == (2, rank // 2, rank % 2, 1)
    assert _members(g.sp_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert _members(g.ulysses_group) == _members(g.sp_group)
    assert _members(g.dp_group) == [rank % 2, rank % 2 + 2]
    assert _members(g.ring_group) == [rank]
    assert dist.get_rank(g.sp_group) == g.sp_rank

    # world 4 = sp 4 = ring 2 x ulysses 2: Ulysses pairs are consecutive ranks, ring pairs two apart
    g = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=4, ulysses_degree=2))
    assert (g.dp_size, g.ulysses_rank, g.ring_rank) == (1, rank % 2, rank // 2)
    assert _members(g.sp_group) == [0, 1, 2, 3]
    assert _members(g.ulysses_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert _members(g.ring_group) == [rank % 2, rank % 2 + 2]
    assert _members(g.dp_group) == [rank]
    assert dist.get_rank(g.ring_group) == g.ring_rank and dist.get_rank(g.ulysses_group) == g.ulysses_rank

    # building again (each wrapped model, each test) reuses this process's groups instead of creating new ones
    again = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=4, ulysses_degree=2))
    for name in ("sp", "dp", "ulysses", "ring"):
        assert getattr(again, f"{name}_group") is getattr(g, f"{name}_group"), f"a new {name} group"
    pure = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=4))
    assert pure.sp_group is g.sp_group and pure.ulysses_group is pure.sp_group

    with pytest.raises(ValueError, match="world size 4 is not a multiple of sp_size=3"):
        SequenceParallelGroups.build(SequenceParallelConfig(sp_size=3))


@pytest.mark.parametrize("device", device_params(4))
def test_layouts_four_ranks(device):
    run_distributed(_layouts, 4, device)


def _timeouts(device) -> None:
    # what torch gives a group created without a timeout: not the default group's
    assert group_timeout(dist.new_group([0, 1])) != TIMEOUT
    names = ("sp_group", "dp_group", "ulysses_group", "ring_group")
    inherited = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2))
    assert group_timeout() == TIMEOUT
    assert {name: group_timeout(getattr(inherited, name)) for name in names} == dict.fromkeys(names, TIMEOUT)
    assert group_timeout(SequenceParallelUnit(inherited).get_model_parallel_group()) == TIMEOUT
    given = SequenceParallelGroups.build(SequenceParallelConfig(sp_size=2), timeout=timedelta(seconds=45))
    assert {name: group_timeout(getattr(given, name)) for name in names} == dict.fromkeys(names, timedelta(seconds=45))
    assert given.sp_group is not inherited.sp_group, "a cached group with another timeout was reused"


@pytest.mark.parametrize("device", device_params(2))
def test_subgroups_get_the_default_group_timeout(device):
    run_distributed(_timeouts, 2, device)
