"""The grid of issue #11's attention sweep, which of its cells a run measures, what each costs, and its JSON file.

The CPU side of ``bench_attention.py --sweep`` (everything here runs without a GPU; tests/test_attention_sweep.py):

- the 32 cells: L 8192 / 16384 / 32768 / 75600, D 64 and 128 at the model width 1536 (H 24 at D 64, H 12 at D 128),
  sparsity 80 / 90 / 95 / 97 %; ``--cells L=8192,16384 D=64`` picks a part of it;
- an estimate of each cell's device seconds, so a gpu_suite part can be sized for one 10-minute device call and a
  run can stop before a cell that would not fit its ``--budget``;
- the JSON a sweep writes after every cell (a call cut at its time limit keeps what it measured), which a later run
  extends with ``--append`` (cells already measured are skipped, dense rows reused).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

SWEEP_LENGTHS = (8192, 16384, 32768, 75600)
SWEEP_DIMS = (64, 128)
SWEEP_SPARSITIES = (0.80, 0.90, 0.95, 0.97)
MODEL_WIDTH = 1536
"""H * D of every cell: the heads change with the head dim, the model width does not."""

DENSE = "dense SDPA cuDNN"
FLEX = "FlexAttention 128x128 (sparse only)"
SPARSE_ONLY = "SLA sparse branch only, BQ128"
FULL = "SLA full layer, BQ128"
COMPILED = "SLA full layer, BQ128, compiled"
"""FULL's module called through torch.compile(fullgraph=True), as a compiled DiT block runs it: without the eager
Python's host time, which bounds the eager layer at L 8192 and 16384."""
FLEX_GRAPH = "FlexAttention 128x128 (sparse only), CUDA graph"
FULL_GRAPH = "SLA full layer, BQ128, CUDA graph"
"""--graphs: FLEX's compiled function and FULL's module, each step (forward; forward+backward with the gradients)
captured once per cell in a CUDA graph whose replays the timer calls, as a DiT trained with CUDA graphs
(torch.compile mode="reduce-overhead", make_graphed_callables) runs them: no host time at all, which bounds both the
eager and the compiled layer at L 8192 and 16384."""
FULL_LAYERS = (FULL, COMPILED, FULL_GRAPH)
"""The full-layer rows the report judges against the targets, each on its own."""
PROFILED_LAYERS = (FULL, COMPILED)
"""The full-layer rows --profile-glue profiles: a graphed row replays the eager row's kernels."""
FLEX_OF = {FULL: FLEX, COMPILED: FLEX, FULL_GRAPH: FLEX_GRAPH}
"""The FlexAttention row each full-layer row is compared with: the graphed layer with the graphed FlexAttention."""
CELL_METHODS = (FLEX, SPARSE_ONLY, FULL, COMPILED)
"""Rows measured per cell; dense cuDNN does not depend on the sparsity and is measured once per (L, H, D)."""
GRAPH_METHODS = (FLEX_GRAPH, FULL_GRAPH)
"""Rows --graphs adds per cell."""
GRAPH_MEMORY_NOTE = "extra MiB not measured: a replay allocates nothing (the graph's pool holds the step's buffers)"
"""The note of every graphed row, the only note that is not an error: the eager row's extra MiB is the same step's."""


def cell_methods(graphs: bool) -> tuple[str, ...]:
    """The rows a sweep run measures per cell, with --graphs or without."""
    return CELL_METHODS + (GRAPH_METHODS if graphs else ())


@dataclass(frozen=True, order=True)
class Cell:
    L: int
    D: int
    sparsity: float

    @property
    def H(self) -> int:
        return MODEL_WIDTH // self.D

    @property
    def topk(self) -> float:
        return round(1.0 - self.sparsity, 6)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.L, self.H, self.D


def sweep_cells(specs: list[str] | None = None) -> list[Cell]:
    """The grid's cells that ``specs`` select (``L=8192,16384``, ``D=64``, ``sparsity=0.95`` or ``sparsity=95``;
    several keys intersect), ordered by L, D, sparsity: the cells of one shape run one after the other, so dense is
    measured and FlexAttention compiled once per shape."""
    axes = {"L": list(SWEEP_LENGTHS), "D": list(SWEEP_DIMS), "sparsity": list(SWEEP_SPARSITIES)}
    for spec in specs or []:
        key, sep, values = spec.partition("=")
        if not sep or key not in axes:
            raise ValueError(f"cell selection {spec!r} is not KEY=V1,V2 with KEY one of {sorted(axes)}")
        chosen = []
        for text in values.split(","):
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{key} value {text!r} in {spec!r} is not a number") from None
            if key == "sparsity" and value > 1:
                value /= 100
            match = [x for x in axes[key] if math.isclose(x, value, abs_tol=1e-9)]
            if not match:
                raise ValueError(f"{key}={text} is not in the sweep's {key} {axes[key]}")
            chosen += match
        axes[key] = [x for x in axes[key] if x in chosen]
    return [Cell(L, D, s) for L in axes["L"] for D in axes["D"] for s in axes["sparsity"]]


