"""SLAStrategy's loss factor that makes DeepSpeed ZeRO-3 sum the sequence-parallel gradient shares (the end-to-end
check is test_launch.py's ZeRO-3 SP=2 run following the single-process reference), and the recipe's collective
timeout reaching every process group the strategy makes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from sla_dist.lightning.recipe import load_recipe
from sla_dist.lightning.run import build_trainer
from sla_dist.lightning.strategy import sp_loss_factor, zero_config
from sla_dist.parallel.groups import group_timeout
from tests.lightning.ranks import run_ranks

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


def _group_timeouts(rank: int, out: str) -> None:
    recipe = load_recipe(RECIPE, [f"output_dir={out}", "trainer.devices=2", "trainer.accelerator=cpu",
                                  "parallel.sp_size=2", "parallel.timeout_s=77"])
    strategy = build_trainer(recipe).strategy
    strategy.setup_environment()  # initialises the default process group, then the SP / DP groups and the mpu's
    groups, mpu = strategy.sp_groups, strategy.mpu
    timeouts = {"default": group_timeout(), "mpu": group_timeout(mpu.get_model_parallel_group()),
                **{name: group_timeout(getattr(groups, f"{name}_group")) for name in ("sp", "dp", "ulysses", "ring")}}
    dist.barrier()
    dist.destroy_process_group()
    assert timeouts == dict.fromkeys(timeouts, timedelta(seconds=77)), timeouts


def test_recipe_timeout_reaches_every_group(tmp_path):
    results = run_ranks(_group_timeouts, 2, tmp_path, 60, str(tmp_path / "run"))
    logs = "\n".join(f"--- rank {i} (exit {r.exitcode}):\n{r.log[-3000:]}" for i, r in enumerate(results))
    assert [r.exitcode for r in results] == [0, 0], logs
