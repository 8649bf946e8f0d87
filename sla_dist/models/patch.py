"""apply_sla(): swap the self-attention of a video DiT for Sparse-Linear Attention, in place.

Supported models: the reference :class:`~sla_dist.models.dit.VideoDiT` (its ``block.self_attn.core``), diffusers
``WanTransformer3DModel`` (the processors of ``blocks.*.attn1``) and ``CogVideoXTransformer3DModel`` (joint
text + video ``transformer_blocks.*.attn1``; text rows and keys stay dense). Each converted site gets its own
:class:`~sla_dist.SparseLinearAttention` as a submodule, so its ``proj_l`` is an ordinary parameter of the model:
trained, checkpointed and found by ``model.modules()`` (e.g. to anneal ``topk``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch.nn as nn

from ..attention import SparseLinearAttention
from ..config import SLAConfig
from ..kernels.op import KERNEL_HEAD_DIMS
from .dit import VideoDiT


@dataclass
class PatchConfig:
    """Where apply_sla() puts SLA and how each layer is configured."""

    sla: SLAConfig = field(default_factory=SLAConfig)
    """Settings of every converted layer (topk, negligible, block sizes, feature map, linear_scope, backend)."""

    skip_first: int = 0
    """Leave the first n self-attention layers dense."""

    layers: list[int] | None = None
    """Explicit indices of the layers to convert (negative ones count from the end); exclusive with
    ``skip_first``. None converts every layer from ``skip_first`` on."""

    def __post_init__(self) -> None:
        if not isinstance(self.sla, SLAConfig):
            raise ValueError(f"sla={self.sla!r} must be an SLAConfig")
        if self.skip_first < 0:
            raise ValueError(f"skip_first={self.skip_first} must be >= 0")
        if self.layers is not None:
            self.layers = list(self.layers)
            if self.skip_first:
                raise ValueError(f"give either layers={self.layers} or skip_first={self.skip_first}, not both")

    def select(self, num_layers: int) -> list[int]:
        """The layer indices to convert out of ``num_layers``, ascending."""
        if self.layers is None:
            if self.skip_first >= num_layers:
                raise ValueError(f"skip_first={self.skip_first} leaves none of the model's {num_layers} layers")
            return list(range(self.skip_first, num_layers))
        bad = [i for i in self.layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range for a model with {num_layers} layers")
        chosen = sorted({i % num_layers for i in self.layers})
        if len(chosen) != len(self.layers):
            raise ValueError(f"layers={self.layers} name the same layer twice (model has {num_layers} layers)")
        return chosen


def new_sla(head_dim: int, config: SLAConfig, like: nn.Module) -> SparseLinearAttention:
    """An SLA layer for one site, on the device and in the dtype of the site's parameters."""
    if config.backend != "reference" and head_dim not in KERNEL_HEAD_DIMS:
        raise NotImplementedError(f"head dim {head_dim} is not supported by the SLA kernels (supported: "
                                  f"{KERNEL_HEAD_DIMS}); backend='reference' runs it on CPU only")
    param = next(like.parameters())
    return SparseLinearAttention.from_config(head_dim, config).to(device=param.device, dtype=param.dtype)


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
