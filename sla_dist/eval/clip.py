"""CLIP score of videos against their prompts: torchmetrics ``CLIPScore`` over every frame, from a local CLIP.

``CLIPScore`` takes a model name or a callable returning (model, processor). Two things stop the plain route here:
a local directory is rejected unless its name contains "openai", and with transformers 5 ``get_image_features`` /
``get_text_features`` return output objects where torchmetrics 1.9 expects tensors. So :func:`local_clip` returns a
callable that loads a CLIP directory (``CLIPModel`` + ``CLIPProcessor`` ``save_pretrained`` layout, read offline,
weights from safetensors only: pickled ``*.bin`` weights can run code when loaded) and wraps the model in
:class:`PooledCLIP`, whose feature methods return the projected pooled embeddings.

Score: CLIPScore's 100 * cos(image, text), averaged over all frames of all videos (each frame paired with its
video's prompt), clamped at 0 as CLIPScore does.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..data.encoders import PICKLED_WEIGHTS, require_safetensors
from .videos import to_uint8


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput with the projected embedding in ``pooler_output``; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PooledCLIP(nn.Module):
    """A ``transformers.CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # CLIPScore reads text_config.max_position_embeddings to truncate captions

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids, attention_mask))


def local_clip(directory: str | Path) -> Callable[[], tuple[PooledCLIP, object]]:
    """A loader for ``CLIPScore(model_name_or_path=...)`` reading the CLIP at ``directory`` without network."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"CLIP directory {str(directory)!r} does not exist")
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob(p) for p in PICKLED_WEIGHTS)
    if not (directory / "config.json").is_file() or not has_weights:
        raise ValueError(f"CLIP directory {str(directory)!r} lacks config.json or weights (*.safetensors); save one "
                         "with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    require_safetensors(directory, "CLIP directory")

    @functools.cache  # one load however many checkpoints are scored
    def load() -> tuple[PooledCLIP, object]:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(directory, local_files_only=True, use_safetensors=True).eval()
        processor = CLIPProcessor.from_pretrained(directory, local_files_only=True)
        return PooledCLIP(model), processor

    return load


@torch.no_grad()
def clip_score(videos: torch.Tensor, prompts: list[str], loader: Callable[[], tuple[nn.Module, object]]) -> float:
    """Mean per-frame CLIP score of videos [N, 3, T, H, W] in [0, 1] against ``prompts`` (one per video)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos of shape {tuple(videos.shape)} are not [N, 3, T, H, W]")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos; give one prompt per video")
    metric = CLIPScore(model_name_or_path=loader)
    for video, prompt in zip(videos, prompts):
        frames = to_uint8(video).transpose(0, 1)  # [T, 3, H, W] 0..255: CLIP processors rescale themselves
        metric.update(list(frames), [prompt] * frames.shape[0])
    return float(metric.compute())
