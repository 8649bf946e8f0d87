"""benchmarks/repeat_runs.py: repeats under a time limit, counted as passes, failures and hangs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import repeat_runs as rr  # noqa: E402


@pytest.mark.parametrize("rc, log, limit, outcome", [
    (0, "....\n4 passed in 61.20s\n", 180, "pass"),
    (0, "4 skipped in 1.0s\n", 180, "fail"),  # nothing ran: too few GPUs
    (0, "3 passed, 1 skipped in 50.0s\n", 180, "fail"),
    (1, "1 failed, 3 passed in 50.0s\n", 180, "fail"),
    (1, "[rank2]:[E] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLTOALL)\n", 180,
     "hang"),
    (rr.TIMED_OUT, "", 180, "hang"),
    (rr.TIMED_OUT, "", 40, "cut"),  # the budget, not the repeat's own limit, stopped it
])
def test_classify(rc, log, limit, outcome):
    assert rr.classify(rc, log, limit, 180, require_passed=4)[0] == outcome


def test_summary_line_is_pytests_last():
    assert rr.classify(0, "x\n===== 4 passed, 2 deselected in 9.1s =====\n", 9, 9, 4) == (
        "pass", "4 passed, 2 deselected in 9.1s")


def test_repeats_count_hangs_and_stop_within_the_budget(tmp_path):
    """A command that passes on odd repeats and hangs on even ones (a file counts the runs): each hang is killed at
    the 3 s limit and counted, and the repeats after it still run."""
    counter = tmp_path / "n"
    script = (f"import pathlib, time; p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 "
              f"if p.exists() else 1; p.write_text(str(n)); time.sleep(0 if n % 2 else 30); print('1 passed in 0s')")
    start = time.perf_counter()
    rc = rr.main(["--repeats", "4", "--timeout", "3", "--budget", "60", "--require-passed", "1",
                  "--out", str(tmp_path / "r"), "--", sys.executable, "-c", script])
    assert rc == 1 and time.perf_counter() - start < 45
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["outcome"] for r in data["results"]] == ["pass", "hang", "pass", "hang"]
    assert data["meta"]["counts"] == {"pass": 2, "fail": 0, "hang": 2, "cut": 0, "not run": 0}
    assert (tmp_path / "r-logs" / "repeat2.log").exists()
    assert "4 repeats: 2 pass, 0 fail, 2 hang, 0 cut, 0 not run" in (tmp_path / "r.md").read_text()


def test_budget_leaves_repeats_unrun(tmp_path):
    rc = rr.main(["--repeats", "5", "--timeout", "30", "--budget", "2", "--min-seconds", "1.5",
                  "--out", str(tmp_path / "r"), "--", sys.executable, "-c", "import time; time.sleep(1)"])
    counts = json.loads((tmp_path / "r.json").read_text())["meta"]["counts"]
    # the first repeat (1 s) leaves less than the longest repeat so far: no second one
    assert rc == 1 and counts["pass"] == 1 and counts["not run"] == 4


def test_all_passing_exits_0(tmp_path, capsys):
    assert rr.main(["--repeats", "2", "--timeout", "30", "--budget", "60", "--jobs", "2", "--out",
                    str(tmp_path / "r"), "--", sys.executable, "-c", "print('2 passed')"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "repeat_runs: 2 passed, 0 failed, 0 hung, 0 cut, 0 not run of 2 repeats"


@pytest.mark.parametrize("argv, message", [
    (["--timeout", "5", "--budget", "5", "--out", "x"], "no command to repeat"),
    (["--timeout", "0", "--budget", "5", "--out", "x", "--", "true"], "--timeout=0.0 must be positive"),
])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        rr.main(argv)
    assert message in capsys.readouterr().err
