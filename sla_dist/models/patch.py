"""apply_sla(): swap the self-attention of a video DiT for Sparse-Linear Attention, in place.

Supported models: the reference :class:`~sla_dist.models.dit.VideoDiT` (its ``block.self_attn.core``), diffusers
``WanTransformer3DModel`` (the processors of ``blocks.*.attn1``) and ``CogVideoXTransformer3DModel`` (joint
text + video ``transformer_blocks.*.attn1``; text rows and keys stay dense). Each converted site gets its own
:class:`~sla_dist.SparseLinearAttention` as a submodule, so its ``proj_l`` is an ordinary parameter of the model:
trained, checkpointed and found by ``model.modules()`` (e.g. to anneal ``topk``).
"""

from __future__ import annotations

import sys

import torch.nn as nn

from ..attention import SparseLinearAttention
from ..config import SLAConfig
from .dit import VideoDiT
from .sites import PatchConfig, new_sla

__all__ = ["PatchConfig", "apply_sla"]


def _patch_video_dit(model: VideoDiT, config: PatchConfig) -> list[int]:
    cores = [block.self_attn for block in model.blocks]
    if any(isinstance(attn.core, SparseLinearAttention) for attn in cores):
        raise ValueError("apply_sla() was already applied to this VideoDiT")
    chosen = config.select(len(cores))
    for i in chosen:
        cores[i].core = new_sla(model.config.head_dim, config.sla, cores[i])
    return chosen


def _diffusers_patcher(model: nn.Module):
    """The diffusers patch function for ``model``'s class, or None; diffusers is looked up only if imported."""
    diffusers = sys.modules.get("diffusers")
    if diffusers is None:
        return None
    from . import diffusers as adapters

    if isinstance(model, diffusers.WanTransformer3DModel):
        return adapters.patch_wan
    if isinstance(model, diffusers.CogVideoXTransformer3DModel):
        return adapters.patch_cogvideox
    return None


def apply_sla(model: nn.Module, config: SLAConfig | PatchConfig | None = None) -> list[int]:
    """Convert the self-attention layers of ``model`` to SLA in place; returns the converted layer indices.

    Raises ValueError when the model was already converted or the layer selection does not fit it, and
    NotImplementedError for an unsupported model or a head dim the kernels do not take.
    """
    if config is None:
        config = PatchConfig()
    elif isinstance(config, SLAConfig):
        config = PatchConfig(sla=config)
    elif not isinstance(config, PatchConfig):
        raise ValueError(f"config must be an SLAConfig or PatchConfig, not {type(config).__name__}")
    if isinstance(model, VideoDiT):
        return _patch_video_dit(model, config)
    patcher = _diffusers_patcher(model)
    if patcher is None:
        raise NotImplementedError(f"apply_sla() does not support {type(model).__module__}.{type(model).__name__}; "
                                  "supported: sla_dist VideoDiT, diffusers WanTransformer3DModel and "
                                  "CogVideoXTransformer3DModel")
    return patcher(model, config)
