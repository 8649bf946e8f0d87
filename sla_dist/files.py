"""Writing files that users share: safetensors with the permissions every other output gets."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` gives a new file (0o644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, but the file gets the default mode: safetensors creates it 0o600 (owner
    only), which surprises whoever shares an exported model, a latent shard or an evaluation video."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, default_file_mode())
    return path
