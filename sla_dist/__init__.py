"""sla-dist: Sparse-Linear Attention (SLA) for training video Diffusion Transformers at scale."""

from .attention import SparseLinearAttention
from .calibration import ProjectionCalibration, calibrate_projections
from .config import SLAConfig
from .kernels.block_map import BlockMap, predict_block_map
from .kernels.op import sla_branches, sparse_linear_attention
from .kernels.reference import sla_branches_ref, sla_reference
from .models import PatchConfig, VideoDiT, apply_sla, dit_config

__all__ = [
    "BlockMap",
    "PatchConfig",
    "ProjectionCalibration",
    "SLAConfig",
    "SparseLinearAttention",
    "VideoDiT",
    "apply_sla",
    "calibrate_projections",
    "dit_config",
    "predict_block_map",
    "sla_branches",
    "sla_branches_ref",
    "sla_reference",
    "sparse_linear_attention",
]
__version__ = "0.1.0"
