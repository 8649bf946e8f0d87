"""What a training run reports: FLOPs per token, the logged metrics, the step progress bar, one log version per
run across resumes, the hyperparameters, the loss curve and the end-of-run summary."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sla_dist.lightning import run
from sla_dist.lightning.logs import log_version
from sla_dist.lightning.monitor import StepProgressBar
from sla_dist.lightning.recipe import load_recipe
from sla_dist.models import VideoDiT, dit_config
from sla_dist.models.config import train_flops_per_token

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_flops_per_token_matches_the_flop_counter(name):
    config = dit_config(name, num_layers=2)
    model = VideoDiT(config)
    x, t, text = torch.randn(1, config.in_channels, 4, 16, 16), torch.full((1,), 500.0), torch.randn(1, 16,
                                                                                                      config.text_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # MATH: attention as counted bmm
        model(x, t, text)
    seq_len = 4 * 16 * 16 // config.patch_volume
    forward = seq_len * train_flops_per_token(config, seq_len, text_len=16) / 3
    # the formula leaves out embeddings, the head and the text's key / value projections: a few percent
    assert 1.0 <= counter.get_total_flops() / forward <= 1.05


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "logs" / "csv" / "version_0" / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


def _train(run_dir: Path, max_steps: int):
    recipe = load_recipe(RECIPE, [f"output_dir={run_dir}", "parallel.strategy=auto", f"trainer.max_steps={max_steps}",
                                  "trainer.checkpoint_every=1", "trainer.log_every_n_steps=1", "trainer.val_every=2",
                                  "data.val_samples=3", "data.batch_size=2", "sample.enabled=false",
                                  "sparsity.error_every=0"])
    return run.train(recipe)


def test_metrics_progress_bar_logs_and_summary_across_a_resume(tmp_path, capsys):
    trainer = _train(tmp_path, 3)
    rows = _rows(tmp_path)
    steps = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in steps] == [0, 1, 2]
    for row in steps:
        assert float(row["train/grad_norm"]) > 0 and float(row["train/step_time"]) > 0
        # 2 samples of 4 x 8 x 8 = 256 tokens per step
        assert float(row["train/tokens_per_sec"]) * float(row["train/step_time"]) == pytest.approx(512, rel=1e-4)
        assert "train/mfu" not in row  # CPU: no known peak
    warmup = load_recipe(RECIPE).optim
    assert float(steps[0]["train/lr"]) == pytest.approx(warmup.lr / (warmup.warmup_steps + 1))
    val = [r for r in rows if r["val/flow"]]
    assert len(val) == 1 and float(val[0]["val/flow"]) > 0
    hparams = yaml.safe_load((tmp_path / "logs" / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams["sla"]["topk"] == 0.25 and hparams["trainer"]["val_every"] == 2
    summary = capsys.readouterr().out
    assert "final loss" in summary and f"sla-dist export {tmp_path}/checkpoints/last.ckpt" in summary
    assert "this session: 0 -> 3" in summary and (tmp_path / "loss.png").stat().st_size > 0

    # resumed: the bar goes on from step 3 of 5, the logs continue version 0 without repeated steps
    trainer = _train(tmp_path, 5)
    bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
    assert (bar.desc.strip(": "), bar.initial, bar.n, bar.total) == ("step", 3, 5, 5)
    assert [int(r["step"]) for r in _rows(tmp_path) if r["train/loss"]] == [0, 1, 2, 3, 4]
    assert "this session: 3 -> 5" in capsys.readouterr().out
    # a rerun of the finished run adds no log version
    _train(tmp_path, 5)
    assert sorted(p.name for p in (tmp_path / "logs" / "csv").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (tmp_path / "logs" / "tensorboard").iterdir()) == ["version_0"]


def test_log_version_continues_on_resume_and_advances_when_fresh(tmp_path):
    assert log_version(tmp_path, resume=True) == 0 and log_version(tmp_path, resume=False) == 0
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "tensorboard" / "version_1").mkdir(parents=True)
    assert log_version(tmp_path, resume=True) == 1 and log_version(tmp_path, resume=False) == 2
