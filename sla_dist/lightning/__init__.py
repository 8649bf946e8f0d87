"""Lightning / DeepSpeed training stack: SLAStrategy, SLACallback, DiTModule, datamodules, recipes, export."""

from .callback import SLACallback
from .checkpoint import export_safetensors, load_weights
from .data import LatentShardDataModule, ResumableSampler, SyntheticVideoDataModule
from .module import DiTModule
from .recipe import Recipe, load_recipe
from .strategy import SLAStrategy

__all__ = [
    "DiTModule",
    "LatentShardDataModule",
    "Recipe",
    "ResumableSampler",
    "SLACallback",
    "SLAStrategy",
    "SyntheticVideoDataModule",
    "export_safetensors",
    "load_recipe",
    "load_weights",
]
