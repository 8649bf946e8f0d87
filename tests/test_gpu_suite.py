"""benchmarks/gpu_suite.sh: the script parses, its header documents every part, and the 4-GPU parts' command lines
are valid for the scripts they run (checked on the CPU up to where a GPU is needed); the attention sweep's parts
cover the grid and fit their limits by the sweep's cost model."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
FOUR_GPU_PARTS = ("ranks4", "ulysses4", "wan14b-sp4", "zero3-sp2dp2")


def _parts(out: str = "/tmp/OUT") -> dict[str, list[str]]:
    """The CMD table as bash builds it (with $OUT set to ``out``): part -> its command's words."""
    table = re.search(r"^declare -A CMD=\(.*?^\)$", SUITE.read_text(), re.S | re.M).group(0)
    script = (f'OUT={out}; STEM={out}/2026-12-01-h200x4; workers=1; MODEL_QK="--grid 1,2,2"\n{table}\n'
              'for k in "${!CMD[@]}"; do printf "%s\\t%s\\n" "$k" "${CMD[$k]}"; done')
    lines = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    return {k: v.split() for k, v in (line.split("\t", 1) for line in lines)}


def _header() -> str:
    return "\n".join(line[1:] for line in SUITE.read_text().splitlines() if line.startswith("#"))


def test_suite_parses():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_every_part_is_documented_in_the_header():
    header, parts = _header(), _parts()
    assert set(FOUR_GPU_PARTS) <= set(parts)
    undocumented = [p for p in parts if not re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", header)
                    and not (p.startswith("inmodel-") and re.search(rf"-{p.split('-', 1)[1]}\s+\(", header))]
    assert undocumented == []
    for part in FOUR_GPU_PARTS:  # with the limit it is sized for
        assert re.search(rf"{re.escape(part)}:\d+", header), part


def _args_after(words: list[str], script: str) -> list[str]:
    return words[words.index(script) + 1:]


def test_e2e_parts_select_the_four_gpu_presets():
    import e2e_train

    parts = _parts()
    for part, preset in (("wan14b-sp4", "wan14b-sp4"), ("zero3-sp2dp2", "wan14b-sp2dp2")):
        args, chosen = e2e_train.parse(_args_after(parts[part], "benchmarks/e2e_train.py"))
        assert chosen == e2e_train.PRESETS[preset] and args.out.startswith("/tmp/OUT/")
        assert max(sp * chosen.dp for sp in chosen.sizes) == 4
        # the part's limit in the header leaves the phases room to end on their own
        limit = int(re.search(rf"{part}:(\d+)", _header()).group(1))
        assert sum(chosen.limits.values()) + 40 <= limit <= 540  # a 600 s call, the wheel install first


def test_ulysses4_is_valid_up_to_the_gpu_check():
    """The part's options pass BenchConfig's validation; on a CPU machine it then stops for want of 4 GPUs."""
    import bench_sequence_parallel as bsp

    words = _parts()["ulysses4"]
    args = _args_after(words, "benchmarks/bench_sequence_parallel.py")
    assert ["--sizes", "1", "2", "4"] == args[:4] and "--overlap-chunks" in args and "ulysses" in args
    with pytest.raises(ValueError, match=r"sizes=\[1, 2, 4\] need 4 GPUs; 0 visible"):
        bsp.main(args)


def test_ranks4_repeats_exactly_the_four_rank_tests():
    """Its pytest selection collects the tests parametrized with device_params(4) (on CPU their CUDA params are
    collected and skipped at run time), and its repeat options parse."""
    words = _parts()["ranks4"]
    pytest_args = _args_after(words, "pytest")
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *pytest_args], cwd=ROOT,
                               capture_output=True, text=True).stdout
    ids = sorted(line for line in collected.splitlines() if "::" in line)
    sources = (ROOT / "tests" / "parallel").glob("test_*.py")
    four = sum(path.read_text().count("device_params(4)") for path in sources)
    assert len(ids) == four == 4 and all(i.endswith("[cuda]") and "four_ranks" in i for i in ids)
    options = _args_after(words, "benchmarks/repeat_runs.py")
    assert options[options.index("--repeats") + 1] == "10" and options[options.index("--require-passed") + 1] == "4"
    assert shlex.join(words).count(" -- ") == 1


def test_results_are_named_where_the_scaling_report_looks():
    """The parts scaling_four_gpu.py checks write <date>-<card>x<GPUs>-<part>.json: found there once copied."""
    import scaling_four_gpu

    parts = _parts()
    for part in scaling_four_gpu.PARTS:
        out = parts[part][parts[part].index("--out") + 1]
        assert out == f"/tmp/OUT/2026-12-01-h200x4-{part}"
    stem = re.search(r"^STEM=(.*)$", SUITE.read_text(), re.M).group(1)
    assert stem == "$OUT/$(date -u +%F)-${card:-cpu}x$gpus"


# --- issue #11's attention sweep (attention_sweep.py) ---------------------------------------------------------

SWEEP_PARTS = ("attn-sweep-a", "attn-sweep-b", "attn-sweep-c", "attn-sweep-d")
GRAPH_PARTS = ("attn-graphs-a", "attn-graphs-b", "attn-graphs-c", "attn-graphs-d")


def _sweep_args(part: str) -> list[str]:
    """The attn-sweep part's bench_attention.py arguments."""
    words = _parts()[part]
    return words[words.index("benchmarks/bench_attention.py") + 1:]


def _option(args: list[str], name: str) -> list[str]:
    i = args.index(name) + 1
    out = []
    while i < len(args) and not args[i].startswith("--"):
        out.append(args[i])
        i += 1
    return out


@pytest.mark.parametrize("parts, graphs", [(SWEEP_PARTS, False), (GRAPH_PARTS, True)])
def test_sweep_parts_cover_the_grid_once_and_fit_their_limits(parts, graphs):
    import attention_sweep as sweep

    seen = []
    for part in parts:
        words, args = _parts()[part], _sweep_args(part)
        assert "SLA_DIST_AUTOTUNE=0" in words and "--sweep" in args and "--profile-glue" in args
        assert ("--graphs" in args) == graphs
        assert _option(args, "--json") == [f"/tmp/OUT/{part.replace('-', '_')}.json"]
        cells = sweep.sweep_cells(_option(args, "--cells"))
        seen += cells
        estimate = sweep.PROCESS_START_S + sum(s for _, s in sweep.CostModel(graphs=graphs).plan(cells))
        budget = float(_option(args, "--budget")[0])
        limit = int(re.search(rf"{part}:(\d+)", _header()).group(1))
        # the estimate leaves the budget a margin for the assumed compile times; the limit a last cell's overrun
        assert estimate <= 0.9 * budget and budget + 45 <= limit <= 570, (part, estimate, budget, limit)
        assert f"{estimate:.0f} s" in _header()  # the header states today's estimate
    assert sorted(seen) == sweep.sweep_cells()


def test_the_parts_fit_autotuned_too():
    """SWEEP_AUTOTUNE=1 runs the same parts: each tunes its one head dim within the same budget."""
    import attention_sweep as sweep

    for part in SWEEP_PARTS:
        args = _sweep_args(part)
        plan = sweep.CostModel(autotune=True).plan(sweep.sweep_cells(_option(args, "--cells")))
        estimate = sweep.PROCESS_START_S + sum(s for _, s in plan)
        assert estimate <= 0.9 * float(_option(args, "--budget")[0]), (part, estimate)
        assert len({c.D for c, _ in plan}) == 1, part
