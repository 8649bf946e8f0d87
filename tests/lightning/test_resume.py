"""Resuming a run from its checkpoints, in process on CPU (one rank, SLAStrategy on gloo; seconds per fit): planted
pickles never run, a kill during checkpoint rotation never restarts from scratch, the last step is saved under its
own name, and a resumed run follows the uninterrupted one's losses."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from sla_dist.lightning import rotation, run
from sla_dist.lightning.checkpoint import safe_torch_load
from sla_dist.lightning.recipe import load_recipe
from tests.lightning.runs import in_process_runs, logged_losses

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"
FAST = ["trainer.progress_bar=false", "sample.enabled=false", "data.batch_size=2", "trainer.log_every_n_steps=1",
        "sparsity.dense_steps=1", "sparsity.anneal_steps=2", "sparsity.error_every=0", "optim.warmup_steps=1"]


def recipe(out: Path, steps: int, every: int, *extra: str):
    return load_recipe(RECIPE, [f"output_dir={out}", *FAST, f"trainer.max_steps={steps}",
                                f"trainer.checkpoint_every={every}", *extra])


def _write_marker(path: str) -> None:
    Path(path).write_text("the checkpoint ran code")


class Payload:
    """Unpickling this calls ``_write_marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    with in_process_runs():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 4 steps with a checkpoint every 2 (ZeRO-2, one rank)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run.train(recipe(out, 4, 2))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted run of 7 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run.train(recipe(out, 7, 2))
    losses = logged_losses(out)
    assert sorted(losses) == list(range(7)) and losses[6] < losses[0]
    return losses


def checkpoints(out: Path) -> dict[str, int]:
    """name -> the global step stored inside, for each checkpoint of a run, and the target of last.ckpt."""
    found = {p.name: safe_torch_load(next(p.glob("checkpoint/mp_rank_00_model_states.pt")))["global_step"]
             for p in (out / "checkpoints").glob("step*.ckpt")}
    return {**found, "last": os.readlink(out / "checkpoints" / "last.ckpt")}


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out, symlinks=True)
    return out


def csv_versions(out: Path) -> list[str]:
    """A resumed run continues its CSV log version; a run started afresh adds one."""
    return sorted(p.name for p in (out / "logs" / "csv").iterdir())


def test_planted_pickle_in_model_states_never_runs_on_resume(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    states = next((out / "checkpoints").glob("step*.ckpt/checkpoint/mp_rank_00_model_states.pt"))
    marker = tmp_path / "marker"
    state = torch.load(states, weights_only=False)  # the test's own file
    state["payload"] = Payload(marker)
    torch.save(state, states)
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt.*_write_marker.*could run code"):
        run.train(recipe(out, 6, 2))
    assert not marker.exists()


def test_last_step_is_saved_under_its_own_name_and_resume_follows_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    run.train(recipe(out, 5, 2))  # 5 is not a multiple of the interval: the last step is saved anyway
    assert checkpoints(out) == {"step5.ckpt": 5, "last": "step5.ckpt"}
    run.train(recipe(out, 7, 2))
    assert checkpoints(out) == {"step7.ckpt": 7, "last": "step7.ckpt"}
    losses = logged_losses(out)  # steps 5 and 6 from the resumed run
    assert sorted(losses) == list(range(7)) and csv_versions(out) == ["version_0"]
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), f"step {step}"


class Killed(BaseException):
    """Stands for SIGKILL at a chosen point of a save (nothing after it runs)."""


def test_kill_between_commit_and_relink_resumes_from_the_newest(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = rotation.link_last, []

    def killed_on_second_link(checkpoint):
        calls.append(checkpoint.name)
        if len(calls) == 2:
            raise Killed
        real(checkpoint)

    monkeypatch.setattr(rotation, "link_last", killed_on_second_link)
    with pytest.raises(Killed):
        run.train(recipe(out, 7, 2))
    monkeypatch.undo()
    # step4 is complete; last.ckpt still names step2, which is not deleted yet
    assert checkpoints(out) == {"step2.ckpt": 2, "step4.ckpt": 4, "last": "step2.ckpt"}
    run.train(recipe(out, 7, 2))
    assert checkpoints(out) == {"step7.ckpt": 7, "last": "step7.ckpt"}
    # steps 4 to 6 from the resumed run (step 3's loss is logged after the callbacks that the kill interrupted)
    losses = logged_losses(out)
    assert {0, 1, 2, 4, 5, 6} <= set(losses) and csv_versions(out) == ["version_0"]
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), f"step {step}"


