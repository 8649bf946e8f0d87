"""Sample videos at the end of training, written as an animated GIF grid with Pillow (no video codec needed on a
fresh machine). The ODE is ``sla_dist.sampling``'s; ``SequenceParallelPredictor`` lets it drive a model whose
attention is sequence-parallel."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .sequence import predict_full


class SequenceParallelPredictor(nn.Module):
    """``model(x, t, text)`` with the token sequence sharded over ``groups`` and the prediction gathered on every
    rank (the model is a child, so samplers find its parameters' device and dtype)."""

    def __init__(self, model: nn.Module, groups) -> None:
        super().__init__()
        self.model, self.groups = model, groups

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return predict_full(self.model, x, timestep, text, self.groups)


def write_gif(videos: torch.Tensor, path: str | Path, min_side: int = 256, fps: int = 4) -> Path:
    """RGB videos [N, 3, T, H, W] in [0, 1] side by side as one looping GIF, each upscaled (nearest: the pixels stay
    sharp squares) by the smallest integer factor giving a side of at least ``min_side`` pixels, so a
    latent-resolution sample (16 x 16 on the CPU recipe) is viewable."""
    from PIL import Image

    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos of shape {tuple(videos.shape)} are not [N, 3, T, H, W]")
    scale = max(1, -(-min_side // min(videos.shape[-2:])))
    grid = torch.cat(list(videos), dim=-1)  # [3, T, H, N W]
    grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    frames = [Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy()) for f in grid.unbind(1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path
