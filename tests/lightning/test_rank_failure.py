"""One rank raising while its peers wait in a collective ends the whole job promptly, with that rank's error
(issue #13). Two independent ranks (gloo, as torchrun starts them: nothing kills a rank because another failed)
train with sequence parallelism 2 through ``sla-dist train``; rank 1 fails reading a sample in its third step while
rank 0, holding the same sample, goes on into the step's sequence-parallel collectives."""

from __future__ import annotations

import sys
from pathlib import Path

from sla_dist import cli
from sla_dist.lightning import synthetic
from tests.lightning.ranks import run_ranks

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"
DEADLINE_S = 60  # the run fails after ~10 s; the strategy's collective timeout is 30 min


def _train_until_rank1_fails(rank: int, out: str) -> None:
    if rank == 1:
        read = synthetic.SyntheticVideoDataset.__getitem__
        calls = [0]

        def bad_sample(self, index: int) -> dict:
            calls[0] += 1
            if calls[0] > 4:  # batches of 2: the third step
                raise RuntimeError(f"sample {index} is corrupt (injected on rank 1)")
            return read(self, index)

        synthetic.SyntheticVideoDataset.__getitem__ = bad_sample
    sys.exit(cli.main(["train", str(RECIPE), f"output_dir={out}", "trainer.devices=2", "parallel.sp_size=2",
                       "trainer.max_steps=6", "data.batch_size=2", "data.num_workers=0", "trainer.val_every=0",
                       "trainer.progress_bar=false", "sample.enabled=false"]))


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    results = run_ranks(_train_until_rank1_fails, 2, tmp_path, DEADLINE_S, str(tmp_path / "run"))
    logs = "\n".join(f"--- rank {i} (exit {r.exitcode}):\n{r.log[-3000:]}" for i, r in enumerate(results))
    assert all(r.exitcode not in (None, 0) for r in results), logs
    assert "RuntimeError: sample" in results[1].log and "is corrupt (injected on rank 1)" in results[1].log, logs
    # gloo: rank 0's collective failed on the lost connection ("closed" or "reset" by peer), not on a timeout
    assert "Check the logs of the remote worker" in results[0].log, logs
