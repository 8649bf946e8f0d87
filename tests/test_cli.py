"""Every ``sla-dist`` subcommand prints a user error as one line naming the bad value and exits with code 2: no
traceback. One case runs as a user runs it (a subprocess, so import-time output counts too); the rest in process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sla_dist.cli import main

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "tiny_cpu.yaml")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_train_bad_override_is_one_line_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sla_dist.cli", "train", RECIPE, "trainer.max_steps=abc"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("sla-dist train: error: ") and "'abc'" in proc.stderr, proc.stderr
    assert "trainer.max_steps" in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, words", [
    (["train", RECIPE, "trainer.max_step=5"], "trainer.max_step"),
    (["train", RECIPE, "optim.lr=-1"], "optim.lr=-1.0"),
    (["train", RECIPE, "model.compile_mode=reduce-overhead"], "model.compile_mode='reduce-overhead'"),
    (["train", "{tmp}/missing.yaml"], "missing.yaml"),
    (["export", "{tmp}/missing.ckpt", "{tmp}/x.safetensors"], "missing.ckpt"),
    (["eval", "{tmp}/missing.ckpt", "--recipe", RECIPE, "--out", "{tmp}/eval"], "missing.ckpt"),
    (["preprocess", "--videos", "v", "--captions", "c", "--out", "{tmp}/o", "--fps", "0"], "fps=0.0"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_user_errors_are_one_line_with_exit_code_2(args, words, tmp_path, capsys):
    rc = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"sla-dist {args[0]}: error: ") and words in err, err
