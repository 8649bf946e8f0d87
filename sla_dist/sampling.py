"""Sampling videos from a trained DiT: the flow-matching ODE with Euler or Heun steps and classifier-free guidance.
Training's final sample and evaluation both use it, so it sits below ``sla_dist.lightning`` and ``sla_dist.eval``.

The convention is DiTModule's (rectified flow, as Wan): x_sigma = (1 - sigma) x0 + sigma e, and the model predicts
the velocity dx/dsigma = e - x0 from (x_sigma, 1000 sigma, text). Sampling integrates that ODE from pure noise at
sigma = 1 to data at sigma = 0 along the shifted schedule DiTModule trains with.

Each video's starting noise comes from its own generator seeded by (seed, index), so video i is the same whatever
the batch size, and two checkpoints sampled with one seed start from identical noise: their videos differ only
through the weights, which is what a side-by-side comparison wants.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn

SOLVERS = ("euler", "heun")
TIMESTEP_SCALE = 1000.0
"""The model's timestep input is 1000 sigma (DiTModule.noised)."""


def flow_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's shifted schedule: sigma = s u / (1 + (s - 1) u), u in (0, 1)."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class SamplerConfig:
    """How sample videos are drawn from a model."""

    steps: int = 20
    """ODE steps (Heun evaluates the model twice per step but the last)."""

    solver: str = "euler"
    """'euler' (first order) or 'heun' (second order: Euler predictor, trapezoidal corrector)."""

    guidance: float = 1.0
    """Classifier-free guidance scale: v = v_null + g (v_text - v_null); 1 is plain conditional sampling (one
    model call per evaluation). Useful only for a model trained with caption dropout to the null text."""

    shift: float = 1.0
    """Timestep shift of the schedule, sigma = s u / (1 + (s - 1) u); use the recipe's ``optim.flow_shift``."""

    seed: int = 0
    """Seed of the starting noise (video i uses seed (seed, i))."""

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be a positive integer")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is not one of {SOLVERS}")
        if not self.guidance >= 0:
            raise ValueError(f"guidance={self.guidance} must be >= 0")
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift} must be positive")


def sigma_schedule(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 noise levels from 1 down to 0 (float64, so the step sizes sum to exactly 1)."""
    return flow_sigmas(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)


def initial_noise(num: int, shape: tuple[int, ...], seed: int, first_index: int = 0) -> torch.Tensor:
    """[num, *shape] standard normal noise, video i drawn from a generator seeded by (seed, first_index + i)."""
    seeds = [zlib.crc32(f"{seed},{first_index + i}".encode()) for i in range(num)]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def guided_velocity(model: nn.Module, x: torch.Tensor, sigma: float, text: torch.Tensor,
                    null_text: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The model's velocity at noise level ``sigma``, with classifier-free guidance when ``guidance != 1``
    (conditional and null-text passes batched into one call)."""
    t = torch.full((x.shape[0],), sigma * TIMESTEP_SCALE, device=x.device)
    if guidance == 1.0:
        return model(x, t, text)
    if null_text is None:
        raise ValueError(f"guidance={guidance} needs null_text (the embedding of the empty caption)")
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null_text.expand_as(text)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample(model: nn.Module, text: torch.Tensor, shape: tuple[int, int, int, int], config: SamplerConfig,
           null_text: torch.Tensor | None = None, first_index: int = 0) -> torch.Tensor:
    """Latents [B, C, T, H, W] (float32) for text embeddings [B, Lt, text_dim]; ``shape`` is (C, T, H, W).

    ``null_text`` [1 or B, Lt, text_dim] is the unconditional input of classifier-free guidance."""
    param = next(model.parameters())
    text = text.to(param)
    null_text = None if null_text is None else null_text.to(param)
    x = initial_noise(text.shape[0], tuple(shape), config.seed, first_index).to(param)
    sigmas = sigma_schedule(config.steps, config.shift).tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = guided_velocity(model, x, s, text, null_text, config.guidance)
        x_next = x + (s_next - s) * v
        if config.solver == "heun" and s_next > 0:
            # trapezoidal corrector with the velocity at the Euler prediction; the last step (to sigma 0, where the
            # velocity is least informative) stays Euler, as in EDM's Heun sampler
            v_next = guided_velocity(model, x_next, s_next, text, null_text, config.guidance)
            x_next = x + (s_next - s) * (v + v_next) / 2
        x = x_next
    return x.float()
