"""Outputs users share get the ordinary file mode, and run outputs stay out of git."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sla_dist.files import save_safetensors

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_safetensors_get_the_default_mode(tmp_path, umask_022):
    path = save_safetensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"k": "v"})
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_exported_checkpoint_gets_the_default_mode(tmp_path, umask_022):
    from sla_dist.lightning.checkpoint import export_safetensors

    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}}, ckpt)
    out = export_safetensors(ckpt, tmp_path / "model.safetensors")
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)


def test_no_module_writes_safetensors_around_save_safetensors():
    direct = [str(p.relative_to(ROOT)) for p in (ROOT / "sla_dist").rglob("*.py")
              if p.name != "files.py" and re.search(r"\bsave_file\(", p.read_text())]
    assert direct == []


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_run_outputs_are_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", "runs/tiny_cpu/checkpoints/last.ckpt"], cwd=ROOT)
    assert result.returncode == 0
