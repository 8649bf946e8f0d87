"""CPU smoke runs of the per-op benchmarks (bench_norm_rope.py, bench_cross_attention.py, bench_block_sums.py): every
row times, and the results files say which shape and command; host_overhead.py's comparison of two trees."""

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


def _host_overhead(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--L", "128", "--H", "1",
                           "--D", "32", "--n", "1", "--repeats", "1", *args],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)


def test_host_overhead_compares_two_trees_in_alternating_processes(tmp_path):
    """--against runs the layer rows in one process per tree and round, each importing its own sla_dist (here this
    tree against itself), and refuses a path whose sla_dist it did not import."""
    run = _host_overhead("--against", str(ROOT), "--rounds", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.strip().startswith("0 ")] == ["against", "this"]
    assert any(line.strip().startswith("layer forward+backward: against") for line in lines)
    missing = _host_overhead("--against", str(tmp_path), "--rounds", "1")
    assert missing.returncode != 0 and "not the sla_dist under" in missing.stderr


def test_block_sums_tiny_run_checks_and_times_every_warp_count(tmp_path):
    out = tmp_path / "block_sums.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_block_sums.py"), "--L", "300", "--H", "2",
                          "--D", "48", "--warps", "1", "2", "--json", str(out)],
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["tensor"], r["block"], r["warps"]) for r in rows] == [("q", 128, 1), ("q", 128, 2), ("k", 64, 1),
                                                                     ("k", 64, 2)]
    assert all(r["us"] > 0 for r in rows)
