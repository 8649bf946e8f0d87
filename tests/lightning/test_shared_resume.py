"""Global rank 0 decides which checkpoint a multi-process run resumes from; the other ranks follow it (issue #13).

Two ranks (independent processes as torchrun starts them; gloo on CPU, NCCL on GPUs) resume a 2-rank ZeRO-2 run.
Rank 1 is given a view of the run directory that differs from rank 0's (what a checkpoint being rotated, or a
filesystem cache, shows a second node): it must resume rank 0's checkpoint anyway, or, when it cannot see that file
at all, every rank must stop with one line naming the path and the rank, instead of one rank resuming while the
other starts fresh. Every test runs on the CPU and, with two GPUs, on them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from sla_dist.lightning import resume
from sla_dist.lightning.recipe import load_recipe
from sla_dist.lightning.run import train
from tests.lightning.ranks import backend_overrides, describe, rank_device, run_ranks
from tests.parallel.dist_utils import device_params

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"
FAST = ["trainer.devices=2", "trainer.progress_bar=false", "sample.enabled=false", "data.batch_size=2",
        "data.num_workers=0", "trainer.val_every=0", "sparsity.dense_steps=1", "sparsity.anneal_steps=1",
        "sparsity.error_every=0", "optim.warmup_steps=0", "trainer.checkpoint_every=2"]
DEADLINE_S = 90  # the runs take ~10 s; ranks that disagree hang in a collective until the strategy's 30 min
# every test on each device; module scope: the cpu tests share one trained run, the cuda tests another
pytestmark = pytest.mark.parametrize("device", device_params(2), scope="module")


class _StartStep(Callback):
    """Writes the global step the rank starts training at (the resumed checkpoint's) and the device its weights are
    on to ``path``, as "STEP DEVICE"."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        self.path.write_text(f"{trainer.global_step} {next(pl_module.parameters()).device}")


def _train(rank: int, device: str, out: str, steps: int, workdir: list[str], rank1_sees_no_checkpoint: bool,
           rank1_overrides: tuple[str, ...] = ()) -> None:
    import os

    os.chdir(workdir[rank])
    if rank == 1 and rank1_sees_no_checkpoint:
        resume.resume_checkpoint = lambda output_dir: None
    extra = list(rank1_overrides) if rank == 1 else []
    recipe = load_recipe(RECIPE, [*FAST, *backend_overrides(device), f"output_dir={out}",
                                  f"trainer.max_steps={steps}", *extra])
    train(recipe, extra_callbacks=[_StartStep(Path(workdir[rank]) / f"start{rank}.txt")])


def _starts(workdir: Path) -> list[str]:
    """What each rank's ``_StartStep`` wrote in ``workdir``."""
    return [(workdir / f"start{rank}.txt").read_text() for rank in range(2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, device) -> Path:
    """A 2-rank run of 2 steps on ``device``: ``checkpoints/step2.ckpt`` holds both ranks' ZeRO shards."""
    root = tmp_path_factory.mktemp(f"trained_{device}")
    results = run_ranks(_train, device, 2, root, DEADLINE_S, str(root / "run"), 2, [str(root)] * 2, False)
    assert [r.exitcode for r in results] == [0, 0], describe(results)
    assert _starts(root) == [f"0 {rank_device(device, rank)}" for rank in range(2)], describe(results)
    assert (root / "run" / "checkpoints" / "step2.ckpt").is_dir()
    return root / "run"


def test_rank1_resumes_rank0s_checkpoint_whatever_it_lists(trained, tmp_path, device):
    out = tmp_path / "run"
    shutil.copytree(trained, out, symlinks=True)
    results = run_ranks(_train, device, 2, tmp_path, DEADLINE_S, str(out), 3, [str(tmp_path)] * 2, True)
    logs = describe(results)
    assert [r.exitcode for r in results] == [0, 0], logs
    assert _starts(tmp_path) == [f"2 {rank_device(device, rank)}" for rank in range(2)], logs


def test_a_rank_that_cannot_see_rank0s_checkpoint_stops_every_rank_naming_it(trained, tmp_path, device):
    # output_dir is relative: rank 1 runs in another directory, where "run" has no checkpoints
    workdirs = [tmp_path / "node0", tmp_path / "node1"]
    shutil.copytree(trained, workdirs[0] / "run", symlinks=True)
    workdirs[1].mkdir()
    results = run_ranks(_train, device, 2, tmp_path, DEADLINE_S, "run", 3, [str(w) for w in workdirs], False)
    logs = describe(results)
    assert [r.exitcode for r in results] == [1, 1], logs
    for r in results:
        assert "ValueError: rank 1 cannot see 'run/checkpoints/step2.ckpt', the checkpoint rank 0 resumes" in r.log, logs
    assert not (workdirs[1] / "run" / "checkpoints").exists()


def test_a_rank_started_with_another_recipe_stops_every_rank_naming_it(tmp_path, device):
    """Rank 1 gets another learning rate (a typo in one node's launch line): both ranks stop before training, with
    one line naming rank 1, instead of training two different models in lockstep."""
    results = run_ranks(_train, device, 2, tmp_path, DEADLINE_S, str(tmp_path / "run"), 2, [str(tmp_path)] * 2,
                        False, ("optim.lr=0.002",))
    logs = describe(results)
    assert [r.exitcode for r in results] == [1, 1], logs
    for r in results:
        assert "ValueError: rank 1 runs another recipe than rank 0" in r.log, logs
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
