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


@pytest.mark.parametrize("verbose", [False, True])
def test_known_library_messages_are_hidden_unless_verbose(verbose, restored_logging, capfd):
    import deepspeed  # noqa: F401  (creates DeepSpeed's logger the way a run does)
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.configure_output(verbose=verbose)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`")
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning)
        warnings.warn("Checkpoint directory /runs/x/checkpoints exists and is not empty.")
        warnings.warn("an unknown warning")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
        logging.getLogger("DeepSpeed").error("a DeepSpeed error")
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    shown = [str(w.message) for w in caught]
    printed = "".join(capfd.readouterr())
    assert "an unknown warning" in shown and "a DeepSpeed error" in printed and "GPU available" in printed
    assert len(shown) == (4 if verbose else 1)
    assert ("Setting accelerator to CPU" in printed) == verbose and ("Tip:" in printed) == verbose


def test_every_subcommand_takes_verbose():
    parser = build_parser(["train"])
    assert parser.parse_args(["train", "r.yaml", "--verbose"]).verbose
    assert not parser.parse_args(["train", "r.yaml"]).verbose
