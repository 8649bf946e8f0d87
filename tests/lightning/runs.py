"""Reading what a training run left on disk, shared by the end-to-end tests."""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path

import torch


def logged_losses(out: Path) -> dict[int, float]:
    """step -> train/loss over every CSV version of a run (a resumed run continues the version it resumes)."""
    losses = {}
    for path in sorted((out / "logs" / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                losses[int(row["step"])] = float(row["train/loss"])
    return losses


@contextlib.contextmanager
def in_process_runs():
    """Around in-process SLAStrategy runs: they initialise a (world 1, gloo) default process group, which the runs
    within share, and set MASTER_PORT, RANK, ... in the environment; later tests fork workers or start training
    subprocesses that set up their own, so neither may outlive the block."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
