"""DiTModule: flow-matching training of a VideoDiT, with an optional frozen dense teacher and an EMA of the weights.

Objective (rectified flow, as Wan): for data latents x0 and noise e, sigma = shift(u) with u ~ logit-normal,
x_sigma = (1 - sigma) x0 + sigma e, and the model predicts the velocity e - x0 from (x_sigma, 1000 sigma, text).
With ``teacher_weight > 0`` the loss adds that weight times the MSE between the student and a frozen dense copy of
the initial model on the same input (the distillation TurboDiffusion uses to fine-tune SLA).

With ``caption_dropout > 0`` each sample's text embedding is replaced, with that probability, by the null
embedding (all zeros: what the sampler's classifier-free guidance feeds as the unconditional input, and what an empty,
zero-padded caption encodes to), so the model also learns the unconditional velocity.

The per-step noise, timesteps and caption drops are drawn from a generator seeded by (seed, global step,
data-parallel rank), so all ranks of a sequence-parallel group draw the same ones and a resumed run draws exactly
what the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import zlib
from typing import Callable

import lightning.pytorch as pl
import torch
from typing_extensions import override

from ..models import DiTConfig, VideoDiT, apply_compile
from ..sampling import flow_sigmas
from .recipe import OptimSection
from .sequence import predict_local


def drop_captions(text: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """``text`` [B, Lt, D] with each sample's embedding replaced by the null one (zeros) with probability ``p``.
    Nothing is drawn for ``p == 0``, so runs without dropout keep their random stream."""
    if p == 0:
        return text
    keep = torch.rand(text.shape[0], generator=generator) >= p
    return text * keep.to(text)[:, None, None]


class EMA:
    """Exponential moving average of a model's trainable weights, kept in float32 outside the module tree (so the
    strategy neither wraps nor partitions it); under ZeRO-3 each parameter is gathered for the update."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in _gathered(model)}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in _gathered(model):
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)[:5]}")
        self.decay = state["decay"]
        self.shadow = {k: v.float().to(self.shadow[k].device) for k, v in state["shadow"].items()}


