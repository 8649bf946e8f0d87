"""SLACallback: converts a LightningModule's DiT to SLA before the strategy wraps it, schedules and logs sparsity.

Add it to any Trainer whose LightningModule holds a VideoDiT (or a diffusers Wan / CogVideoX transformer) as
``model`` (or pass ``attribute``). Schedule, in optimizer steps:

    [0, dense_steps)                          topk 1, negligible 0: exactly dense attention
    [dense_steps, dense_steps + anneal_steps) topk from 1 down to the target, linearly (negligible likewise up)
    later                                     the target topk / negligible of ``config``

Logged: ``sla/topk``, ``sla/sparsity/layer_i`` (realised fraction of key blocks not computed exactly) every
``log_every_n_steps``, and every ``error_every`` steps ``sla/error/layer_i``, the relative L1 error of each SLA
layer's output vs dense softmax attention on the q, k, v of the live batch. Both are measured on the steps whose
log row Lightning writes (steps n-1, 2n-1, ... for ``log_every_n_steps`` n), so a row holds its own step's values;
the error on the first of them at or after every ``error_every`` steps (Lightning repeats its last value in the
rows until the next measurement).

Compiled models (``model.compile``): the anneal steps and the measured steps run eagerly (``torch.compiler``'s
``force_eager`` stance). Compiled code reads topk as a constant, so a topk that changes every step would recompile
the blocks every step until Dynamo's recompile limit, after which they stay eager for the rest of the run; and it
does not run forward hooks registered after compilation, so the measurements would be lost.

Calibration (``calibrate=True``): the first step at the target settings (step ``dense_steps + anneal_steps``)
collects every SLA layer's least-squares statistics in its own forward (``ProjectionCalibration``: one extra dense
attention per layer, no extra model forward); at that step's end proj_l is set to the fit, summed over the world
group when torch.distributed is initialised, and ``sla/calibration/error_before`` / ``error_after`` (the sparse
branch alone, then with the fitted proj_l, relative L2 vs full attention, mean over layers) are logged. Optimizers
that keep a master copy (DeepSpeed ZeRO-1/2, its bf16 optimizer) get the fit in it too, or their next step would
write the old proj_l back; proj_l's momentum (``exp_avg``) is zeroed, its ``exp_avg_sq`` kept: Adam's step count is
shared with the other parameters (per flat group in DeepSpeed), so zeroed second moments would not restart its bias
correction and the next updates would be about (1 - beta1) / sqrt(1 - beta2) ~ 3x the learning rate. Not for a
partitioned proj_l (ZeRO-3) nor ring context parallel (its ranks never run a layer on a whole sequence): both raise
at the start of training. Ulysses and data parallel are fine: each rank's rows (its heads, its samples) are summed.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..attention import SparseLinearAttention, dense_attention, relative_l1
from ..calibration import ProjectionCalibration
from ..config import SLAConfig
from ..kernels.block_map import predict_block_map
from ..models import PatchConfig, apply_sla


class SLACallback(Callback):
    """Apply SLA in ``setup``; dense warm-up, then topk annealed to ``config.topk``; sparsity / error logging.

    Args:
        config: the target SLA settings of every converted layer.
        skip_first: leave the first n self-attention layers dense.
        dense_steps, anneal_steps: the schedule above.
        error_every: log the error vs dense every this many steps (0: never).
        attribute: name of the module attribute holding the DiT.
        calibrate: fit proj_l to full attention on step ``dense_steps + anneal_steps`` (module docstring).
    """

    def __init__(self, config: SLAConfig | None = None, skip_first: int = 0, dense_steps: int = 0,
                 anneal_steps: int = 0, error_every: int = 0, attribute: str = "model",
                 calibrate: bool = False) -> None:
        self.config = config or SLAConfig()
        for name, value in (("skip_first", skip_first), ("dense_steps", dense_steps),
                            ("anneal_steps", anneal_steps), ("error_every", error_every)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        self.skip_first, self.dense_steps, self.anneal_steps = skip_first, dense_steps, anneal_steps
        self.error_every, self.attribute = error_every, attribute
        self.converted: list[int] = []
        self.layers: list[SparseLinearAttention] = []
        self._values: dict[str, list[float]] = {}
        self._hooks: list = []
        self._annealing = False
        self._eager_stance = None
        self.calibrate, self.calibrated = calibrate, False
        self._model: torch.nn.Module | None = None
        self._calibration: ProjectionCalibration | None = None

    # ----------------------------------------------------------------------------------------------- schedule
    def settings_at(self, step: int) -> tuple[float, float]:
        """(topk, negligible) at optimizer step ``step``."""
        target = self.config
        if step < self.dense_steps:
            return 1.0, 0.0
        if self.anneal_steps and step < self.dense_steps + self.anneal_steps:
            frac = (step - self.dense_steps) / self.anneal_steps
            return 1.0 + frac * (target.topk - 1.0), frac * target.negligible
        return target.topk, target.negligible

    def _apply_schedule(self, step: int) -> None:
        topk, negligible = self.settings_at(step)
        for layer in self.layers:
            if (layer.config.topk, layer.config.negligible) != (topk, negligible):
                layer.config = dataclasses.replace(layer.config, topk=topk, negligible=negligible)
        self._annealing = self.dense_steps < step < self.dense_steps + self.anneal_steps
        self._run_eagerly(self._needs_eager)

    @property
    def calibration_step(self) -> int:
        """The first step at the target settings, whose forward calibrates proj_l."""
        return self.dense_steps + self.anneal_steps

    @property
    def runs_eagerly(self) -> bool:
        """Whether compiled code runs eagerly in the current step (annealing, measuring or calibrating): a benchmark
        of a compiled model times only the steps where this is False."""
        return self._eager_stance is not None

    @property
    def _needs_eager(self) -> bool:
        return self._annealing or bool(self._hooks) or self._calibration is not None

    def _run_eagerly(self, eager: bool) -> None:
        """Compiled code runs eagerly (the ``force_eager`` stance) while ``eager``; see the module docstring."""
        if eager and self._eager_stance is None:
            self._eager_stance = torch.compiler.set_stance("force_eager")
        elif not eager and self._eager_stance is not None:
            self._eager_stance.__exit__(None, None, None)
            self._eager_stance = None

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.layers:
            return
        model = getattr(pl_module, self.attribute, None)
        if model is None:
            raise ValueError(f"{type(pl_module).__name__} has no attribute {self.attribute!r} holding the DiT")
        self.converted = apply_sla(model, PatchConfig(sla=self.config, skip_first=self.skip_first))
        self.layers = [m for m in model.modules() if isinstance(m, SparseLinearAttention)]
        self._model = model
        self._apply_schedule(trainer.global_step)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.calibrate or self.calibrated:
            return
        # after the strategy wrapped the model: its partitioning and sequence-parallel layout are known now
        if any(hasattr(p, "ds_id") for layer in self.layers for p in layer.proj_l.parameters()):
            raise ValueError("calibrate=True needs proj_l whole on every rank, but DeepSpeed ZeRO-3 partitions it; "
                             "use zero_stage 0-2 or calibrate=False")
        groups = getattr(trainer.strategy, "sp_groups", None)
        if groups is not None and groups.ring_degree > 1:
            raise ValueError(f"calibrate=True does not support context parallel (ring degree {groups.ring_degree} "
                             f"of sp {groups.sp_size}): its ranks never run a layer on a whole sequence; use "
                             f"ulysses_degree=sp_size or calibrate=False")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.calibrate and not self.calibrated and step == self.calibration_step and self._calibration is None:
            # entered on the step's first micro-batch, applied after its optimizer step (on_train_batch_end)
            self._calibration = ProjectionCalibration(self._model).__enter__()
        self._apply_schedule(step)
        # Lightning writes a row after the steps s with (s + 1) % n == 0, holding what was logged last: measure on
        # those steps, not s % n == 0, or each row shows a step before its own (LearningRateMonitor asks the same)
        if not trainer._logger_connector.should_update_logs:
            return
        # the error when a multiple of error_every lies among the steps this row covers, (s + 1 - n, s + 1]
        end, n, every = step + 1, trainer.log_every_n_steps, self.error_every
        with_error = bool(every) and end // every > (end - n) // every
        self._hooks = [layer.register_forward_hook(self._measure(i, with_error)) for i, layer in enumerate(self.layers)]
        self._run_eagerly(True)

    def _measure(self, index: int, with_error: bool):
        """A forward hook measuring one layer on the live batch right away (nothing large is kept). A layer may run
        more than once in a step (sequence parallel taking its heads in chunks, activation checkpointing's
        recompute): the step logs the mean over its calls."""
        layer_id = self.converted[index]

        @torch.no_grad()
        def hook(module: SparseLinearAttention, args, output):
            q, k, v = args[:3]
            c = module.config
            block_map = predict_block_map(q, k, topk=c.topk, negligible=c.negligible, block_q=c.block_q,
                                          block_k=c.block_k)
            self._values.setdefault(f"sla/sparsity/layer_{layer_id}", []).append(
                1.0 - float(block_map.critical_fraction()))
            if with_error:
                self._values.setdefault(f"sla/error/layer_{layer_id}", []).append(
                    float(relative_l1(output, dense_attention(q, k, v))))
        return hook

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        metrics = {"sla/topk": self.settings_at(trainer.global_step - 1)[0],
                   **{name: sum(values) / len(values) for name, values in self._values.items()}}
        if self._calibration is not None and trainer.global_step > self.calibration_step:
            metrics.update(self._apply_calibration(trainer, pl_module))
        self._run_eagerly(self._needs_eager)
        self._values = {}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def _apply_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        calibration, self._calibration = self._calibration, None
        calibration.__exit__(None, None, None)
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        report = calibration.apply(group=group, set_weight=lambda p, v: _set_trained_parameter(trainer, p, v))
        self.calibrated = True
        # DiTModule's EMA (keyed like the DiT's parameters) starts from the fit too, not from the old proj_l
        shadow = getattr(getattr(pl_module, "ema", None), "shadow", {})
        for name in report:
            for key in (f"{name}.proj_l.weight", f"{name}.proj_l.bias"):
                if key in shadow:
                    shadow[key].copy_(self._model.get_parameter(key).detach())
        return {"sla/calibration/error_before": statistics.fmean(r["sparse_error"] for r in report.values()),
                "sla/calibration/error_after": statistics.fmean(r["calibrated_error"] for r in report.values())}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._calibration is not None:  # fit ended inside the calibration step
            self._calibration.__exit__(None, None, None)
            self._calibration = None
        self._run_eagerly(False)

    @override
    def state_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "skip_first": self.skip_first,
                "dense_steps": self.dense_steps, "anneal_steps": self.anneal_steps, "converted": self.converted,
                "calibrated": self.calibrated}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        # The recipe may change the schedule on resume; the converted layers must not change.
        if self.converted and state_dict["converted"] != self.converted:
            raise ValueError(f"the checkpoint converted layers {state_dict['converted']}, this run {self.converted}")
        self.converted = list(state_dict["converted"])
        self.calibrated = bool(state_dict.get("calibrated", False))  # absent in checkpoints from before it existed


def _set_trained_parameter(trainer: pl.Trainer, param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set ``param`` (a proj_l weight or bias) to ``value`` mid-training: the module's copy, the optimizer's master
    copy where it keeps one, and zero its momentum (module docstring)."""
    param.copy_(value.to(param))
    if hasattr(param, "_hp_mapping"):  # DeepSpeed ZeRO-1/2 or BF16_Optimizer: an fp32 partition holds the master
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(param, value.float())
        # the ranks whose partition holds none of param have no mapping; state exists after the first step only
        if param._hp_mapping is not None and "exp_avg" in param._hp_mapping.get_optim_state_keys():
            safe_set_full_optimizer_state(param, torch.zeros_like(param, dtype=torch.float32), "exp_avg")
        return
    for optimizer in getattr(trainer, "optimizers", []):
        state = getattr(optimizer, "state", None)  # torch optimizers: per-parameter state dicts
        momentum = state.get(param, {}).get("exp_avg") if isinstance(state, Mapping) else None
        if momentum is not None:
            momentum.zero_()
