"""Build and run a training job from a Recipe: module, datamodule, SLACallback, strategy, loggers, checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..sampling import SamplerConfig, sample
from .callback import SLACallback
from .checkpoint import load_weights
from .data import build_datamodule
from .logs import build_loggers
from .module import DiTModule
from .monitor import StepProgressBar, TrainingMonitor
from .recipe import Recipe
from .resume import start, write_recipe
from .rotation import StepCheckpoints, checkpoint_dir
from .sample import PeriodicSamples, SequenceParallelPredictor, write_gif
from .shared_resume import RankZeroCheckpoint, ShareResumeCheckpoint, recipe_digest
from .strategy import SLAStrategy, zero_config
from .summary import RunSummary, plot_loss, read_curves
from .synthetic import SyntheticVideoDataset


def build_strategy(recipe: Recipe):
    p = recipe.parallel
    if p.strategy == "auto":
        return "auto"
    config = zero_config(p.zero_stage, p.offload_optimizer, p.offload_parameters, recipe.optim.grad_clip,
                         recipe.data.batch_size, overlap_comm=p.overlap_comm,
                         reduce_bucket_size=p.reduce_bucket_size)
    return SLAStrategy(sequence_parallel_size=p.sp_size, ulysses_degree=p.ulysses_degree, config=config,
                       timeout=timedelta(seconds=p.timeout_s), overlap_chunks=p.overlap_chunks)


def build_trainer(recipe: Recipe, extra_callbacks: list | None = None) -> pl.Trainer:
    """The Trainer of a recipe, without loggers (``build_loggers`` needs the step resumed from, which ``train``
    decides once the Trainer knows which rank this process is). Building it writes nothing."""
    t = recipe.trainer
    # each checkpoint's recipe is recorded as it is committed (resume.py compares the next run's with it)
    checkpoints = StepCheckpoints(checkpoint_dir(recipe.output_dir), t.checkpoint_every,
                                  on_commit=lambda _: write_recipe(recipe))
    s = recipe.sparsity
    monitor = TrainingMonitor(recipe.dit)
    callbacks = [checkpoints, monitor, *(extra_callbacks or [])]
    if t.progress_bar:
        callbacks.append(StepProgressBar(monitor))
    if recipe.sample.every and recipe.data.kind == "synthetic":
        callbacks.append(PeriodicSamples(recipe.sample.every, functools.partial(draw_samples, recipe),
                                         recipe.output_dir))
    if s.enabled:
        callbacks.insert(0, SLACallback(recipe.sla, skip_first=s.skip_first, dense_steps=s.dense_steps,
                                        anneal_steps=s.anneal_steps, error_every=s.error_every,
                                        calibrate=s.calibrate))
    # validation every val_every optimizer steps, counted in batches across epochs (the synthetic stream is endless)
    validation = (dict(val_check_interval=t.val_every * t.accumulate_grad_batches, check_val_every_n_epoch=None)
                  if t.val_every else dict(limit_val_batches=0))
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(recipe),
        precision=t.precision, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=recipe.optim.grad_clip or None, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, logger=False,
        callbacks=callbacks, default_root_dir=recipe.output_dir, use_distributed_sampler=False,
        enable_model_summary=False, num_sanity_val_steps=0, enable_autolog_hparams=False,
        enable_checkpointing=False, **validation,
    )


def checkpoint_step(path: Path) -> int | None:
    """The global step in a checkpoint's name (``step{N}.ckpt``, as build_trainer names them), or None."""
    match = re.fullmatch(r"step(\d+)(\.ckpt)?", path.name)
    return int(match.group(1)) if match else None


def build_module(recipe: Recipe) -> DiTModule:
    init = load_weights(recipe.model.init_from) if recipe.model.init_from else None
    return DiTModule(recipe.dit, recipe.optim, seed=recipe.seed, init_state=init,
                     compile_mode=recipe.model.compile_mode if recipe.model.compile else None)


def train(recipe: Recipe, resume: bool = True, extra_callbacks: list | None = None) -> pl.Trainer:
    """Train (resuming from ``output_dir``'s newest checkpoint when there is one and ``resume``, see ``resume.py``),
    then sample."""
    trainer = build_trainer(recipe, extra_callbacks)
    ckpt_path = resume_decision(trainer, recipe, resume)
    pl.seed_everything(recipe.seed, workers=True)
    module = build_module(recipe)
    datamodule = build_datamodule(recipe.data, recipe.dit, recipe.seed)
    resume_step = (checkpoint_step(ckpt_path) or 0) if isinstance(ckpt_path, Path) else None
    trainer.loggers = build_loggers(recipe.output_dir, resume_step)  # only rank 0's write
    if trainer.is_global_zero and ckpt_path is None:
        write_recipe(recipe)
    for logger in trainer.loggers:  # TensorBoard's HPARAMS tab and the CSV's hparams.yaml: the resolved recipe
        logger.log_hyperparams(dataclasses.asdict(recipe))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if isinstance(ckpt_path, Path) else ckpt_path,
                weights_only=True)
    wall_time = time.perf_counter() - started
    sample_path = None
    if recipe.sample.enabled and recipe.data.kind == "synthetic":
        sample_path = write_sample(recipe, module, trainer)
    if trainer.is_global_zero:
        print(summarize(recipe, trainer, resume_step or 0, wall_time, sample_path).render(), flush=True)
    return trainer


