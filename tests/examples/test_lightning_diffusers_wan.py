"""examples/lightning_diffusers_wan.py: a user's own LightningModule holding a diffusers Wan, with SLACallback and
strategy="sla_deepspeed_stage_2", fits on the CPU and resumes from its checkpoint; with two processes at
sequence_parallel_size=2 as well."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from tests.parallel.dist_utils import run_distributed

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


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def _fit_sp2_and_resume(device: torch.device, out: str) -> None:
    # the processes already exist and hold the process group: Lightning must not launch its own
    rank = dist.get_rank()
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2")
    example = _example()
    first = example.fit(Path(out), 2, devices=2, sequence_parallel=2)
    model = first.lightning_module.model
    assert first.strategy.sp_groups is None and first.strategy.sp_config.sp_size == 2  # torn down after fit
    assert all(type(block.attn1.processor).__name__ == "WanSequenceParallelProcessor" for block in model.blocks)
    start, record = _StartStep(), _Losses()
    second = example.fit(Path(out), 3, devices=2, sequence_parallel=2, extra_callbacks=(start, record))
    assert start.step == 2 and second.global_step == 3
    # both ranks of the SP group hold the same sample and noise, and the model returns the gathered prediction:
    # they compute the same loss
    losses = [None, None]
    dist.all_gather_object(losses, record.losses)
    assert losses[0] == losses[1] and len(losses[0]) == 1 and math.isfinite(losses[0][0]), losses


def test_example_fits_at_sp2_and_resumes(tmp_path):
    run_distributed(_fit_sp2_and_resume, 2, "cpu", str(tmp_path))
