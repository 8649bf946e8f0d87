"""sparsity.calibrate in a real run: SLAStrategy (DeepSpeed ZeRO-2, one rank on gloo, in process on CPU). ZeRO keeps
its own fp32 copy of every parameter, from which each optimizer step rewrites the module's: the calibrated proj_l
must be in that copy too, or the step after calibration puts the old proj_l back."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from sla_dist import SparseLinearAttention
from sla_dist.lightning import run
from sla_dist.lightning.recipe import load_recipe
from tests.lightning.runs import in_process_runs

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"


class ProjectionProbe(pl.Callback):
    """proj_l of the first SLA layer at the end of every step (after SLACallback's own on_train_batch_end), with
    DeepSpeed's fp32 master copy and Adam momentum of it."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        proj = next(m for m in pl_module.model.modules() if isinstance(m, SparseLinearAttention)).proj_l
        self.steps[trainer.global_step - 1] = {
            "module": proj.weight.detach().float().clone(),
            "master": safe_get_full_fp32_param(proj.weight).clone(),
            "exp_avg": safe_get_full_optimizer_state(proj.weight, "exp_avg").clone()}
        self.dtype = proj.weight.dtype


@pytest.mark.timeout(120)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_calibrated_proj_l_survives_the_next_zero2_optimizer_step(tmp_path, precision):
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                                  "trainer.checkpoint_every=3", "trainer.val_every=0", "trainer.progress_bar=false",
                                  "sample.enabled=false", "data.batch_size=2", "sparsity.dense_steps=1",
                                  "sparsity.anneal_steps=0", "sparsity.error_every=0", "sparsity.calibrate=true",
                                  "parallel.zero_stage=2", "optim.warmup_steps=1",
                                  f"trainer.precision={precision}"])
    probe = ProjectionProbe()
    with in_process_runs():
        run.train(recipe, extra_callbacks=[probe])
    before, calibrated, after = probe.steps[0], probe.steps[1], probe.steps[2]
    assert probe.dtype == (torch.bfloat16 if precision == "bf16-mixed" else torch.float32)
    # step 1 (dense_steps + anneal_steps) calibrated: module and master copy hold the fit, its momentum is zero
    assert calibrated["module"].abs().max() > 10 * before["module"].abs().max() + 1e-3
    # bf16 modules: the master copy keeps the fit in fp32, the module its rounding
    torch.testing.assert_close(calibrated["master"], calibrated["module"], rtol=1e-2, atol=1e-2)
    assert not calibrated["exp_avg"].any()
    # one optimizer step later proj_l moved by about the learning rate, not back to the pre-calibration value
    drift = (after["module"] - calibrated["module"]).abs().max()
    assert drift < 0.05 * calibrated["module"].abs().max(), float(drift)
    rows = [row for row in csv.DictReader(next(tmp_path.glob("logs/csv/version_*/metrics.csv")).open())
            if row.get("sla/calibration/error_after")]
    assert [int(row["step"]) for row in rows][:1] == [1]
    assert float(rows[0]["sla/calibration/error_after"]) < float(rows[0]["sla/calibration/error_before"])
