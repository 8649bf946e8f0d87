"""Video DiT models and apply_sla(): the reference Wan-style DiT, 3D token tiling, diffusers adapters."""

from .compile import COMPILE_MODES, apply_compile
from .config import DIT_CONFIGS, DiTConfig, dit_config
from .dit import DiTInputs, VideoDiT
from .patch import apply_sla
from .sites import PatchConfig
from .tiling import TokenTiling, tile_permutation
from .wan_weights import video_dit_state_dict_from_wan

__all__ = [
    "COMPILE_MODES",
    "DIT_CONFIGS",
    "DiTConfig",
    "DiTInputs",
    "PatchConfig",
    "TokenTiling",
    "VideoDiT",
    "apply_compile",
    "apply_sla",
    "dit_config",
    "tile_permutation",
    "video_dit_state_dict_from_wan",
]
