"""One resume decision for all ranks: global rank 0 picks the checkpoint (``resume.start``), the others follow.

Ranks that list ``checkpoints/`` themselves can disagree: on a shared filesystem a checkpoint may be renamed or
rotated between two listings, and caches (NFS) show nodes different directory states. One rank would then load
step 120 and another step 100, or one would resume while another starts fresh, and their collectives would hang or
train different states. So only rank 0 looks, before the Trainer starts; the other ranks hand ``fit`` a
:class:`RankZeroCheckpoint`, which :class:`ShareResumeCheckpoint` fills in once the process group exists (the
callback's ``setup`` runs before Lightning restores anything), and check that they see the same file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..parallel.groups import broadcast_text


class RankZeroCheckpoint(os.PathLike):
    """The ``ckpt_path`` a rank other than 0 passes to ``trainer.fit``: the checkpoint rank 0 resumes from, known
    after :class:`ShareResumeCheckpoint`'s ``setup``.

    Its truth value is what Lightning goes by: ``fit`` refuses a false ``ckpt_path`` before setup, so it is true
    until rank 0's choice is known; restoring (after setup) is skipped for a false one, so it is then false exactly
    when rank 0 starts fresh."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._known = False

    def set(self, path: Path | None) -> None:
        self._path, self._known = path, True

    @property
    def path(self) -> Path | None:
        if not self._known:
            raise RuntimeError("rank 0's resume checkpoint is not known before the Trainer's setup")
        return self._path

    def __fspath__(self) -> str:
        if self.path is None:
            raise RuntimeError("rank 0 starts fresh: there is no checkpoint to load")
        return str(self.path)

    def __bool__(self) -> bool:
        return not self._known or self._path is not None

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RankZeroCheckpoint({str(self._path) if self._known else 'unknown'!r})"


def recipe_digest(recipe) -> str:
    """A digest of a resolved recipe (a dataclass): equal on two ranks exactly when they run the same settings."""
    text = json.dumps(dataclasses.asdict(recipe), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ShareResumeCheckpoint(Callback):
    """Send rank 0's resume decision (``checkpoint``: a path or None on rank 0, a :class:`RankZeroCheckpoint` on the
    others) and its recipe's digest to every rank in ``setup``, before any training collective. Every rank then
    raises the same one-line ValueError, naming the ranks, when some rank does not see that checkpoint (its
    output_dir is not on the shared filesystem) or runs another recipe (another file or other overrides): ranks that
    trained with different settings would hang in mismatched collectives or silently diverge.

    ``digest``: this rank's :func:`recipe_digest`."""

    def __init__(self, checkpoint: Path | RankZeroCheckpoint | None, digest: str) -> None:
        self.checkpoint = checkpoint
        self.digest = digest

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        mine = None if isinstance(self.checkpoint, RankZeroCheckpoint) else self.checkpoint
        sent = broadcast_text(None if mine is None else str(mine), device)
        path = Path(sent) if sent else None
        if isinstance(self.checkpoint, RankZeroCheckpoint):
            self.checkpoint.set(path)
        rank0_digest = broadcast_text(self.digest if trainer.is_global_zero else None, device)
        # every rank must raise together: one that raised alone would leave its peers waiting in the next collective
        flags = torch.zeros(2, trainer.world_size, dtype=torch.int64, device=device)
        flags[0, trainer.global_rank] = int(path is not None and not path.exists())
        flags[1, trainer.global_rank] = int(self.digest != rank0_digest)
        dist.all_reduce(flags)
        missing, other_recipe = ([rank for rank, flag in enumerate(row) if flag] for row in flags.tolist())
        if other_recipe:
            raise ValueError(f"rank {', '.join(map(str, other_recipe))} runs another recipe than rank 0 (resolved "
                             "settings differ): every rank must be started with the same recipe file and overrides")
        if missing:
            raise ValueError(f"rank {', '.join(map(str, missing))} cannot see {str(path)!r}, the checkpoint rank 0 "
                             "resumes from: every rank must see the run's output_dir on one shared filesystem (and "
                             "start in the same working directory when output_dir is relative)")
