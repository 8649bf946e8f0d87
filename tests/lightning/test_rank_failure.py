"""One rank raising while its peers wait in a collective ends the whole job promptly, with that rank's error
(issue #13). Two independent ranks (as torchrun starts them: nothing kills a rank because another failed) train
with sequence parallelism 2 through ``sla-dist train``; rank 1 fails reading a sample in its third step while
rank 0, holding the same sample, goes on into the step's sequence-parallel collectives. On CPU (gloo) rank 0's
collective fails as the connection to rank 1 closes; on GPUs (NCCL) nothing tells rank 0 that its peer is gone, and
the run's collective timeout (``parallel.timeout_s``) has NCCL's watchdog end it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from sla_dist import cli
from sla_dist.lightning import synthetic
from tests.lightning.ranks import backend_overrides, describe, run_ranks
from tests.parallel.dist_utils import device_params

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"
DEADLINE_S = 60  # the run fails after ~10 s on CPU; the strategy's collective timeout is 30 min
CUDA_TIMEOUT_S = 30
"""The collective timeout of the NCCL run: how long rank 0 waits for the dead rank 1 before the watchdog aborts it
(the default of 30 min would outlast the deadline)."""
NCCL_ABORT = re.compile(
    # the watchdog's timeout, naming the stuck collective with the recipe's timeout; or NCCL itself reporting the
    # lost peer first, which ends the job as well
    rf"Watchdog caught collective operation timeout: WorkNCCL\(.*Timeout\(ms\)={CUDA_TIMEOUT_S * 1000}\)"
    r"|NCCL error.*remote process exited")


def _train_until_rank1_fails(rank: int, device: str, out: str) -> None:
    if rank == 1:
        read = synthetic.SyntheticVideoDataset.__getitem__
        calls = [0]

        def bad_sample(self, index: int) -> dict:
            calls[0] += 1
            if calls[0] > 4:  # batches of 2: the third step
                raise RuntimeError(f"sample {index} is corrupt (injected on rank 1)")
            return read(self, index)

        synthetic.SyntheticVideoDataset.__getitem__ = bad_sample
    timeout = [f"parallel.timeout_s={CUDA_TIMEOUT_S}"] if device == "cuda" else []
    sys.exit(cli.main(["train", str(RECIPE), f"output_dir={out}", "trainer.devices=2", "parallel.sp_size=2",
                       "trainer.max_steps=6", "data.batch_size=2", "data.num_workers=0", "trainer.val_every=0",
                       "trainer.progress_bar=false", "sample.enabled=false", *backend_overrides(device), *timeout]))


@pytest.mark.parametrize("device", device_params(2))
def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path, device):
    results = run_ranks(_train_until_rank1_fails, device, 2, tmp_path, DEADLINE_S, str(tmp_path / "run"))
    logs = describe(results)
    assert all(r.exitcode not in (None, 0) for r in results), logs
    assert "RuntimeError: sample" in results[1].log and "is corrupt (injected on rank 1)" in results[1].log, logs
    if device == "cpu":
        # gloo: rank 0's collective failed on the lost connection ("closed" or "reset" by peer), not on a timeout
        assert "Check the logs of the remote worker" in results[0].log, logs
    else:
        # NCCL (which only runs on GPUs, so the run was on them): rank 0 ended through the watchdog
        assert NCCL_ABORT.search(results[0].log), logs
