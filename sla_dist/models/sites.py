"""Which attention sites become SLA (PatchConfig) and the SLA layer each one gets (new_sla).

Shared by :mod:`sla_dist.models.patch` (the reference DiT, and the dispatch of :func:`apply_sla`) and
:mod:`sla_dist.models.diffusers` (diffusers models), so neither imports the other's module to get them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..attention import SparseLinearAttention
from ..config import SLAConfig
from ..kernels.op import KERNEL_HEAD_DIMS


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
