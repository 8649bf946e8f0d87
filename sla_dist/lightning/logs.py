"""A run's CSV and TensorBoard logs under ``<output_dir>/logs/{csv,tensorboard}/version_N``.

A fresh run starts a new version; a resumed run continues the version of the run it resumes, so one training run
is one curve however often it was interrupted, and a rerun of a finished run adds no empty version. Steps logged
after the checkpoint a run resumes from (they are trained again) are dropped: TensorBoard purges them
(``purge_step``), the CSV file keeps only its earlier rows.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning_utilities.core.imports import RequirementCache
from typing_extensions import override

_TENSORBOARD = RequirementCache("tensorboard") or RequirementCache("tensorboardX")
_VERSION = re.compile(r"^version_(\d+)$")


def log_version(logs: str | Path, resume: bool) -> int:
    """The version a run logs to: the newest existing one when resuming (0 if none), else the next free one."""
    found = [int(m.group(1)) for kind in ("csv", "tensorboard") if (Path(logs) / kind).is_dir()
             for m in map(_VERSION.match, os.listdir(Path(logs) / kind)) if m]
    if not found:
        return 0
    return max(found) if resume else max(found) + 1


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, which empties an existing ``metrics.csv``, made to keep its rows before ``keep_before``
    (they are written back with the first new rows)."""

    def __init__(self, log_dir: str, keep_before: int | None) -> None:
        self._keep_before = keep_before
        super().__init__(log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        if self._keep_before is not None:
            self.metrics = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) < self._keep_before]
            self.metrics_keys = sorted(set().union(*self.metrics)) if self.metrics else []
        path.unlink()


class ContinuedCSVLogger(CSVLogger):
    """CSVLogger continuing an existing ``metrics.csv`` below step ``keep_before`` (None: start it afresh)."""

    def __init__(self, *args, keep_before: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_before = keep_before

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.keep_before)
        return self._experiment


def build_loggers(output_dir: str | Path, resume_step: int | None) -> list[Logger]:
    """CSV (always) and TensorBoard (when installed) loggers of a run; ``resume_step`` is the global step of the
    checkpoint being resumed, None for a fresh run."""
    logs = Path(output_dir) / "logs"
    version = log_version(logs, resume=resume_step is not None)
    loggers: list[Logger] = [ContinuedCSVLogger(logs, name="csv", version=version, keep_before=resume_step)]
    if _TENSORBOARD:
        loggers.append(TensorBoardLogger(logs, name="tensorboard", version=version, default_hp_metric=False,
                                         purge_step=resume_step))
    return loggers