def resume_decision(trainer: pl.Trainer, recipe: Recipe, resume: bool) -> Path | RankZeroCheckpoint | None:
    """The ``ckpt_path`` of this rank's ``fit``. Global rank 0 alone looks for the checkpoint and compares the recipe
    (``resume.start``: refusals come before anything is written or spawned); with several ranks, the others get a
    ``RankZeroCheckpoint`` that ``ShareResumeCheckpoint`` fills in with rank 0's choice, and every rank checks that
    it runs rank 0's recipe (see shared_resume.py)."""
    if trainer.world_size == 1:
        return start(recipe, resume)
    if trainer.is_global_zero:
        ckpt_path = start(recipe, resume)
        trainer.callbacks.append(ShareResumeCheckpoint(ckpt_path, recipe_digest(recipe)))
        return ckpt_path
    follower = RankZeroCheckpoint()
    trainer.callbacks.append(ShareResumeCheckpoint(follower, recipe_digest(recipe)))
    return follower


def summarize(recipe: Recipe, trainer: pl.Trainer, start_step: int, wall_time: float,
              sample_path: Path | None) -> RunSummary:
    """The run's summary; also writes the loss curve of the whole run (from its CSV log) to ``loss.png``."""
    out = Path(recipe.output_dir)
    curves = read_curves(Path(trainer.loggers[0].log_dir) / "metrics.csv")
    monitor = next(c for c in trainer.callbacks if isinstance(c, TrainingMonitor))
    if not curves["train/loss"]:  # fewer steps than log_every_n_steps: this session's own record
        curves["train/loss"] = monitor.history
    plot = plot_loss(curves, out / "loss.png")
    last = checkpoint_dir(out) / "last.ckpt"
    return RunSummary(output_dir=str(out), step=trainer.global_step, max_steps=recipe.trainer.max_steps,
                      start_step=start_step, wall_time=wall_time, tokens_seen=monitor.tokens_seen, curves=curves,
                      checkpoint=str(last) if last.exists() else None,
                      sample=None if sample_path is None else str(sample_path),
                      loss_plot=None if plot is None else str(plot))


def draw_samples(recipe: Recipe, trainer: pl.Trainer, module: DiTModule) -> torch.Tensor | None:
    """RGB videos [N, 3, T, H, W] in [0, 1] for the first validation captions (after the training set), from the
    EMA weights when there are any; None under ZeRO-3 (partitioned weights). Every rank runs the ODE
    (sequence-parallel layers need their peers) and gets the videos."""
    d, m = recipe.data, recipe.dit
    if _zero3(trainer):
        return None
    data = _sample_set(recipe)
    text = torch.stack([data[i]["text"] for i in _sample_picks(recipe)]).to(module.device)
    model = _with_ema(module) if module.ema is not None else module.model
    was_training = model.training
    model.eval()
    config = SamplerConfig(steps=recipe.sample.steps, shift=recipe.optim.flow_shift, seed=recipe.seed)
    latents = sample(SequenceParallelPredictor(model, module.sp_groups), text,
                     (m.in_channels, d.frames, d.height, d.width), config)
    model.train(was_training)
    return data.codec.decode(latents.cpu())


def write_sample(recipe: Recipe, module: DiTModule, trainer: pl.Trainer) -> Path | None:
    """``samples/final.gif`` (and its captions in ``final.txt``) from :func:`draw_samples`; rank 0 writes."""
    videos = draw_samples(recipe, trainer, module)
    if videos is None:
        rank_zero_info("ZeRO-3 partitions the weights: no sample written; export the checkpoint and sample it")
        return None
    if not trainer.is_global_zero:
        return None
    path = write_gif(videos, Path(recipe.output_dir) / "samples" / "final.gif")
    data = _sample_set(recipe)
    (path.parent / "final.txt").write_text("\n".join(data.caption(i) for i in _sample_picks(recipe)) + "\n")
    rank_zero_info(f"sample video: {path}")
    return path


def _sample_set(recipe: Recipe) -> SyntheticVideoDataset:
    d, m = recipe.data, recipe.dit
    return SyntheticVideoDataset(d.num_samples + recipe.sample.num_videos, m.in_channels, d.frames, d.height,
                                 d.width, m.text_dim, d.text_len, seed=recipe.seed)


def _sample_picks(recipe: Recipe) -> range:
    return range(recipe.data.num_samples, recipe.data.num_samples + recipe.sample.num_videos)


def _zero3(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, SLAStrategy) and trainer.strategy.zero_stage_3


def _with_ema(module: DiTModule):
    import copy

    model = copy.deepcopy(module.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in module.ema.shadow.items():
            params[name].copy_(value)
    module.compile_blocks(model)
    return model
