"""SLAStrategy's loss factor that makes DeepSpeed ZeRO-3 sum the sequence-parallel gradient shares (the end-to-end
check is test_launch.py's ZeRO-3 SP=2 run following the single-process reference)."""

from __future__ import annotations

import pytest

from sla_dist.lightning.strategy import sp_loss_factor, zero_config


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
