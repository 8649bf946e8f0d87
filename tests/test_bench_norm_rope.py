"""bench_norm_rope.py's CPU smoke run: every method times, and the results files say which shape and command."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_every_method(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the script chooses: the card where there is one, else the interpreter
    out = tmp_path / "nr"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_norm_rope.py"), "--tiny", "--out", str(out),
                          "--backward-launch", "2x1x4"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in payload["results"]] == [
        "PyTorch reference, eager", "fused Triton (backward 1 rows x 32/SM x 4 warps)",
        "fused Triton (backward 2 rows x 1/SM x 4 warps)"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in payload["results"])
    assert "--tiny" in payload["meta"]["command"] and "fused Triton" in out.with_suffix(".md").read_text()
