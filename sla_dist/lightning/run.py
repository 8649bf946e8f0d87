"""Build and run a training job from a Recipe: module, datamodule, SLACallback, strategy, loggers, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.imports import RequirementCache

from ..eval.sampling import SamplerConfig, sample
from .callback import SLACallback
from .checkpoint import checkpoint_dir, last_checkpoint, load_weights
from .data import build_datamodule
from .module import DiTModule
from .recipe import Recipe, recipe_to_yaml
from .sample import SequenceParallelPredictor, write_gif
from .strategy import SLAStrategy, zero_config
from .synthetic import SyntheticVideoDataset

_TENSORBOARD = RequirementCache("tensorboard") or RequirementCache("tensorboardX")


def build_strategy(recipe: Recipe):
    p = recipe.parallel
    if p.strategy == "auto":
        return "auto"
    config = zero_config(p.zero_stage, p.offload_optimizer, p.offload_parameters, recipe.optim.grad_clip,
                         recipe.data.batch_size)
    return SLAStrategy(sequence_parallel_size=p.sp_size, ulysses_degree=p.ulysses_degree, config=config)


def build_loggers(recipe: Recipe) -> list[Logger]:
    logs = Path(recipe.output_dir) / "logs"
    loggers: list[Logger] = [CSVLogger(logs, name="csv")]
    if _TENSORBOARD:
        loggers.append(TensorBoardLogger(logs, name="tensorboard"))
    else:
        rank_zero_info("TensorBoard is not installed (pip install tensorboard); logging to CSV only")
    return loggers


def build_trainer(recipe: Recipe, extra_callbacks: list | None = None) -> pl.Trainer:
    t = recipe.trainer
    checkpoints = ModelCheckpoint(dirpath=checkpoint_dir(recipe.output_dir), filename="step{step}",
                                  auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every,
                                  save_top_k=1, save_last="link", enable_version_counter=False)
    s = recipe.sparsity
    callbacks = [checkpoints, *(extra_callbacks or [])]
    if s.enabled:
        callbacks.insert(0, SLACallback(recipe.sla, skip_first=s.skip_first, dense_steps=s.dense_steps,
                                        anneal_steps=s.anneal_steps, error_every=s.error_every))
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(recipe),
        precision=t.precision, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=recipe.optim.grad_clip or None, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, logger=build_loggers(recipe), callbacks=callbacks,
        default_root_dir=recipe.output_dir, use_distributed_sampler=False, limit_val_batches=0,
        enable_model_summary=False, num_sanity_val_steps=0,
    )


def build_module(recipe: Recipe) -> DiTModule:
    init = load_weights(recipe.model.init_from) if recipe.model.init_from else None
    return DiTModule(recipe.dit, recipe.optim, seed=recipe.seed, init_state=init)


def train(recipe: Recipe, resume: bool = True, extra_callbacks: list | None = None) -> pl.Trainer:
    """Train (resuming from ``output_dir``'s last checkpoint when there is one and ``resume``), then sample."""
    pl.seed_everything(recipe.seed, workers=True)
    out = Path(recipe.output_dir)
    module = build_module(recipe)
    datamodule = build_datamodule(recipe.data, recipe.dit, recipe.seed)
    trainer = build_trainer(recipe, extra_callbacks)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    ckpt = last_checkpoint(out) if resume else None
    if ckpt is not None:
        rank_zero_info(f"resuming from {ckpt}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    if recipe.sample.enabled and recipe.data.kind == "synthetic":
        write_sample(recipe, module, trainer)
    return trainer


def write_sample(recipe: Recipe, module: DiTModule, trainer: pl.Trainer) -> Path | None:
    """``samples/final.gif``: videos for the first validation captions (after the training set), from the EMA
    weights when there are any. Every rank runs the ODE (sequence-parallel layers need their peers); rank 0 writes."""
    d, m = recipe.data, recipe.dit
    data = SyntheticVideoDataset(d.num_samples + recipe.sample.num_videos, m.in_channels, d.frames, d.height,
                                 d.width, m.text_dim, d.text_len, seed=recipe.seed)
    picks = range(d.num_samples, d.num_samples + recipe.sample.num_videos)
    text = torch.stack([data[i]["text"] for i in picks]).to(module.device)
    if _zero3(trainer):
        rank_zero_info("ZeRO-3 partitions the weights: no sample written; export the checkpoint and sample it")
        return None
    model = _with_ema(module) if module.ema is not None else module.model
    was_training = model.training
    model.eval()
    config = SamplerConfig(steps=recipe.sample.steps, shift=recipe.optim.flow_shift, seed=recipe.seed)
    latents = sample(SequenceParallelPredictor(model, module.sp_groups), text,
                     (m.in_channels, d.frames, d.height, d.width), config)
    model.train(was_training)
    if not trainer.is_global_zero:
        return None
    path = write_gif(data.codec.decode(latents.cpu()), Path(recipe.output_dir) / "samples" / "final.gif")
    captions = "\n".join(data.caption(i) for i in picks)
    (path.parent / "final.txt").write_text(captions + "\n")
    rank_zero_info(f"sample video: {path}")
    return path


def _zero3(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, SLAStrategy) and trainer.strategy.zero_stage_3


def _with_ema(module: DiTModule):
    import copy

    model = copy.deepcopy(module.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in module.ema.shadow.items():
            params[name].copy_(value)
    return model
