"""Reading what a training run left on disk, shared by the end-to-end tests."""

from __future__ import annotations

import csv
from pathlib import Path


def logged_losses(out: Path) -> dict[int, float]:
    """step -> train/loss over every CSV version of a run (a resumed run continues the version it resumes)."""
    losses = {}
    for path in sorted((out / "logs" / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                losses[int(row["step"])] = float(row["train/loss"])
    return losses
