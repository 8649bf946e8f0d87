"""Library messages that a user of the ``sla-dist`` command cannot act on, hidden unless ``--verbose``.

Each entry names one known message; everything else (errors, Lightning's own status lines, unknown warnings)
still shows. DeepSpeed's logger keeps its errors.
"""

from __future__ import annotations

import logging
import warnings

QUIET_WARNINGS = (
    # Lightning 2.6 on torch >= 2.10 (lightning/pytorch/utilities/_pytree.py)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    # DeepSpeed's ZeRO gathers under sequence parallelism, through torch's deprecated alias
    r".*`torch\.distributed\.all_gather_into_tensor` is deprecated",
    # a resumed run saves into its own checkpoint directory, on purpose
    r"Checkpoint directory .* exists and is not empty",
)
QUIET_LOG_PREFIXES = ("💡 Tip:",)
"""Lightning's advertisement of its cloud products on every Trainer."""


class _DropPrefixes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(QUIET_LOG_PREFIXES)


class _ErrorsOnly(logging.Filter):
    """A filter rather than a level: DeepSpeed resets its logger's level when it is imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_LOGGERS = ("DeepSpeed", "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def configure_output(verbose: bool = False) -> None:
    """Hide the messages above (``verbose=False``) or show every library message. Either call first undoes what
    an earlier call installed, so one process (tests, a notebook) can switch back and forth."""
    _undo()
    if verbose:
        return
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("DeepSpeed").addFilter(_ErrorsOnly())  # "Setting accelerator to CPU..." on every rank
    # the loggers Lightning's rank_zero_info writes through (its handler sits on "lightning" or "lightning.pytorch"
    # depending on what was imported first; a filter on the emitting logger holds either way)
    for name in _LOGGERS[1:]:
        logging.getLogger(name).addFilter(_DropPrefixes())


def _undo() -> None:
    ours = [f for f in warnings.filters
            if f[0] == "ignore" and f[1] is not None and f[1].pattern in QUIET_WARNINGS]
    for entry in ours:
        warnings.filters.remove(entry)
    if ours and hasattr(warnings, "_filters_mutated"):  # invalidate the per-module caches of earlier decisions
        warnings._filters_mutated()
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, (_ErrorsOnly, _DropPrefixes))]:
            logger.removeFilter(f)
