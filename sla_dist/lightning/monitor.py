"""What a training run reports while it runs: per-step metrics (TrainingMonitor) and a progress bar over optimizer
steps (StepProgressBar).

TrainingMonitor logs, every optimizer step (written every ``log_every_n_steps`` like any logged metric):

    train/lr              learning rate of the first parameter group used by the step
    train/grad_norm       global L2 norm of the gradients before clipping (DeepSpeed's own under SLAStrategy)
    train/step_time       seconds per optimizer step (wall clock, data loading included)
    train/tokens_per_sec  DiT tokens (all data-parallel replicas) per second
    train/mfu             model FLOPs utilisation on GPUs Lightning knows the peak of (not on CPU)

Tokens and FLOPs come from the batch's latent shape and the DiT config; the module's ``config`` attribute (a
:class:`~sla_dist.models.DiTConfig`, as DiTModule's) is used when no config is passed. Without either, the
token metrics are left out.
"""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from typing_extensions import override

from ..models import DiTConfig
from ..models.config import train_flops_per_token


def _replicas(trainer: pl.Trainer) -> int:
    """Data-parallel replicas (ranks of one sequence-parallel group read the same samples)."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", 1))


def _compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32


def peak_flops(trainer: pl.Trainer) -> float | None:
    """Theoretical peak FLOP/s of one device at the run's precision, or None (CPU, unknown GPU)."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, _compute_dtype(str(trainer.precision)))


class TrainingMonitor(Callback):
    """Logs learning rate, gradient norm, step time, tokens/s and MFU; keeps the loss curve of this process.

    Args:
        dit: the DiT config for token counts and FLOPs (default: the LightningModule's ``config``).
        loss_key: the logged metric recorded in ``history`` every optimizer step.
    """

    def __init__(self, dit: DiTConfig | None = None, loss_key: str = "train/loss") -> None:
        self.dit, self.loss_key = dit, loss_key
        self.history: list[tuple[int, float]] = []
        """(step, loss) of every optimizer step this process ran."""
        self.latest: dict[str, float] = {}
        """The last value of each metric this callback logged (for the progress bar and the summary)."""
        self.started: float | None = None
        self.tokens_seen = 0
        self._peak: float | None = None
        self._grad_norm: float | None = None
        self._last_step_end: float | None = None
        self._last_step = -1
        self._lr = 0.0
        self._tokens = self._flops = 0.0

    def _config(self, pl_module: pl.LightningModule) -> DiTConfig | None:
        config = self.dit or getattr(pl_module, "config", None)
        return config if isinstance(config, DiTConfig) else None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self._last_step_end = time.perf_counter()
        self._peak = peak_flops(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])  # what this step's update uses
        config = self._config(pl_module)
        latents = batch.get("latents") if isinstance(batch, dict) else None
        if config is None or latents is None:
            return
        _, _, t, h, w = latents.shape
        seq_len = t * h * w // config.patch_volume
        text_len = batch["text"].shape[1] if "text" in batch else 0
        tokens = latents.shape[0] * seq_len * _replicas(trainer)
        self._tokens += tokens
        self._flops += tokens * train_flops_per_token(config, seq_len, text_len)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:  # DeepSpeed keeps its gradients in its own buffers: read its norm after the step instead
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                                           for g in grads])))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # a micro-batch of gradient accumulation: the step is not done yet
        self._last_step = step
        now = time.perf_counter()
        elapsed, self._last_step_end = now - self._last_step_end, now
        metrics = {"train/lr": self._lr, "train/step_time": elapsed}
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        grad_norm = engine.get_global_grad_norm() if engine is not None else None
        grad_norm = self._grad_norm if grad_norm is None else grad_norm
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["train/grad_norm"] = float(grad_norm)
        if self._tokens:
            metrics["train/tokens_per_sec"] = self._tokens / elapsed
            if self._peak:
                metrics["train/mfu"] = self._flops / elapsed / (self._peak * trainer.world_size)
        self.tokens_seen += int(self._tokens)
        self._tokens = self._flops = 0.0
        self._grad_norm = None
        loss = trainer.callback_metrics.get(self.loss_key)
        if loss is not None:
            self.history.append((step, float(loss)))
        self.latest = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)


class StepProgressBar(TQDMProgressBar):
    """One bar over optimizer steps, ``step 320/1000``, continuing where a resumed run left off, with the loss, the
    validation loss, the learning rate and tokens/s (tqdm shows it/s).

    Args:
        monitor: the TrainingMonitor whose lr and tokens/s are shown (optional).
    """

    def __init__(self, monitor: TrainingMonitor | None = None, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.monitor = monitor

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step  # (restored by now) tqdm's it/s then counts this run's steps
        bar.set_description("step")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_) -> None:
        """One bar across epochs (Lightning's restarts at every epoch): the step count goes on."""

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        shown: dict = {}
        metrics = trainer.progress_bar_metrics
        for key, label in (("train/loss", "loss"), ("val/flow", "val")):
            if key in metrics:
                shown[label] = f"{float(metrics[key]):.4f}"
        latest = self.monitor.latest if self.monitor is not None else {}
        if "train/lr" in latest:
            shown["lr"] = f"{latest['train/lr']:.2e}"
        if "train/tokens_per_sec" in latest:
            shown["tok/s"] = f"{latest['train/tokens_per_sec']:.4g}"
        return shown
