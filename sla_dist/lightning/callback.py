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
"""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..attention import SparseLinearAttention, dense_attention, relative_l1
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
    """

    def __init__(self, config: SLAConfig | None = None, skip_first: int = 0, dense_steps: int = 0,
                 anneal_steps: int = 0, error_every: int = 0, attribute: str = "model") -> None:
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
        self._run_eagerly(self._annealing or bool(self._hooks))

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
        self._apply_schedule(trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
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
        self._run_eagerly(self._annealing)
        metrics = {"sla/topk": self.settings_at(trainer.global_step - 1)[0],
                   **{name: sum(values) / len(values) for name, values in self._values.items()}}
        self._values = {}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run_eagerly(False)

    @override
    def state_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "skip_first": self.skip_first,
                "dense_steps": self.dense_steps, "anneal_steps": self.anneal_steps, "converted": self.converted}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        # The recipe may change the schedule on resume; the converted layers must not change.
        if self.converted and state_dict["converted"] != self.converted:
            raise ValueError(f"the checkpoint converted layers {state_dict['converted']}, this run {self.converted}")
        self.converted = list(state_dict["converted"])
