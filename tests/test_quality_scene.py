"""The quality study's synthetic scene (StudyConfig.scene, --scene): validated, recorded by a pretrained checkpoint
and in the results, and the checkpoint's scene used by every later phase and analysis tool (another one refused)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import attention_mass  # noqa: E402
import conversion_loss  # noqa: E402
import quality_study as qs  # noqa: E402
import study_checkpoint as sc  # noqa: E402
from study_config import StudyConfig, checkpoint_scene, saved_config  # noqa: E402

MISMATCH = "--scene plain: the checkpoint was pretrained on scene 'textured'"


@pytest.fixture(autouse=True)
def _fixed_kernel_settings(monkeypatch):
    monkeypatch.setenv("SLA_DIST_AUTOTUNE", "0")


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("textured")
    assert qs.main(["--preset", "tiny", "--cpu", "--phase", "pretrain", "--pretrain-steps", "1", "--scene",
                    "textured", "--out", str(out)]) == 0
    return out


def test_scene_is_validated():
    with pytest.raises(ValueError, match=r"scene='foggy' is not one of \('plain', 'textured'\)"):
        StudyConfig(scene="foggy")
    assert qs.PRESETS["gpu"].scene == qs.PRESETS["cpu"].scene == qs.PRESETS["tiny"].scene == "plain"


def test_pretrain_records_the_scene(textured):
    assert sc.load_meta(textured)["config"]["scene"] == "textured"
    assert json.loads((textured / "quality-study.json").read_text())["config"]["scene"] == "textured"
    assert "synthetic text-to-video set, textured scene" in (textured / "quality-study.md").read_text()


def test_later_phases_use_the_checkpoints_scene(textured, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        qs.main(["--preset", "tiny", "--cpu", "--phase", "finetune", "--resume-from", str(textured), "--scene",
                 "plain"])
    assert exc.value.code == 2 and MISMATCH in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"scene: checkpoint 'textured', this run 'plain'"):
        qs.run(qs.PRESETS["tiny"], torch.device("cpu"), tmp_path / "run", phase="pretrain", resume_from=textured)
    # left out, --scene is the checkpoint's
    assert qs.main(["--preset", "tiny", "--cpu", "--phase", "finetune", "--resume-from", str(textured),
                    "--finetune-steps", "1", "--dense-seeds", "0", "--baselines", "--out", str(tmp_path / "ft")]) == 0
    assert json.loads((tmp_path / "ft" / "quality-study.json").read_text())["config"]["scene"] == "textured"


def test_analysis_tools_use_the_checkpoints_scene(textured, tmp_path):
    for tool in (attention_mass, conversion_loss):
        with pytest.raises(ValueError, match=MISMATCH):
            tool.main(["--resume-from", str(textured), "--scene", "plain"])
    out = tmp_path / "mass.json"
    attention_mass.main(["--resume-from", str(textured), "--topk", "0.25", "--json", str(out)])
    assert json.loads(out.read_text())["scene"] == "textured"


def test_a_checkpoint_from_before_scenes_is_plain():
    meta = {"config": {k: v for k, v in dataclasses.asdict(qs.PRESETS["tiny"]).items() if k != "scene"}}
    assert saved_config(meta)["scene"] == "plain" and checkpoint_scene(meta, None) == "plain"
    with pytest.raises(ValueError, match="--scene textured: the checkpoint was pretrained on scene 'plain'"):
        checkpoint_scene(meta, "textured")