def test_dangling_last_link_resumes_from_the_newest_complete_checkpoint(trained, tmp_path):
    # what a kill inside Lightning's rotation left: the old checkpoint deleted, last.ckpt not relinked yet
    out = copy_run(trained, tmp_path)
    last = out / "checkpoints" / "last.ckpt"
    last.unlink()
    last.symlink_to("step2.ckpt")
    assert not last.exists()
    trainer = run.train(recipe(out, 6, 2))
    assert trainer.global_step == 6 and csv_versions(out) == ["version_0"]  # resumed, not started afresh


def test_partial_save_is_not_resumed_from_and_is_removed(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    partial = out / "checkpoints" / "step6.ckpt.partial"
    shutil.copytree(out / "checkpoints" / "step4.ckpt", partial)
    trainer = run.train(recipe(out, 6, 2))
    assert trainer.global_step == 6 and csv_versions(out) == ["version_0"]  # resumed, not started afresh
    assert not partial.exists() and checkpoints(out) == {"step6.ckpt": 6, "last": "step6.ckpt"}


def test_incomplete_checkpoints_are_refused_by_name(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    (out / "checkpoints" / "step4.ckpt" / "latest").unlink()  # a save killed under an older version
    with pytest.raises(ValueError, match=r"no complete checkpoint.*step4\.ckpt"):
        run.train(recipe(out, 6, 2))
    assert csv_versions(out) == ["version_0"]  # nothing ran


@pytest.mark.parametrize("override, words", [
    ("model.name=small", r"model's parameters differ \(model.name 'tiny' -> 'small': dim 64 -> "),
    ("model.num_layers=3", "num_layers 2 -> 3"),
    ("sparsity.skip_first=1", "sparsity.skip_first 0 -> 1"),
    ("seed=1", "seed 0 -> 1"),
    ("parallel.zero_stage=3", "parallel.zero_stage 2 -> 3"),
])
def test_incompatible_changes_are_refused_before_anything_is_written(trained, tmp_path, override, words):
    out = copy_run(trained, tmp_path)
    saved = (out / "recipe.yaml").read_text()
    with pytest.raises(ValueError, match=rf"cannot resume .*step4\.ckpt.*{words}"):
        run.train(recipe(out, 6, 2, override))
    assert (out / "recipe.yaml").read_text() == saved and csv_versions(out) == ["version_0"]


def test_world_size_change_is_refused_naming_both_sizes(trained, tmp_path):
    # the README's sequence-parallel command run after the first run: 2 processes against 1 process's ZeRO shards
    out = copy_run(trained, tmp_path)
    with pytest.raises(ValueError, match=r"step4\.ckpt' holds ZeRO shards of 1 process, this run has 2 "
                                         r"\(trainer.devices=2 x trainer.num_nodes=1\)"):
        run.train(recipe(out, 6, 2, "trainer.devices=2", "parallel.sp_size=2"))
    assert csv_versions(out) == ["version_0"]


def test_changed_settings_are_reported_and_recorded_only_with_a_checkpoint(trained, tmp_path, monkeypatch, caplog):
    out = copy_run(trained, tmp_path)
    saved = (out / "recipe.yaml").read_text()
    assert "topk: 0.25" in saved
    monkeypatch.setattr(rotation.StepCheckpoints, "save", lambda *args: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):  # crashes before its first checkpoint: the recipe of step4 stays
        run.train(recipe(out, 6, 2, "sla.topk=0.1"))
    assert (out / "recipe.yaml").read_text() == saved
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        run.train(recipe(out, 6, 2, "sla.topk=0.1"))
    assert "with changed settings: sla.topk: 0.25 -> 0.1, trainer.max_steps: 4 -> 6" in caplog.text
    assert "topk: 0.1" in (out / "recipe.yaml").read_text()


def test_no_resume_moves_the_earlier_run_aside(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    saved = (out / "recipe.yaml").read_text()
    trainer = run.train(recipe(out, 2, 2, "seed=1"), resume=False)
    assert trainer.global_step == 2 and checkpoints(out) == {"step2.ckpt": 2, "last": "step2.ckpt"}
    (aside,) = out.glob("checkpoints.before-*")
    assert (aside / "step4.ckpt" / "latest").is_file() and (aside / "recipe.yaml").read_text() == saved
    assert "seed: 1" in (out / "recipe.yaml").read_text()
