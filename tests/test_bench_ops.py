"""CPU smoke runs of the per-op benchmarks (bench_norm_rope.py, bench_cross_attention.py): every row times, and the
results files say which shape and command."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the script chooses: the card where there is one, else the CPU
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert "--tiny" in payload["meta"]["command"]
    return payload


def test_norm_rope_tiny_run_writes_every_method(tmp_path):
    out = tmp_path / "nr"
    payload = _run("bench_norm_rope.py", out, "--backward-launch", "2x1x4")
    assert [r["method"] for r in payload["results"]] == [
        "PyTorch reference, eager", "fused Triton (backward 1 rows x 32/SM x 4 warps)",
        "fused Triton (backward 2 rows x 1/SM x 4 warps)"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in payload["results"])
    assert "fused Triton" in out.with_suffix(".md").read_text()


def test_cross_attention_tiny_run_skips_chunks_that_do_not_divide(tmp_path):
    out = tmp_path / "xa"
    payload = _run("bench_cross_attention.py", out, "--chunks", "1", "5", "6")
    # --tiny: 48 queries, so 5 chunks do not divide and are left out.
    assert [(r["backend"], r["chunks"]) for r in payload["results"]] == [("math", 1), ("math", 6)]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in payload["results"])
    assert payload["meta"]["q_len"] == 48 and "| math | 6 |" in out.with_suffix(".md").read_text()
