"""Attention fidelity: how far SLA's output is from dense attention, per layer and sparsity, on a real batch.

Forward pre-hooks on every block's self-attention core (``block.self_attn.core``, dense or SLA) capture the q, k, v
that the model really produces for a noised data batch. Each layer's captured inputs then go through dense softmax
attention and through SLA at each requested sparsity (topk = 1 - sparsity); the error is the relative L1 distance
sum|O_sla - O_dense| / sum|O_dense|. A layer that is SLA in the checkpoint keeps its trained ``proj_l`` and its
feature map / linear scope / block sizes; a dense layer gets a fresh SLA layer with the settings SLA layers are
trained with (the recipe's ``sla`` section, passed as ``sla``) and ``proj_l`` = 0: sparse branch only, what SLA
costs a model that was never fine-tuned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..attention import SparseLinearAttention, dense_attention, relative_l1
from ..config import SLAConfig
from ..models import VideoDiT
from ..sampling import TIMESTEP_SCALE


@dataclass
class FidelityConfig:
    """What the attention-fidelity probe measures."""

    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9, 0.95])
    """Nominal sparsities (fraction of key blocks not computed exactly), each in [0, 1)."""

    sigma: float = 0.5
    """Noise level of the probe batch: x = (1 - sigma) x0 + sigma e."""

    seed: int = 0
    """Seed of the probe noise."""

    def __post_init__(self) -> None:
        self.sparsities = [float(s) for s in self.sparsities]
        if not self.sparsities:
            raise ValueError("sparsities must list at least one value")
        bad = [s for s in self.sparsities if not 0 <= s < 1]
        if bad:
            raise ValueError(f"sparsities {bad} are outside [0, 1)")
        if not 0 <= self.sigma <= 1:
            raise ValueError(f"sigma={self.sigma} must lie in [0, 1]")


@torch.no_grad()
def capture_qkv(model: VideoDiT, latents: torch.Tensor, timestep: torch.Tensor,
                text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (q, k, v) [B, H, L, D] each block's self-attention core receives in one forward pass."""
    captured: list = [None] * len(model.blocks)

    def hook_for(i: int):
        def hook(module: nn.Module, args) -> None:
            captured[i] = tuple(a.detach() for a in args[:3])
        return hook

    handles = [block.self_attn.core.register_forward_pre_hook(hook_for(i)) for i, block in enumerate(model.blocks)]
    try:
        model(latents, timestep, text)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def probe_layer(core: nn.Module, head_dim: int, sparsity: float,
                sla: SLAConfig | None = None) -> SparseLinearAttention:
    """An SLA layer at ``sparsity`` shaped like ``core``: its settings and proj_l if it is SLA, else the settings
    of ``sla`` (the recipe's; None: ``SLAConfig()`` defaults) with a zero proj_l."""
    if isinstance(core, SparseLinearAttention):
        base = core.config
    else:
        base = sla if sla is not None else SLAConfig()
    topk = 1.0 - sparsity
    config = dataclasses.replace(base, topk=topk, negligible=min(base.negligible, 1.0 - topk))
    layer = SparseLinearAttention.from_config(head_dim, config)
    if isinstance(core, SparseLinearAttention):
        layer.proj_l.load_state_dict(core.proj_l.state_dict())
    return layer


@torch.no_grad()
def attention_fidelity(model: VideoDiT, latents: torch.Tensor, text: torch.Tensor,
                       config: FidelityConfig, sla: SLAConfig | None = None) -> dict:
    """Per-layer SLA vs dense error on clean ``latents`` [B, C, T, H, W] noised to ``config.sigma``; dense layers
    are probed with the settings of ``sla`` (the recipe's SLA config; None: defaults).

    Returns {'sparsities': [...], 'sigma', 'layers': [{'layer', 'sla' (converted in the checkpoint), 'error': [per
    sparsity], 'realized_sparsity': [per sparsity]}]}."""
    param = next(model.parameters())
    latents, text = latents.to(param), text.to(param)
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(latents.shape, generator=generator).to(param)
    x = (1 - config.sigma) * latents + config.sigma * noise
    timestep = torch.full((latents.shape[0],), config.sigma * TIMESTEP_SCALE, device=param.device)
    captured = capture_qkv(model, x, timestep, text)
    layers = []
    for i, (block, (q, k, v)) in enumerate(zip(model.blocks, captured)):
        core = block.self_attn.core
        dense = dense_attention(q, k, v)
        errors, realized = [], []
        for sparsity in config.sparsities:
            layer = probe_layer(core, q.shape[-1], sparsity, sla).to(device=q.device, dtype=param.dtype)
            out, achieved = layer(q, k, v, return_sparsity=True)
            errors.append(relative_l1(out, dense))
            realized.append(float(achieved))
        layers.append({"layer": i, "sla": isinstance(core, SparseLinearAttention), "error": errors,
                       "realized_sparsity": realized})
    return {"sparsities": list(config.sparsities), "sigma": config.sigma, "layers": layers}
