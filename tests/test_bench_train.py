"""benchmarks/bench_train.py --profile on CPU (gloo, tiny recipe): the per-rank step breakdowns it writes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_profile_refuses_steps_that_leave_no_timed_step(tmp_path):
    done = _run("--cpu", "--profile", "--steps", "4", "--warmup", "2", "--profile-steps", "2", "--out",
                str(tmp_path / "b.json"), timeout=60)
    assert done.returncode == 2 and "--profile-steps 2 with --steps 4 --warmup 2" in done.stderr


@pytest.mark.slow
def test_cpu_profile_writes_each_ranks_breakdown(tmp_path):
    """SP = 2 for 4 steps, steps 1 and 2 profiled: two training processes, ~25 s on two idle cores."""
    out = tmp_path / "bench.json"
    done = _run("--sizes", "2", "--cpu", "--recipe", "recipes/tiny_cpu.yaml", "--steps", "4", "--warmup", "1",
                "--profile", "--profile-steps", "2", "--out", str(out), "data.num_workers=0", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    assert result["timed_steps"] == 1 and (result["compiled"], result["eager_timed_steps"]) == (False, 0)
    assert result["step_s"] > 0 and [Path(p).name for p in result["profile"]] == [
        "bench-profile-sp2-rank0.json", "bench-profile-sp2-rank1.json"]
    for rank, path in enumerate(result["profile"]):
        prof = json.loads(Path(path).read_text())
        assert prof["rank"] == rank and prof["profiled_steps"] == [1, 2] and len(prof["steps"]) == 2
        mean = prof["mean"]
        assert mean["source"] == "cpu ops" and mean["wall"] > 0
        assert mean["wall"] == pytest.approx(mean["compute"] + mean["exposed_comm"] + mean["idle"])
        cats = mean["categories"]
        assert cats["gemm"]["busy"] > 0 and cats["all_to_all"]["busy"] > 0  # the Ulysses exchange at SP = 2
        ranges = mean["ranges"]
        for name in ("[Strategy]SLAStrategy.training_step", "[DeepSpeedEngine]backward", "[DeepSpeedEngine]step"):
            assert 0 < ranges[name] < mean["wall"], name
        assert f"SP = 2, rank {rank}: steps [1, 2]" in done.stdout  # the tables are printed
    with gzip.open(tmp_path / "bench-profile-sp2-trace-rank0.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]
    assert not (tmp_path / "bench-profile-sp2-trace-rank1.json.gz").exists()
