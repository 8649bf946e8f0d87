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


def _run_dir(root, name: str, *overrides: str):
    """A training run's layout without training: RUN/recipe.yaml as ``sla-dist train`` saves it and an exported
    checkpoint of that recipe's (SLA-converted) model under RUN/checkpoints/."""
    from sla_dist.lightning.recipe import recipe_to_yaml
    from sla_dist.models import PatchConfig, apply_sla

    run = root / name
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={run}", *overrides])
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    torch.manual_seed(0)
    model = VideoDiT(recipe.dit)
    if recipe.sparsity.enabled:
        apply_sla(model, PatchConfig(sla=recipe.sla))
    return save_dit(model, run / "checkpoints" / "last.safetensors")


def test_eval_uses_each_checkpoints_own_run_recipe(tmp_path, capsys):
    # the two runs differ in model depth and SLA settings: one shared recipe cannot load both
    deep = _run_dir(tmp_path, "deep", "sla.topk=0.5")
    shallow = _run_dir(tmp_path, "shallow", "model.num_layers=1", "sparsity.enabled=false")
    out = tmp_path / "eval"
    assert main(["eval", str(deep), str(shallow), "--names", "deep", "shallow", "--out", str(out), *FAST]) == 0
    runs = json.loads((out / "report.json").read_text())["checkpoints"]
    assert runs["deep"]["recipe"] == str(tmp_path / "deep" / "recipe.yaml")
    assert runs["shallow"]["recipe"] == str(tmp_path / "shallow" / "recipe.yaml")
    assert runs["deep"]["sla_layers"] == [0, 1] and runs["shallow"]["sla_layers"] == []
    assert [len(e["error"]) for e in runs["shallow"]["fidelity"]["layers"]] == [2]
    # 3 videos of 4 frames of 16 x 16 pixels, each frame upscaled to 128 x 128 so that the grid is viewable
    from PIL import Image

    width, height = Image.open(out / runs["deep"]["grid"]).size
    assert width >= 4 * 128 and height >= 3 * 128


def test_eval_recipe_is_the_fallback_for_checkpoints_without_a_saved_one(tmp_path, capsys):
    dense = save_dit(VideoDiT(load_recipe(TINY_RECIPE).dit), tmp_path / "dense.safetensors")
    assert main(["eval", str(dense), "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sla-dist eval: error: no recipe for") and "dense.safetensors" in err
    assert main(["eval", str(dense), "--recipe", str(TINY_RECIPE), "--out", str(tmp_path / "out"), *FAST]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["checkpoints"]["dense"]["recipe"] == str(TINY_RECIPE)


def test_rerun_into_the_same_out_lists_only_its_own_videos(tmp_path, capsys):
    dense = save_dit(VideoDiT(load_recipe(TINY_RECIPE).dit), tmp_path / "dense.safetensors")
    out = tmp_path / "eval"
    args = ["eval", str(dense), "--recipe", str(TINY_RECIPE), "--names", "d", "--out", str(out), *FAST]
    assert main(args) == 0
    assert main([*args, "--num-videos", "2"]) == 0
    videos = json.loads((out / "report.json").read_text())["checkpoints"]["d"]["videos"]
    assert [v for v in videos if v.endswith(".safetensors")] == ["video_000.safetensors", "video_001.safetensors"]
    assert sorted(p.name for p in (out / "d").glob("video_*")) == videos


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/b", "..", "."])
def test_names_must_be_plain_file_names(tmp_path, capsys, name):
    dense = save_dit(VideoDiT(load_recipe(TINY_RECIPE).dit), tmp_path / "dense.safetensors")
    out = tmp_path / "out" / "eval"
    assert main(["eval", str(dense), "--recipe", str(TINY_RECIPE), "--names", name, "--out", str(out), *FAST]) == 2
    assert f"name {name!r} is not a plain file name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors"]  # nothing written anywhere


def test_training_curves_come_from_each_runs_newest_csv_log(tmp_path):
    from sla_dist.eval.evaluate import training_curves

    def run(name: str, versions: dict[int, str]) -> str:
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "recipe.yaml").write_text("{}\n")
        for version, rows in versions.items():
            log = tmp_path / name / "logs" / "csv" / f"version_{version}"
            log.mkdir(parents=True)
            (log / "metrics.csv").write_text("step,train/loss,val/flow\n" + rows)
        return str(tmp_path / name / "checkpoints" / "last.ckpt")

    curves = training_curves({"a": run("a", {9: "0,9.0,\n", 10: "0,2.0,\n5,1.5,\n5,,1.7\n"}),
                              "b": run("b", {}), "c": str(tmp_path / "elsewhere.safetensors")})
    assert curves == {"a train/loss": [(0, 2.0), (5, 1.5)], "a val/flow": [(5, 1.7)]}  # version_10, not 9
