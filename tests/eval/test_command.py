"""``sla-dist eval`` end to end: a ZeRO checkpoint of the tiny recipe (trained for real, 2 steps, SLA on) beside a
dense export, with a reference directory and a tiny CLIP; and the errors a user meets first."""

import json
import subprocess
import sys

import pytest
import torch

from sla_dist.cli import main
from sla_dist.eval.videos import has_mp4_writer, write_tensor_video
from sla_dist.lightning.recipe import load_recipe
from sla_dist.models import VideoDiT
from tests.eval.helpers import TINY_RECIPE, save_dit, tiny_clip_dir

FAST = ["--num-videos", "3", "--batch-size", "2", "--reference-videos", "4", "--val-samples", "3", "--steps", "2",
        "--sparsities", "0.5", "0.75"]


@pytest.fixture(scope="module")
def zero_checkpoint(tmp_path_factory):
    """The tiny recipe trained for 2 steps by ``sla-dist train`` (SLAStrategy, ZeRO-2 directory checkpoint)."""
    run = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, "-m", "sla_dist.cli", "train", str(TINY_RECIPE), f"output_dir={run}",
           "trainer.max_steps=2", "trainer.checkpoint_every=2", "trainer.progress_bar=false", "sample.enabled=false",
           "sparsity.dense_steps=0", "sparsity.anneal_steps=0", "sparsity.error_every=0"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()
    return ckpt


def test_eval_two_checkpoints_side_by_side(zero_checkpoint, tmp_path):
    recipe = load_recipe(TINY_RECIPE)
    dense = save_dit(VideoDiT(recipe.dit), tmp_path / "dense.safetensors")
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(3):
        write_tensor_video(torch.rand(3, 4, 16, 16), reference / f"{i}.safetensors")
    clip = tiny_clip_dir(tmp_path)
    out = tmp_path / "eval"
    code = main(["eval", str(zero_checkpoint), str(dense), "--recipe", str(TINY_RECIPE), "--names", "sla", "dense",
                 "--out", str(out), "--reference", str(reference), "--clip", str(clip), "--solver", "heun", *FAST])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    runs = report["checkpoints"]
    assert list(runs) == ["sla", "dense"]
    assert runs["sla"]["sla_layers"] == [0, 1] and runs["dense"]["sla_layers"] == []
    for run in runs.values():
        assert run["val_loss"] > 0 and run["fvd"] > 0 and run["clip_score"] > 0
        assert [len(e["error"]) for e in run["fidelity"]["layers"]] == [2, 2]
        assert sum(name.endswith(".safetensors") for name in run["videos"]) == 3
        assert sum(name.endswith(".mp4") for name in run["videos"]) == (3 if has_mp4_writer() else 0)
        assert (out / run["grid"]).is_file()
    assert runs["sla"]["fvd"] != runs["dense"]["fvd"]
    markdown = (out / "report.md").read_text()
    assert "| sla | SLA in layers [0, 1] |" in markdown and "| dense | dense |" in markdown
    assert report["fidelity_plot"] is None or (out / "fidelity.png").is_file()


def test_eval_errors_exit_2_with_the_message(tmp_path, capsys):
    def error(*args: str) -> str:
        capsys.readouterr()
        assert main(["eval", *args, "--out", str(tmp_path / "out"), *FAST]) == 2
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and captured.err.startswith("sla-dist eval: error: ")
        return captured.err

    assert "missing.safetensors" in error(str(tmp_path / "missing.safetensors"), "--recipe", str(TINY_RECIPE))
    assert "nope.yaml" in error(str(tmp_path / "missing.safetensors"), "--recipe", str(tmp_path / "nope.yaml"))
    (tmp_path / "empty").mkdir()
    assert "is empty" in error(str(tmp_path / "empty"), "--recipe", str(TINY_RECIPE))
    dense = save_dit(VideoDiT(load_recipe(TINY_RECIPE).dit), tmp_path / "dense.safetensors")
    assert "holds no .mp4 or .safetensors" in error(str(dense), "--recipe", str(TINY_RECIPE), "--reference",
                                                    str(tmp_path / "empty"))
    assert "2 recipes for 1 checkpoints" in error(str(dense), "--recipe", str(TINY_RECIPE), str(TINY_RECIPE))
