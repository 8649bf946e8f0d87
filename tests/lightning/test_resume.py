"""Resuming a run from its checkpoints, in process on CPU (one rank, SLAStrategy on gloo; seconds per fit): planted
pickles never run, a kill during checkpoint rotation never restarts from scratch, the last step is saved under its
own name, and a resumed run follows the uninterrupted one's losses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sla_dist.lightning import run
from sla_dist.lightning.recipe import load_recipe

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"
FAST = ["trainer.progress_bar=false", "sample.enabled=false", "data.batch_size=2", "trainer.log_every_n_steps=1",
        "sparsity.dense_steps=1", "sparsity.anneal_steps=2", "sparsity.error_every=0", "optim.warmup_steps=1"]


def recipe(out: Path, steps: int, every: int, *extra: str):
    return load_recipe(RECIPE, [f"output_dir={out}", *FAST, f"trainer.max_steps={steps}",
                                f"trainer.checkpoint_every={every}", *extra])


MARKER = Path("/nonexistent")


def _write_marker(path: str) -> None:
    Path(path).write_text("the checkpoint ran code")


class Payload:
    """Unpickling this calls ``_write_marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 4 steps with a checkpoint every 2 (ZeRO-2, one rank)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run.train(recipe(out, 4, 2))
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out, symlinks=True)
    return out


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
