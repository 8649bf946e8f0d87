"""A run's checkpoints on disk: ``step{N}.ckpt`` holds the state after N optimizer steps, ``last.ckpt`` links to the
newest, and resuming picks the newest *complete* one.

``StepCheckpoints`` saves every ``every`` steps and after the last step, in an order chosen so that a kill at any
point leaves the newest complete checkpoint findable and never a mislabelled one:

1. every rank writes into ``step{N}.ckpt.partial`` (Lightning / DeepSpeed, then a barrier);
2. rank 0 renames it to ``step{N}.ckpt``: a checkpoint is complete exactly when it has its final name;
3. ``on_commit`` runs (``train`` records the recipe that produced the checkpoint);
4. ``last.ckpt`` is relinked by renaming a fresh link over it (never dangling, never written through);
5. the older ``step*.ckpt`` are deleted.

Lightning's ModelCheckpoint (``save_top_k=1, save_last="link"``) deleted the old checkpoint before relinking, so a
kill in between left a dangling ``last.ckpt`` and the next run started from step 0; it did not save the last steps
when ``max_steps`` was not a multiple of the interval, and its ``last`` save went through the link into the older
checkpoint's directory. All ranks must see one filesystem (as DeepSpeed's sharded checkpoints need anyway).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

_STEP = re.compile(r"^step(\d+)\.ckpt$")
PARTIAL = ".partial"
LAST = "last.ckpt"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    """A non-empty checkpoint file, or a DeepSpeed directory whose ``latest`` tag file (written after its shards)
    exists. Checkpoints this module writes are complete by construction; the check also covers older runs'."""
    if path.is_file():
        return path.stat().st_size > 0
    return (path / "latest").is_file() and any(path.glob("*/*model_states.pt"))


def step_checkpoints(directory: Path) -> dict[int, Path]:
    """step -> path of every ``step{N}.ckpt`` in ``directory``, complete or not."""
    found = {}
    for path in directory.iterdir() if directory.is_dir() else ():
        match = _STEP.match(path.name)
        if match and not path.is_symlink():
            found[int(match.group(1))] = path
    return found


def resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir``; None when the run has none (also when only
    partial saves of a killed first checkpoint are left). Raises ValueError naming them when checkpoints exist but
    none is complete, rather than letting the run silently start again from step 0."""
    directory = checkpoint_dir(output_dir)
    found = step_checkpoints(directory)
    complete = {step: path for step, path in found.items() if is_complete(path)}
    if complete:
        return complete[max(complete)]
    if found:
        names = ", ".join(str(found[s]) for s in sorted(found))
        raise ValueError(f"no complete checkpoint to resume from in {str(directory)!r}: {names} "
                         "are incomplete; move them away to start again from step 0 (or pass --no-resume)")
    return None


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def link_last(checkpoint: Path) -> None:
    """Point ``last.ckpt`` beside ``checkpoint`` at it, atomically (a new link renamed over the old one)."""
    tmp = checkpoint.parent / f".{LAST}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(checkpoint.name, tmp)
    os.replace(tmp, checkpoint.parent / LAST)


class StepCheckpoints(Callback):
    """Save ``step{N}.ckpt`` every ``every`` optimizer steps and after the last one; keep only the newest.

    Args:
        dirpath: the run's checkpoint directory.
        every: steps between checkpoints.
        on_commit: called on global rank 0 with each checkpoint once it is complete, before ``last.ckpt`` moves.
    """

    def __init__(self, dirpath: str | Path, every: int, on_commit=None) -> None:
        if every <= 0:
            raise ValueError(f"checkpoint interval every={every} must be > 0")
        self.dirpath, self.every, self.on_commit = Path(dirpath), every, on_commit
        self._saved = -1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved = trainer.global_step  # a resumed run's starting step is saved already
        if trainer.is_global_zero and self.dirpath.is_dir():
            for stale in self.dirpath.glob(f"*{PARTIAL}"):
                rank_zero_info(f"removing {stale}, an unfinished save of an earlier run")
                remove(stale)
        trainer.strategy.barrier("StepCheckpoints.on_train_start")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # every micro-batch ends here; the step count moves only on optimizer steps
        step = trainer.global_step
        if step != self._saved and (step % self.every == 0 or step >= trainer.max_steps):
            self.save(trainer, step)

    def save(self, trainer: pl.Trainer, step: int) -> Path:
        final = self.dirpath / f"step{step}.ckpt"
        partial = final.with_name(final.name + PARTIAL)
        trainer.save_checkpoint(partial, weights_only=False)  # the full state; every rank writes, then a barrier
        if trainer.is_global_zero:
            if final.exists():  # a checkpoint of this step from a run started over with --no-resume
                remove(final)
            os.rename(partial, final)
            if self.on_commit is not None:
                self.on_commit(final)
            link_last(final)
            for older in step_checkpoints(self.dirpath).values():
                if older != final:
                    remove(older)
        trainer.strategy.barrier("StepCheckpoints.save")
        self._saved = step
        return final