# --- cost model -------------------------------------------------------------------------------------------------
# Steady-state fwd+bwd ms at D 128, 95 % (dense: any sparsity), one H200, from benchmarks/results:
# dense cuDNN 2.68 / 10.56 / 41.77 / 227.73 ms at L 8192 / 16384 / 32768 / 75600 and FlexAttention 2.975 ms at 32768
# (2026-11-29-h200-attention-tuned.md); the SLA full layer 7.53 ms and its sparse branch 5.24 ms at 32768, 4.57 ms
# for the full layer at 8192 (fixed launch settings, 2026-11-29-h200-attention.md), 28.9 ms at 75600 (autotuned).
# Sparse rows scale with L^2 x density above a floor (the host-bound time of short sequences); dense with L^2
# (41.77 x (75600 / 32768)^2 = 222 ms against 227.7 measured). D 64 is not measured at these lengths: 1.25x assumed.
# The compiled layer runs the eager one's kernels (its 32K time) without the eager Python's host time, which is the
# eager floor: its floor is the CUDA time at L 8192, ~1.0 ms fwd+bwd (2026-11-30-h200-attention.md), 1.5 ms assumed.
# The graphed rows replay the same kernels with no host time: the layer's floor is its CUDA time at L 8192, 0.98 ms
# fwd+bwd captured (2026-11-30-h200-layer-host-time.md), FlexAttention's floor its own.
_AT_32K_MS = {DENSE: 41.8, FLEX: 2.98, SPARSE_ONLY: 5.3, FULL: 7.6, COMPILED: 7.6, FLEX_GRAPH: 2.98, FULL_GRAPH: 7.6}
_FLOOR_MS = {DENSE: 0.0, FLEX: 0.3, SPARSE_ONLY: 3.0, FULL: 4.6, COMPILED: 1.5, FLEX_GRAPH: 0.3, FULL_GRAPH: 1.0}
_D64_FACTOR = 1.25
_FWD_SHARE = 1 / 3  # forward / (forward + backward): 0.26 (dense, Flex), 0.25-0.35 (SLA) measured
# First-call seconds with fixed launch settings, from the first calls the 2026-11-30 sweep recorded (one fresh H200
# per half, 2026-11-30-h200-attention.json), rounded up: FlexAttention's forward and forward+backward graphs took
# 3.0-4.1 s per (L, H, D) (the block mask's shapes do not change with the sparsity, so the sparsities of a shape
# share the graphs); the SLA kernels' first fwd + fwd+bwd per head dim and branch set 0.5-4.1 s; a new length
# 0-1.2 s, and 2.0 / 6.2 s (full layer / sparse branch) at L 75600, which is no multiple of 64 (the kernels' EVEN_K
# variants). That run's plan had assumed 45 / 30 / 3 s and estimated 414 and 450 s for the halves; they took 59
# and 102 s.
FLEX_COMPILE_S = 6.0
SLA_COMPILE_S = 5.0
SLA_NEW_LENGTH_S = 4.0
# The compiled layer (COMPILED): Dynamo, AOTAutograd and Inductor make an inference graph (the no-grad forward) and
# a training graph (forward + backward) per cell, since the layer's topk and the static shape are constants of its
# graphs. NOT measured yet: assumed 10 s a graph, the low end of the 10-20 s a module of this size usually takes
# (FlexAttention's two graphs took 3-4 s together, above); a run scales its later estimates by the worst overrun
# (COMPILING_CELL_S), so slower compiles stop it at --budget in time, and --append continues.
COMPILED_GRAPH_S = 10.0
COMPILED_GRAPHS_PER_CELL = 2
# --graphs: each graphed row captures two CUDA graphs (forward, forward+backward), each after GRAPH_WARMUP_CALLS
# calls on a side stream; torch.cuda.graph also collects garbage and empties the allocator's cache before a capture.
# NOT measured: 0.5 s a capture assumed besides the warm-up calls (the kernels and FlexAttention's graphs are compiled
# by then: the eager rows of the cell ran them).
GRAPH_WARMUP_CALLS = 3
GRAPH_CAPTURE_S = 0.5
# Autotuning (SLA_DIST_AUTOTUNE unset): 163.9 s for the first call's 60 candidates with a cold Triton cache, 5.1 s
# with the cache another process left (2026-11-29-h200-sweep.md); the search is 30 candidates since, so ~85 s per
# new (D, branch set), plus a forward-only search when EVEN_K changes (L not a multiple of 64: 75600), assumed 20 s.
# The compiled layer calls the same kernels: the process's tuning serves it.
SLA_TUNE_S = 85.0
SLA_RETUNE_EVEN_K_S = 20.0
COMPILING_CELL_S = 10.0
"""A cell estimated above this compiles something: a run scales such cells' estimates by the worst measured /
estimated seconds of the compiling cells before them (bench_attention.run_sweep)."""
PROCESS_START_S = 12.0
"""Interpreter start and imports (5.6 s before the first cell, measured), then the CUDA libraries' and the
profiler's start-up inside the first cell (~5.5 s more than a later shape's first cell took)."""
PROFILE_S = 0.3
"""A full layer's profile per cell (--profile-glue), 3 + 3 profiled calls: the 2026-11-30 sweep's cells, profile
and row set-up included, took what their timed calls predict within 0.2 s."""
ROW_SETUP_S = 0.1
"""Per row: inputs, the layer or the block mask, Python around the timed calls."""
WARMUP_MS = 25
REP_MS = 100
MIN_REPS = 5
"""Timed repetitions at least, per do_bench: at L 75600 a dense fwd+bwd (228 ms) would get 1 out of 100 ms."""
FLUSH_MS = 0.1
"""do_bench zeroes a 256 MB buffer before every call to flush L2."""


