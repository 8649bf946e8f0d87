"""Validation flow-matching loss: DiTModule's objective on held-out data, with deterministic noise and levels.

Training draws one random noise level per sample; for validation that is needlessly noisy. Here each of ``draws``
passes uses the noise levels at the midpoints of ``draws`` equal bins of u in (0, 1) (shifted as in training), so
every checkpoint is scored on the same (sample, noise, sigma) triples and the numbers differ only by the weights.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn

from ..sampling import TIMESTEP_SCALE, flow_sigmas


@torch.no_grad()
def validation_loss(model: nn.Module, latents: torch.Tensor, text: torch.Tensor, draws: int = 4,
                    shift: float = 1.0, seed: int = 0, batch_size: int = 8) -> float:
    """Mean squared velocity error over clean ``latents`` [N, C, T, H, W] and text [N, Lt, text_dim], averaged
    over ``draws`` noise levels per sample (bin midpoints of u, a different level for each sample of a draw)."""
    if draws < 1 or batch_size < 1:
        raise ValueError(f"draws={draws} and batch_size={batch_size} must be positive")
    if latents.shape[0] != text.shape[0] or latents.shape[0] < 1:
        raise ValueError(f"{latents.shape[0]} latents and {text.shape[0]} text embeddings must match and be > 0")
    param = next(model.parameters())
    n = latents.shape[0]
    total, count = 0.0, 0
    for d in range(draws):
        # sample i of draw d sits in bin (i + d) mod draws: each sample sees every bin once over the draws
        u = (torch.arange(n, dtype=torch.float64) + d) % draws
        sigma = flow_sigmas((u + 0.5) / draws, shift).float()
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed},{d}".encode()))
        noise = torch.randn(latents.shape, generator=generator)
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            x0, e = latents[sl].to(param), noise[sl].to(param)
            s = sigma[sl].to(param).view(-1, 1, 1, 1, 1)
            pred = model((1 - s) * x0 + s * e, sigma[sl].to(param.device) * TIMESTEP_SCALE, text[sl].to(param))
            total += float((pred.float() - (e - x0).float()).square().sum())
            count += pred.numel()
    return total / count
