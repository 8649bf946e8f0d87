"""Sample videos at the end of training: the flow-matching ODE integrated with Euler steps, written as an animated
GIF grid with Pillow (no video codec needed on a fresh machine)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .module import flow_sigmas


@torch.no_grad()
def euler_sample(predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], text: torch.Tensor,
                 shape: tuple[int, int, int, int], steps: int, shift: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Latents [B, C, T, H, W] from noise at sigma 1 to sigma 0 along the velocity (noise - data) that
    ``predict(x, timestep, text)`` returns (a VideoDiT, or its sequence-parallel form)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be positive")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(text.shape[0], *shape, generator=generator).to(text)
    sigmas = flow_sigmas(torch.linspace(1, 0, steps + 1), shift).tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((x.shape[0],), s * 1000, device=x.device)
        x = x + (s_next - s) * predict(x, t, text).to(x)
    return x.float()


def write_gif(videos: torch.Tensor, path: str | Path, scale: int = 8, fps: int = 4) -> Path:
    """RGB videos [N, 3, T, H, W] in [0, 1] side by side as one looping GIF, each pixel a ``scale`` square."""
    from PIL import Image

    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos of shape {tuple(videos.shape)} are not [N, 3, T, H, W]")
    grid = torch.cat(list(videos), dim=-1)  # [3, T, H, N W]
    grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    frames = [Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy()) for f in grid.unbind(1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path