def method_ms(method: str, L: int, D: int, sparsity: float) -> tuple[float, float]:
    """Estimated (fwd, fwd+bwd) ms of ``method`` at one cell (upper-side estimate, see the table above)."""
    density = 1.0 if method == DENSE else (1.0 - sparsity) / 0.05
    fwd_bwd = max(_FLOOR_MS[method], _AT_32K_MS[method] * (L / 32768) ** 2 * density)
    fwd_bwd *= _D64_FACTOR if D == 64 else 1.0
    return fwd_bwd * _FWD_SHARE, fwd_bwd


def bench_calls(ms: float, min_reps: int = MIN_REPS) -> tuple[int, int]:
    """(calls, timed repetitions) of measuring a call that takes ``ms`` (bench_attention._first_call, then _bench):
    the first call and one to estimate ``rep``, then do_bench's first call, its 5 estimating calls, its warm-up and
    its timed repetitions."""
    reps = max(min_reps, int(REP_MS / ms))
    return 2 + 1 + 5 + max(1, int(WARMUP_MS / ms)) + reps, reps


def rep_ms(ms: float, min_reps: int = MIN_REPS) -> float:
    """do_bench's ``rep`` (ms) that gives at least ``min_reps`` timed repetitions of a call of ``ms``."""
    return max(float(REP_MS), min_reps * ms * 1.05)


def measure_seconds(method: str, L: int, D: int, sparsity: float) -> float:
    """Steady-state seconds to measure one row: fwd and fwd+bwd benches, then one fwd+bwd for the peak memory."""
    total = 0.0
    for ms in method_ms(method, L, D, sparsity):
        total += bench_calls(ms)[0] * (ms + FLUSH_MS) / 1e3
    return total + 2 * method_ms(method, L, D, sparsity)[1] / 1e3 + ROW_SETUP_S


@dataclass
class CostModel:
    """Seconds per cell of a sweep run in one process, in order: first calls counted once per what they compile."""

    autotune: bool = False
    profile_glue: bool = True
    tuning_cached: bool = False
    """Autotuned with the Triton cache a previous process left (same machine): 5.1 s per search, measured."""
    graphs: bool = False
    """--graphs: the graphed rows too (GRAPH_METHODS)."""

    def __post_init__(self) -> None:
        self._seen: set = set()

    def _first(self, key) -> bool:
        new = key not in self._seen
        self._seen.add(key)
        return new

    def cell_seconds(self, cell: Cell, with_dense: bool = True) -> float:
        L, D, s = cell.L, cell.D, cell.sparsity
        seconds = sum(measure_seconds(m, L, D, s) for m in cell_methods(self.graphs))
        if self.graphs:
            seconds += sum(GRAPH_WARMUP_CALLS * ms / 1e3 + GRAPH_CAPTURE_S for m in GRAPH_METHODS
                           for ms in method_ms(m, L, D, s))
        if with_dense and self._first(("dense", cell.shape)):
            seconds += measure_seconds(DENSE, L, D, s)
        if self._first(("flex", cell.shape)):
            seconds += FLEX_COMPILE_S
        even_k = L % 64 == 0
        for branch in ("full", "sparse"):
            if self.autotune:
                if self._first(("tune", D, branch)):
                    seconds += 5.1 if self.tuning_cached else SLA_TUNE_S
                if self._first(("tune", D, branch, even_k)) and not even_k:
                    seconds += 5.1 if self.tuning_cached else SLA_RETUNE_EVEN_K_S
            elif self._first(("compile", D, branch)):  # the search compiles its candidates itself
                seconds += SLA_COMPILE_S
            if self._first(("length", D, branch, L)):
                seconds += SLA_NEW_LENGTH_S
        seconds += COMPILED_GRAPHS_PER_CELL * COMPILED_GRAPH_S
        return seconds + (PROFILE_S * len(PROFILED_LAYERS) if self.profile_glue else 0.0)

    def plan(self, cells: list[Cell], dense_done: set | None = None) -> list[tuple[Cell, float]]:
        """(cell, estimated seconds) in run order; ``dense_done``: shapes whose dense row is already measured."""
        self._seen |= {("dense", shape) for shape in dense_done or ()}
        return [(cell, self.cell_seconds(cell)) for cell in cells]