def _gathered(model: torch.nn.Module):
    """(name, full parameter) of every trainable parameter, gathering ZeRO-3 partitions one at a time."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                yield name, p
        else:
            yield name, p


class DiTModule(pl.LightningModule):
    """Trains ``VideoDiT(config)`` on batches {'latents' [B, C, T, H, W], 'text' [B, Lt, text_dim]}.

    Args:
        config: the DiT shape.
        optim: objective and optimizer settings (lr, warm-up, EMA decay, teacher weight, flow shift).
        seed: seeds the model initialisation and the per-step noise.
        init_state: weights to start from (e.g. an exported dense checkpoint); None keeps the random init.
        compile_mode: torch.compile each block of the model (and of the teacher) with this mode in
            ``configure_model`` (``apply_compile``); None: eager.
        compile_backend: the torch.compile backend ('inductor'; tests take 'aot_eager', which skips code generation).
    """

    def __init__(self, config: DiTConfig, optim: OptimSection | None = None, seed: int = 0,
                 init_state: dict | None = None, compile_mode: str | None = None,
                 compile_backend: str | Callable = "inductor") -> None:
        super().__init__()
        self.config, self.optim, self.seed = config, optim or OptimSection(), seed
        self.compile_mode, self.compile_backend = compile_mode, compile_backend
        torch.manual_seed(seed)
        self.model = VideoDiT(config)
        if init_state is not None:
            self.model.load_state_dict(init_state)
        self.teacher: VideoDiT | None = None
        if self.optim.teacher_weight > 0:
            self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.ema: EMA | None = None

    @property
    def sp_groups(self):
        """The strategy's sequence-parallel groups (None when the strategy has none)."""
        return getattr(self.trainer.strategy, "sp_groups", None) if self._trainer is not None else None

    @property
    def dp_rank(self) -> int:
        groups = self.sp_groups
        return groups.dp_rank if groups is not None else (self.global_rank if self._trainer is not None else 0)

    def step_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(f"{self.seed},{step},{self.dp_rank}".encode()))

    def noised(self, latents: torch.Tensor, generator: torch.Generator):
        """(x_sigma, timestep [B], velocity target) for clean ``latents``."""
        B = latents.shape[0]
        u = torch.sigmoid(torch.randn(B, generator=generator))
        sigma = flow_sigmas(u, self.optim.flow_shift).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        s = sigma.view(B, 1, 1, 1, 1).to(latents.dtype)
        return (1 - s) * latents + s * noise, sigma * 1000, noise - latents

    def losses(self, batch: dict, generator: torch.Generator, caption_dropout: bool = True) -> dict[str, torch.Tensor]:
        """This rank's share of each loss term (shares sum to the full loss over the SP group)."""
        latents = batch["latents"]
        x, timestep, target = self.noised(latents, generator)
        text = drop_captions(batch["text"], self.optim.caption_dropout if caption_dropout else 0.0, generator)
        pred = predict_local(self.model, x, timestep, text, self.sp_groups)
        denom = target.numel()
        out = {"flow": pred.sq_error(pred.localize(self.model, target)) / denom}
        loss = out["flow"]
        if self.teacher is not None:
            with torch.no_grad():
                teacher = predict_local(self.teacher, x, timestep, text, self.sp_groups).tokens
            out["teacher"] = pred.sq_error(teacher) / denom
            loss = loss + self.optim.teacher_weight * out["teacher"]
        out["loss"] = loss
        return out

    def full_value(self, share: torch.Tensor) -> torch.Tensor:
        """The full loss value from this rank's share (sum over the SP group), for logging."""
        groups = self.sp_groups
        if groups is None or groups.sp_size == 1:
            return share.detach()
        value = share.detach().clone()
        torch.distributed.all_reduce(value, group=groups.sp_group)
        return value

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch, self.step_generator(self.global_step))
        for name, value in terms.items():
            # logged on every rank (identical within an SP group), averaged over DP at epoch end only
            self.log(f"train/{name}", self.full_value(value), prog_bar=name == "loss", batch_size=len(batch["index"]))
        return terms["loss"]

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Noise and levels seeded by the batch alone: every validation pass scores the same (sample, noise, sigma)
        # triples, so the curve moves only with the weights. Captions are never dropped here.
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed},val,{batch_idx},{self.dp_rank}".encode()))
        flow = self.full_value(self.losses(batch, generator, caption_dropout=False)["flow"])
        self.log("val/flow", flow, prog_bar=True, sync_dist=True, batch_size=len(batch["index"]))

    @override
    def configure_model(self) -> None:
        # Lightning calls this after the callbacks' setup, where SLACallback has converted the attention, and before
        # the strategy's setup, which makes the attention sequence-parallel and then wraps the module in DeepSpeed:
        # torchtitan's order (model conversions, activation checkpointing, compile, data-parallel wrapper).
        # Checkpointing sits inside each block's forward, so the compiled block traces it; compilation itself waits
        # for a block's first call, by which time the sequence-parallel attention is in place too.
        for model in (self.model, self.teacher):
            if model is not None:
                self.compile_blocks(model)

    def compile_blocks(self, model: VideoDiT) -> None:
        """``apply_compile`` with this module's settings (nothing when it trains eagerly): also for copies of the
        model, such as the EMA one samples are drawn from, since a deep copy of a compiled block is not compiled."""
        if self.compile_mode is not None:
            apply_compile(model, self.compile_mode, self.compile_backend)

    @override
    def on_fit_start(self) -> None:
        if self.optim.ema_decay > 0 and self.ema is None:
            self.ema = EMA(self.model, self.optim.ema_decay)

    @override
    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here rather than in on_train_batch_end, which runs after the callbacks' (a checkpoint saved at this step
        # must hold this step's EMA)
        if self.ema is not None:
            self.ema.update(self.model)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            if self.ema is None:
                self.ema = EMA(self.model, checkpoint["ema"]["decay"])
            self.ema.load_state_dict(checkpoint["ema"])

    @override
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, betas=tuple(self.optim.betas),
                                weight_decay=self.optim.weight_decay)
        warmup = self.optim.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
