"""examples/lightning_diffusers_wan.py: a user's own LightningModule holding a diffusers Wan, with SLACallback and
strategy="sla_deepspeed_stage_2", fits on the CPU and resumes from its checkpoint."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

pytest.importorskip("diffusers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_diffusers_wan.py"


def _example():
    spec = importlib.util.spec_from_file_location("lightning_diffusers_wan", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StartStep(Callback):
    step: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def test_example_fits_with_sla_and_resumes(tmp_path):
    example = _example()
    first = example.fit(tmp_path, 3)
    model = first.lightning_module.model
    assert [i for i, block in enumerate(model.blocks) if hasattr(block.attn1, "sla")] == [0, 1]
    assert first.strategy.__class__.__name__ == "SLAStrategy"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    start = _StartStep()
    second = example.fit(tmp_path, 5, extra_callbacks=(start,))
    assert start.step == 3 and second.global_step == 5
    assert math.isfinite(float(second.callback_metrics["train/loss"]))
