"""Run one command (a pytest selection) several times, each repeat under a time limit, and count passes, failures
and hangs: for tests whose failure mode is a collective that never returns.

    python benchmarks/repeat_runs.py --repeats 10 --timeout 180 --budget 540 --require-passed 4 --out $OUT/ranks4 \
        -- python3 -m pytest -q -p no:cacheprovider -m gpu -k four_ranks tests/parallel

Each repeat runs in its own process group with its output in ``<out>-logs/repeat<i>.log``. Outcomes:

    pass     exit code 0 and, with --require-passed N, pytest's summary line reports at least N passed (so a run
             whose tests were all skipped, e.g. on too few GPUs, is not a pass)
    hang     killed at --timeout with its whole process group, or ended by a collective's watchdog (NCCL's
             "Watchdog caught collective operation timeout", a process group's "timed out"), which is how a hang
             ends when the collective timeout is shorter than --timeout
    fail     anything else (the log's last lines are printed)
    cut      killed at the --budget, which was shorter than --timeout for it: neither a pass nor a hang

A repeat starts only if the budget left is at least the longest repeat so far (and --min-seconds), so the part stops
cleanly before its suite limit; the repeats not run are counted as such. --jobs N runs N repeats at a time (the
GPUs of a multi-rank test are mostly idle while its processes start). Writes <out>.json and <out>.md and prints the
summary; exits 0 only when every one of --repeats ran and passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from e2e_train import TIMED_OUT, _card, run_limited  # this script's folder is on sys.path when it runs
from results_io import save_results

WATCHDOG = re.compile(r"Watchdog caught collective operation timeout|collective operation timeout|"
                      r"ProcessGroup\w* .*timed out|DistBackendError.*[Tt]imed? ?out")
PASSED = re.compile(r"(\d+) passed")


@dataclass
class Repeat:
    index: int
    outcome: str
    rc: int
    seconds: float
    limit: float
    summary: str = ""
    """pytest's last summary line (``4 passed in 61.2s``), if any."""


def classify(rc: int, log_text: str, limit: float, timeout: float, require_passed: int) -> tuple[str, str]:
    """(outcome, pytest summary line) of one finished repeat (module docstring)."""
    lines = [line for line in log_text.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", line)]
    summary = lines[-1].strip("= ").strip() if lines else ""
    if rc == TIMED_OUT:
        return ("hang" if limit >= timeout else "cut"), summary
    if rc != 0:
        return ("hang" if WATCHDOG.search(log_text) else "fail"), summary
    passed = PASSED.search(summary)
    if require_passed and (passed is None or int(passed.group(1)) < require_passed):
        return "fail", summary
    return "pass", summary


def run_repeats(cmd: list[str], repeats: int, timeout: float, budget: float, require_passed: int, logs: Path,
                jobs: int = 1, min_seconds: float = 0.0, env: dict | None = None) -> list[Repeat]:
    """Run ``cmd`` up to ``repeats`` times, ``jobs`` at a time, within ``budget`` seconds (module docstring)."""
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    longest = [min_seconds]

    def one(index: int) -> Repeat | None:
        left = budget - (time.perf_counter() - start)
        if left < max(longest):
            return None
        limit = min(timeout, left)
        log = logs / f"repeat{index}.log"
        rc, seconds = run_limited(cmd, log, limit, env or dict(os.environ))
        longest.append(seconds)
        outcome, summary = classify(rc, log.read_text(errors="replace"), limit, timeout, require_passed)
        repeat = Repeat(index, outcome, rc, seconds, limit, summary)
        print(f"[repeat {index}] {outcome} rc={rc} {seconds:.0f} s  {summary}", flush=True)
        if outcome != "pass":
            print("\n".join(log.read_text(errors="replace").splitlines()[-30:]), flush=True)
        return repeat

    with ThreadPoolExecutor(jobs) as pool:
        return [r for r in pool.map(one, range(1, repeats + 1)) if r is not None]


def summarize(done: list[Repeat], repeats: int) -> dict[str, int]:
    counts = {name: sum(r.outcome == name for r in done) for name in ("pass", "fail", "hang", "cut")}
    counts["not run"] = repeats - len(done)
    return counts


def table(done: list[Repeat], repeats: int) -> str:
    lines = ["| repeat | outcome | rc | seconds | limit s | pytest |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.index} | {r.outcome} | {r.rc} | {r.seconds:.0f} | {r.limit:.0f} | {r.summary} |" for r in done]
    counts = summarize(done, repeats)
    return "\n".join(lines + ["", f"{repeats} repeats: " + ", ".join(f"{v} {k}" for k, v in counts.items())])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--timeout", type=float, required=True, help="seconds one repeat may run: a hang's limit")
    parser.add_argument("--budget", type=float, required=True, help="seconds for all repeats together")
    parser.add_argument("--require-passed", type=int, default=0,
                        help="a pass needs pytest's summary to report at least this many passed tests")
    parser.add_argument("--jobs", type=int, default=1, help="repeats running at the same time")
    parser.add_argument("--min-seconds", type=float, default=0.0,
                        help="do not start a repeat with less budget left than this (before any repeat has ended)")
    parser.add_argument("--out", type=Path, required=True, help="results stem: <out>.json, <out>.md, <out>-logs/")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to repeat")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command to repeat: give it after --")
    for name in ("repeats", "timeout", "budget", "jobs"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}={getattr(args, name)} must be positive")
    done = run_repeats(cmd, args.repeats, args.timeout, args.budget, args.require_passed,
                       args.out.with_name(args.out.name + "-logs"), args.jobs, args.min_seconds)
    text = table(done, args.repeats)
    counts = summarize(done, args.repeats)
    meta = dict(cmd=cmd, repeats=args.repeats, timeout_s=args.timeout, budget_s=args.budget, jobs=args.jobs,
                require_passed=args.require_passed, counts=counts)
    save_results("repeat-runs", _card(cpu=False), meta, [dataclasses.asdict(r) for r in done], "Repeated runs",
                 f"`{' '.join(cmd)}`, {args.repeats} repeats, {args.jobs} at a time, each under {args.timeout:.0f} s, "
                 f"within {args.budget:.0f} s. hang: killed at its limit or ended by a collective's watchdog.",
                 text, out=args.out)
    print(text)
    # gpu_suite.sh's summary shows a part's last line with 'passed' / 'failed' in it
    print(f"repeat_runs: {counts['pass']} passed, {counts['fail']} failed, {counts['hang']} hung, {counts['cut']} cut, "
          f"{counts['not run']} not run of {args.repeats} repeats")
    return 0 if counts["pass"] == args.repeats else 1


if __name__ == "__main__":
    sys.exit(main())
