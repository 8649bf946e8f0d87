"""Global rank 0 decides which checkpoint a multi-process run resumes from; the other ranks follow it (issue #13).

Two ranks (gloo, independent processes as torchrun starts them) resume a 2-rank ZeRO-2 run. Rank 1 is given a
view of the run directory that differs from rank 0's (what a checkpoint being rotated, or a filesystem cache, shows
a second node): it must resume rank 0's checkpoint anyway, or, when it cannot see that file at all, every rank must
stop with one line naming the path and the rank, instead of one rank resuming while the other starts fresh."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from sla_dist.lightning import resume
from sla_dist.lightning.recipe import load_recipe
from sla_dist.lightning.run import train
from tests.lightning.ranks import run_ranks

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"
FAST = ["trainer.devices=2", "trainer.progress_bar=false", "sample.enabled=false", "data.batch_size=2",
        "data.num_workers=0", "trainer.val_every=0", "sparsity.dense_steps=1", "sparsity.anneal_steps=1",
        "sparsity.error_every=0", "optim.warmup_steps=0", "trainer.checkpoint_every=2"]
DEADLINE_S = 90  # the runs take ~10 s; ranks that disagree hang in a collective until the strategy's 30 min


class _StartStep(Callback):
    """Writes the global step the rank starts training at (the resumed checkpoint's) to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        self.path.write_text(str(trainer.global_step))


def _train(rank: int, out: str, steps: int, workdir: list[str], rank1_sees_no_checkpoint: bool,
           rank1_overrides: tuple[str, ...] = ()) -> None:
    import os

    os.chdir(workdir[rank])
    if rank == 1 and rank1_sees_no_checkpoint:
        resume.resume_checkpoint = lambda output_dir: None
    extra = list(rank1_overrides) if rank == 1 else []
    recipe = load_recipe(RECIPE, [*FAST, f"output_dir={out}", f"trainer.max_steps={steps}", *extra])
    train(recipe, extra_callbacks=[_StartStep(Path(workdir[rank]) / f"start{rank}.txt")])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-rank run of 2 steps: ``checkpoints/step2.ckpt`` holds both ranks' ZeRO shards."""
    root = tmp_path_factory.mktemp("trained")
    results = run_ranks(_train, 2, root, DEADLINE_S, str(root / "run"), 2, [str(root)] * 2, False)
    assert [r.exitcode for r in results] == [0, 0], results[0].log[-3000:] + results[1].log[-3000:]
    assert (root / "run" / "checkpoints" / "step2.ckpt").is_dir()
    return root / "run"


def test_rank1_resumes_rank0s_checkpoint_whatever_it_lists(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out, symlinks=True)
    results = run_ranks(_train, 2, tmp_path, DEADLINE_S, str(out), 3, [str(tmp_path)] * 2, True)
    logs = "\n".join(f"--- rank {i} (exit {r.exitcode}):\n{r.log[-3000:]}" for i, r in enumerate(results))
    assert [r.exitcode for r in results] == [0, 0], logs
    assert [(tmp_path / f"start{rank}.txt").read_text() for rank in range(2)] == ["2", "2"], logs


def test_a_rank_that_cannot_see_rank0s_checkpoint_stops_every_rank_naming_it(trained, tmp_path):
    # output_dir is relative: rank 1 runs in another directory, where "run" has no checkpoints
    workdirs = [tmp_path / "node0", tmp_path / "node1"]
    shutil.copytree(trained, workdirs[0] / "run", symlinks=True)
    workdirs[1].mkdir()
    results = run_ranks(_train, 2, tmp_path, DEADLINE_S, "run", 3, [str(w) for w in workdirs], False)
    logs = "\n".join(f"--- rank {i} (exit {r.exitcode}):\n{r.log[-3000:]}" for i, r in enumerate(results))
    assert [r.exitcode for r in results] == [1, 1], logs
    for r in results:
        assert "ValueError: rank 1 cannot see 'run/checkpoints/step2.ckpt', the checkpoint rank 0 resumes" in r.log, logs
    assert not (workdirs[1] / "run" / "checkpoints").exists()


def test_a_rank_started_with_another_recipe_stops_every_rank_naming_it(tmp_path):
    """Rank 1 gets another learning rate (a typo in one node's launch line): both ranks stop before training, with
    one line naming rank 1, instead of training two different models in lockstep."""
    results = run_ranks(_train, 2, tmp_path, DEADLINE_S, str(tmp_path / "run"), 2, [str(tmp_path)] * 2, False,
                        ("optim.lr=0.002",))
    logs = "\n".join(f"--- rank {i} (exit {r.exitcode}):\n{r.log[-3000:]}" for i, r in enumerate(results))
    assert [r.exitcode for r in results] == [1, 1], logs
    for r in results:
        assert "ValueError: rank 1 runs another recipe than rank 0" in r.log, logs
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