def plan_table(plan: list[tuple[Cell, float]]) -> str:
    lines = [f"{'L':>6} {'H':>3} {'D':>4} {'sparsity':>8} {'est. s':>7} {'cum. s':>7}"]
    total = PROCESS_START_S
    for cell, seconds in plan:
        total += seconds
        lines.append(f"{cell.L:>6} {cell.H:>3} {cell.D:>4} {cell.sparsity:>8.2f} {seconds:>7.1f} {total:>7.1f}")
    lines.append(f"total with {PROCESS_START_S:.0f} s process start: {total:.0f} s")
    return "\n".join(lines)


# --- the sweep's JSON -------------------------------------------------------------------------------------------

def row_cell(row: dict) -> Cell | None:
    if row.get("sparsity") is None:
        return None
    return Cell(row["L"], row["D"], round(row["sparsity"], 6))


def error_note(row: dict) -> str:
    """The row's note if it says why the row failed: any note but GRAPH_MEMORY_NOTE."""
    note = row.get("note") or ""
    return "" if note == GRAPH_MEMORY_NOTE else note


def measured(row: dict) -> bool:
    return not error_note(row) and all(math.isfinite(row.get(k, math.nan)) for k in ("fwd_ms", "fwd_bwd_ms"))


def done_cells(rows: list[dict], methods: tuple[str, ...] = CELL_METHODS) -> set[Cell]:
    """Cells of ``rows`` with each of ``methods`` measured (no error note): what --append skips."""
    have: dict[Cell, set[str]] = {}
    for row in rows:
        cell = row_cell(row)
        if cell is not None and measured(row):
            have.setdefault(cell, set()).add(row["method"])
    return {cell for cell, got in have.items() if set(methods) <= got}


def dense_shapes(rows: list[dict]) -> set[tuple[int, int, int]]:
    return {(r["L"], r["H"], r["D"]) for r in rows if r["method"] == DENSE and measured(r)}


def load_payload(path: str | Path) -> dict:
    """A bench_attention.py JSON, or a results file holding one under 'bench_attention' (2026-11-29's)."""
    payload = json.loads(Path(path).read_text())
    if "rows" not in payload and isinstance(payload.get("bench_attention"), dict):
        payload = dict(payload["bench_attention"], device=payload.get("card", "?"), torch=payload.get("torch"),
                       triton=payload.get("triton"))
    if "rows" not in payload:
        raise ValueError(f"{path} has no 'rows': not a bench_attention.py JSON")
    return payload


def _group_key(row: dict):
    return ("dense", row["L"], row["H"], row["D"]) if row["method"] == DENSE else row_cell(row)


def merge_payloads(payloads: list[dict]) -> dict:
    """One payload from several runs (pieces of one sweep, or a run and its --append): each cell's rows, and each
    dense shape's row, come from the first run that measured them completely, else from the last run that tried,
    so a cell's rows are never mixed from two runs; complete with the graphed rows comes before complete without
    (an --append --graphs run over a sweep without them). The metadata of every run is kept under 'runs'."""
    chosen: dict = {}
    for payload in payloads:
        groups: dict = {}
        for row in payload["rows"]:
            groups.setdefault(_group_key(row), []).append(row)
        for key, rows in groups.items():
            methods = {r["method"] for r in rows}
            dense = isinstance(key, tuple)
            complete = all(measured(r) for r in rows) and (dense or set(CELL_METHODS) <= methods)
            rank = (complete, complete and (dense or set(GRAPH_METHODS) <= methods))
            if key not in chosen or not chosen[key][0][0] or chosen[key][0] < rank:
                chosen[key] = (rank, rows)

    def order(key) -> tuple:
        return (key[1], key[3], -1.0) if isinstance(key, tuple) else (key.L, key.D, key.sparsity)

    rows = [row for key in sorted(chosen, key=order) for row in chosen[key][1]]
    runs = [run for p in payloads for run in p.get("runs", [{k: v for k, v in p.items() if k != "rows"}])]
    return {"runs": runs, "rows": rows}


def write_payload(path: str | Path, payload: dict) -> None:
    """Write atomically: a call killed at its time limit leaves the previous cell's file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
