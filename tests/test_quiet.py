"""Quiet by default: the known library messages are hidden, others are not, and ``--verbose`` keeps them all."""

from __future__ import annotations

import logging
import warnings

import pytest

from sla_dist import quiet
from sla_dist.cli import build_parser


@pytest.fixture
def restored_logging():
    loggers = [logging.getLogger(n) for n in ("DeepSpeed", "lightning.pytorch.utilities.rank_zero",
                                              "lightning.fabric.utilities.rank_zero")]
    saved = [(logger, list(logger.filters)) for logger in loggers]
    yield
    for logger, filters in saved:
        logger.filters[:] = filters


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("verbose", [False, True])
def test_known_library_messages_are_hidden_unless_verbose(verbose, restored_logging):
    quiet.configure_output(verbose=False)  # as an earlier `sla-dist` call in this process would have
    import deepspeed  # noqa: F401  (creates DeepSpeed's logger the way a run does)

    deepspeed_log = logging.getLogger("DeepSpeed")
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # what rank_zero_info writes to
    lightning_log.setLevel(logging.INFO)
    collect = _Collect()
    for logger in (deepspeed_log, lightning_log):
        logger.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet.configure_output(verbose=verbose)
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`")
            warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning)
            warnings.warn("Checkpoint directory /runs/x/checkpoints exists and is not empty.")
            warnings.warn("an unknown warning")
            deepspeed_log.warning("Setting accelerator to CPU.")
            deepspeed_log.error("a DeepSpeed error")
            lightning_log.info("💡 Tip: For seamless cloud logging, try installing litlogger")
            lightning_log.info("GPU available: False, used: False")
    finally:
        for logger in (deepspeed_log, lightning_log):
            logger.removeHandler(collect)
        lightning_log.setLevel(logging.NOTSET)
    shown = [str(w.message) for w in caught]
    assert "an unknown warning" in shown and len(shown) == (4 if verbose else 1)
    logged = collect.messages
    assert "a DeepSpeed error" in logged and "GPU available: False, used: False" in logged
    assert ("Setting accelerator to CPU." in logged) == verbose
    assert any(m.startswith("💡 Tip") for m in logged) == verbose


def test_every_subcommand_takes_verbose():
    parser = build_parser(["train"])
    assert parser.parse_args(["train", "r.yaml", "--verbose"]).verbose
    assert not parser.parse_args(["train", "r.yaml"]).verbose
