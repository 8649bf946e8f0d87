"""SLAStrategy's loss factor that makes DeepSpeed ZeRO-3 sum the sequence-parallel gradient shares (the end-to-end
check is test_launch.py's ZeRO-3 SP=2 run following the single-process reference), its automatic Ulysses x ring
split, and the recipe's collective timeout reaching every process group the strategy makes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sla_dist import PatchConfig, SLAConfig, apply_sla, dit_config
from sla_dist.lightning.recipe import load_recipe
from sla_dist.lightning.run import build_trainer
from sla_dist.lightning.strategy import (SequenceParallelUnit, SLAStrategy, attention_facts, choose_module_layout,
                                         sp_loss_factor, zero_config)
from sla_dist.models import VideoDiT
from sla_dist.parallel import SequenceParallelGroups
from sla_dist.parallel.groups import group_timeout
from sla_dist.parallel.layout import SPCostModel
from tests.lightning.ranks import backend_overrides, describe, rank_device, run_ranks
from tests.parallel.dist_utils import device_params, run_distributed

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("sp_size", [1, 2, 4])
def test_loss_factor_only_for_zero3_under_sp(stage, sp_size):
    config = zero_config(stage, False, False, 1.0, 2)
    assert sp_loss_factor(config, sp_size) == (sp_size if stage == 3 else 1)


def test_zero3_sp_refuses_mixed_reduction_paths():
    config = zero_config(3, False, False, 1.0, 2)
    config["zero_optimization"]["reduce_scatter"] = False
    with pytest.raises(ValueError, match="reduce_scatter"):
        sp_loss_factor(config, 2)
    assert sp_loss_factor(config, 1) == 1


def _dit(heads: int, sla: bool, skip_first: int = 0) -> torch.nn.Module:
    model = VideoDiT(dit_config("tiny", dim=32 * heads, num_heads=heads))
    if sla:
        apply_sla(model, PatchConfig(sla=SLAConfig(topk=0.5), skip_first=skip_first))
    return torch.nn.ModuleDict(dict(model=model))


def _choose(module, sp_size, fraction=None, length=None):
    heads, dims, ring_allowed = attention_facts(module)
    return choose_module_layout(heads, dims, ring_allowed, sp_size, fraction, length, SPCostModel())


def test_auto_layout_splits_heads_that_do_not_divide_over_the_ring():
    choice = _choose(_dit(2, sla=True), 4)
    assert (choice.ulysses_degree, choice.ring_degree) == (2, 2)
    choice = _choose(_dit(3, sla=True), 2)
    assert (choice.ulysses_degree, choice.ring_degree) == (1, 2)


def test_auto_layout_keeps_ulysses_when_heads_divide_and_nothing_is_measured():
    assert _choose(_dit(2, sla=True), 2).ulysses_degree == 2
    assert _choose(_dit(2, sla=True), 2, None, 32768).ulysses_degree == 2


def test_auto_layout_follows_the_measured_fetched_fraction():
    assert _choose(_dit(4, sla=True), 2, 0.9, 131072).ulysses_degree == 2
    assert _choose(_dit(4, sla=True), 2, 0.01, 131072).ulysses_degree == 1


def test_auto_layout_with_dense_layers_needs_divisible_heads():
    assert attention_facts(_dit(3, sla=True, skip_first=1))[2] is False
    with pytest.raises(ValueError, match=r"3 heads do not divide over sp_size=2"):
        _choose(_dit(3, sla=True, skip_first=1), 2)
    assert _choose(_dit(2, sla=False), 2, 0.0, 131072).ulysses_degree == 2


def test_strategy_layout_arguments_are_checked():
    with pytest.raises(ValueError, match=r"context_fetch_fraction=0.1 needs sequence_length"):
        SLAStrategy(sequence_parallel_size=2, context_fetch_fraction=0.1)
    with pytest.raises(ValueError, match=r"fetch_fraction=2"):
        SLAStrategy(sequence_parallel_size=2, context_fetch_fraction=2, sequence_length=100)
    with pytest.raises(ValueError, match=r"sequence_length=0"):
        SLAStrategy(sequence_parallel_size=2, sequence_length=0)
    assert SLAStrategy(sequence_parallel_size=2, ulysses_degree=1).auto_layout is False
    assert SLAStrategy(sequence_parallel_size=2).auto_layout is True


def _settle(device: torch.device) -> None:
    """Two gloo ranks: the automatic split of a 3-head SLA DiT is pure context parallel, groups rebuilt to match;
    an explicit ulysses_degree is kept; overlap_chunks survives the rebuild."""
    strategy = SLAStrategy(sequence_parallel_size=2, overlap_chunks=3)
    strategy.sp_groups = SequenceParallelGroups.build(strategy.sp_config)
    strategy.mpu = SequenceParallelUnit(strategy.sp_groups)
    assert strategy.sp_groups.ulysses_degree == 2
    strategy._settle_layout(_dit(3, sla=True))
    assert (strategy.sp_groups.ulysses_degree, strategy.sp_groups.ring_degree) == (1, 2)
    assert strategy.mpu.groups is strategy.sp_groups and strategy.layout_choice.ulysses_degree == 1
    assert strategy.sp_groups.config.overlap_chunks == 3
    fixed = SLAStrategy(sequence_parallel_size=2, ulysses_degree=2)
    fixed.sp_groups = SequenceParallelGroups.build(fixed.sp_config)
    fixed.mpu = SequenceParallelUnit(fixed.sp_groups)
    fixed._settle_layout(_dit(2, sla=True))
    assert fixed.sp_groups.ulysses_degree == 2 and fixed.layout_choice is None


def test_settle_layout_rebuilds_the_groups_on_every_rank():
    run_distributed(_settle, 2, "cpu")


def _group_timeouts(rank: int, device: str, out: str) -> None:
    recipe = load_recipe(RECIPE, [f"output_dir={out}", "trainer.devices=2", *backend_overrides(device),
                                  "parallel.sp_size=2", "parallel.timeout_s=77"])
    strategy = build_trainer(recipe).strategy
    strategy.setup_environment()  # initialises the default process group, then the SP / DP groups and the mpu's
    groups, mpu = strategy.sp_groups, strategy.mpu
    timeouts = {"default": group_timeout(), "mpu": group_timeout(mpu.get_model_parallel_group()),
                **{name: group_timeout(getattr(groups, f"{name}_group")) for name in ("sp", "dp", "ulysses", "ring")}}
    where = (dist.get_backend(), str(strategy.root_device))
    dist.barrier()
    dist.destroy_process_group()
    assert where == ("nccl" if device == "cuda" else "gloo", rank_device(device, rank)), where
    assert timeouts == dict.fromkeys(timeouts, timedelta(seconds=77)), timeouts


@pytest.mark.parametrize("device", device_params(2))
def test_recipe_timeout_reaches_every_group(tmp_path, device):
    results = run_ranks(_group_timeouts, device, 2, tmp_path, 60, str(tmp_path / "run"))
    assert [r.exitcode for r in results] == [0, 0], describe(results)
