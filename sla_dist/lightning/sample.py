"""Sample videos during and at the end of training, written as animated GIF grids with Pillow (no video codec
needed on a fresh machine) and logged to TensorBoard. The ODE is ``sla_dist.sampling``'s;
``SequenceParallelPredictor`` lets it drive a model whose attention is sequence-parallel."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from .sequence import predict_full


class SequenceParallelPredictor(nn.Module):
    """``model(x, t, text)`` with the token sequence sharded over ``groups`` and the prediction gathered on every
    rank (the model is a child, so samplers find its parameters' device and dtype)."""

    def __init__(self, model: nn.Module, groups) -> None:
        super().__init__()
        self.model, self.groups = model, groups

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return predict_full(self.model, x, timestep, text, self.groups)


def video_grid(videos: torch.Tensor, min_side: int = 256) -> torch.Tensor:
    """RGB videos [N, 3, T, H, W] in [0, 1] side by side -> [3, T, H', N W'], each upscaled (nearest: the pixels stay
    sharp squares) by the smallest integer factor giving a side of at least ``min_side`` pixels, so a
    latent-resolution sample (16 x 16 on the CPU recipe) is viewable."""
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos of shape {tuple(videos.shape)} are not [N, 3, T, H, W]")
    scale = max(1, -(-min_side // min(videos.shape[-2:])))
    grid = torch.cat(list(videos), dim=-1)  # [3, T, H, N W]
    return grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)


def write_gif(videos: torch.Tensor, path: str | Path, min_side: int = 256, fps: int = 4) -> Path:
    """RGB videos [N, 3, T, H, W] in [0, 1] as one looping GIF of their :func:`video_grid`."""
    from PIL import Image

    grid = video_grid(videos, min_side)
    frames = [Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy()) for f in grid.unbind(1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


Sampler = Callable[[pl.Trainer, pl.LightningModule], "torch.Tensor | None"]


class PeriodicSamples(pl.Callback):
    """Every ``every`` optimizer steps before the last, videos from ``sampler`` (RGB [N, 3, T, H, W] in [0, 1], or None where no
    sample can be drawn) go to ``samples/step{N}.gif`` under ``output_dir`` and to every TensorBoard logger as a
    filmstrip image (frames top to bottom; TensorBoard's own video support would need moviepy). Every rank calls
    the sampler (sequence-parallel layers need their peers); rank 0 writes."""

    def __init__(self, every: int, sampler: Sampler, output_dir: str | Path) -> None:
        if every <= 0:
            raise ValueError(f"every={every} must be a positive number of steps")
        self.every, self.sampler, self.output_dir = every, sampler, Path(output_dir)
        self._last_step = -1

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps: with gradient accumulation it repeats over a step's micro-batches
        # the last step's sample is the final one, written once the fit ends
        if step == 0 or step % self.every or step == self._last_step or step == trainer.max_steps:
            return
        self._last_step = step
        videos = self.sampler(trainer, pl_module)
        if videos is None or not trainer.is_global_zero:
            return
        write_gif(videos, self.output_dir / "samples" / f"step{step}.gif")
        strip = video_grid(videos, min_side=128).flatten(1, 2)  # [3, T H', N W']
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", strip, global_step=step)
