"""Time the full SLA layer against dense and block-sparse baselines on one GPU, all in one run.

    python benchmarks/bench_attention.py [--quick] [--only NAME ...] [--json PATH]
    python benchmarks/bench_attention.py --sweep [--cells L=8192,16384 D=64 ...] [--append PATH] [--budget S]
                                         [--profile-glue] [--graphs] [--plan] [--json PATH]

Every row is measured in this process, so the ratios compare like with like: dense SDPA with the cuDNN and flash
backends, FlexAttention with a block mask of the same density, xformers when it loads, SLA's sparse branch alone and
the full SLA layer (block-map prediction + sparse branch + linear branch + proj_l), eager and through
``torch.compile(fullgraph=True)`` as a compiled DiT block runs it (FlexAttention is compiled too). Times are medians of
triton.testing.do_bench; TFLOP/s counts only the computed blocks (4·L·kept_keys·D per head forward, 2.5x that
backward); "extra MiB" is the fwd+bwd peak above the inputs. Each row also records its first call's seconds
(compilation, and the autotuner's search when tuning is on) and its timed repetitions (at least 5: at L 75600 a
dense fwd+bwd takes ~230 ms, longer than do_bench's default 100 ms of repetitions). The table comes last.

``--sweep`` measures issue #11's grid (attention_sweep.py: L 8192 / 16384 / 32768 / 75600, D 64 and 128 at the
model width, sparsity 80 / 90 / 95 / 97 %): dense cuDNN once per (L, H, D), then per cell FlexAttention at the same
density, SLA's sparse branch alone and the full layer, BQ 128, eager and compiled. ``--cells`` picks part of the
grid, ``--budget``
stops before a cell whose estimated cost would end past that many seconds since the start, the JSON is rewritten
after every cell, and ``--append`` continues a JSON (cells already measured are skipped, its dense rows reused).
``--plan`` prints the cells and their estimated seconds and exits (no GPU needed). ``--profile-glue`` profiles the
full layer of every cell (its kernels' CUDA time; attention_report.py computes the share outside the sparse-branch
kernels; the compiled layer's too). ``--graphs`` adds, per cell, FlexAttention's compiled function and the full
layer's module each captured in CUDA graphs (forward; forward+backward, its gradients written inside the graph) after
warm-up on the cell's static inputs, the timer replaying them: the time a DiT trained with CUDA graphs sees, without
the host time that bounds the eager and compiled calls at L 8192 and 16384; their extra memory is not measured
(sweep.GRAPH_MEMORY_NOTE). attention_report.py turns the JSON(s) into the markdown report.
"""

from __future__ import annotations

import time

_START = time.monotonic()  # before the imports: --budget counts them

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

import attention_sweep as sweep  # noqa: E402  (this script's folder is on sys.path when it runs)
from glue_fraction import profile_kernels  # noqa: E402
from layer_inputs import dense_sdpa, flex_block_sparse, layer_gradients  # noqa: E402
from sla_dist import SparseLinearAttention  # noqa: E402
from sla_dist.kernels.block_map import block_counts  # noqa: E402


@dataclass
class Row:
    L: int
    H: int
    D: int
    sparsity: float | None
    """None for a dense row of the sweep, which serves every sparsity."""
    method: str
    fwd_ms: float = float("nan")
    fwd_bwd_ms: float = float("nan")
    tflops_fwd: float = float("nan")
    extra_mib: float = float("nan")
    note: str = ""
    kept_keys: float = float("nan")
    first_fwd_s: float = float("nan")
    first_fwd_bwd_s: float = float("nan")
    """Seconds of the first call (compilation, and the autotuner's search when tuning is on); of a graphed row, its
    warm-up calls and capture."""
    reps_fwd: int = 0
    reps_fwd_bwd: int = 0
    kernels_us: dict | None = None
    """--profile-glue: {'fwd': {kernel: CUDA µs per call}, 'fwd_bwd': {...}} of the full layer."""


def _first_call(fn) -> tuple[float, float]:
    """(seconds of the first call, ms of a second one): what compiles, then the estimate do_bench's rep builds on."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return first, (time.perf_counter() - start) * 1e3


def _bench(fn, grads, estimate_ms: float) -> tuple[float, int]:
    """(median ms, timed repetitions): do_bench with enough ``rep`` for at least sweep.MIN_REPS repetitions."""
    import triton.testing

    rep = sweep.rep_ms(estimate_ms)
    ms = triton.testing.do_bench(fn, warmup=sweep.WARMUP_MS, rep=rep, grad_to_none=grads, return_mode="median")
    return ms, max(1, int(rep / ms))


def _captured(step, grads) -> tuple[float, object]:
    """(seconds, replay): ``step`` captured in a CUDA graph after warm-up calls on a side stream (torch.cuda.graph's
    documented recipe: lazy initialisation and the allocator settle outside the capture). ``grads``' gradients are
    dropped before the capture, so the captured backward allocates them in the graph's pool and every replay writes
    them afresh, as do_bench's grad_to_none gives each timed eager call fresh gradients; the step's inputs stay where
    the capture read them (static buffers)."""
    start = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(sweep.GRAPH_WARMUP_CALLS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in grads or ():
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - start, graph.replay


def _time_step(step, grads, graph: bool) -> tuple[float, int, float]:
    """(median ms, timed repetitions, first call s) of ``step``, or (``graph``) of its CUDA graph's replay, whose
    first call is the warm-up and the capture."""
    if graph:
        first, step = _captured(step, grads)
        grads = None  # a replay writes the gradients the capture allocated
        _, estimate = _first_call(step)
    else:
        first, estimate = _first_call(step)
    ms, reps = _bench(step, grads, estimate)
    return ms, reps, first


def _measure(row: Row, fn, q, k, v, kept_keys: float, profile: bool = False, graph: bool = False) -> Row:
    """Fill fwd / fwd+bwd times, first calls, TFLOP/s and extra memory for ``fn(q, k, v)``; ``profile``: also the
    CUDA time per kernel of ``fn`` (a layer) forward and forward+backward; ``graph``: time each step captured in a
    CUDA graph instead (no extra memory: sweep.GRAPH_MEMORY_NOTE)."""
    g = torch.randn_like(q)
    row.kept_keys = kept_keys
    try:
        with torch.no_grad():
            row.fwd_ms, row.reps_fwd, row.first_fwd_s = _time_step(lambda: fn(q, k, v), None, graph)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        row.fwd_bwd_ms, row.reps_fwd_bwd, row.first_fwd_bwd_s = _time_step(lambda: fn(*leaves).backward(g),
                                                                          leaves, graph)
        if graph:
            row.note = sweep.GRAPH_MEMORY_NOTE
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(*leaves).backward(g)
            torch.cuda.synchronize()
            row.extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        flops = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * kept_keys * q.shape[3]
        row.tflops_fwd = flops / (row.fwd_ms * 1e-3) / 1e12
        if profile:
            with torch.no_grad():
                fwd = profile_kernels(lambda: fn(q, k, v))
            # gradients returned, not accumulated, as a model's step (and profile_sla.py) takes them
            fwd_bwd = profile_kernels(lambda: layer_gradients(fn, fn(*leaves), *leaves, g))
            row.kernels_us = dict(fwd=fwd, fwd_bwd=fwd_bwd)
    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
        row.note = _note(exc)
    return row


def _note(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:60]}"


def _flex_rows(L: int, H: int, D: int, sparsity: float, q, k, v, topk: float, graphs: bool = False) -> list[Row]:
    """FlexAttention with a block mask of density ``topk``, and (``graphs``) the same compiled function captured in
    CUDA graphs; a mask that cannot be built here (FlexAttention missing or failing to compile) is reported in the
    rows' notes, not fatal."""
    rows = [Row(L, H, D, sparsity, m) for m in (sweep.FLEX, sweep.FLEX_GRAPH)[:1 + graphs]]
    try:
        fn, kept = flex_block_sparse(q, k, topk)
    except Exception as exc:
        for row in rows:
            row.note = _note(exc)
        return rows
    return [_measure(row, fn, q, k, v, kept, graph=row.method == sweep.FLEX_GRAPH) for row in rows]


def _xformers():
    import xformers.ops as xops

    return lambda q, k, v: xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sla(D: int, topk: float, block_q: int, scope: str):
    m = SparseLinearAttention(D, topk=topk, BLKQ=block_q, linear_scope=scope).cuda()
    torch.nn.init.normal_(m.proj_l.weight, std=D**-0.5)  # a trained layer's proj_l is not zero
    return m


def _compiled(layer: torch.nn.Module):
    """``layer`` as a compiled DiT block calls it (sla_dist.models.compile): one graph (fullgraph: a graph break is an
    error, reported in the row's note), Inductor's default mode. Static shapes, as a DiT at one resolution compiles
    them: automatic dynamic shapes would compile later cells for any length once two lengths were seen, timing
    other code than a single-shape run. A new topk or shape recompiles (see _allow_recompiles)."""
    return torch.compile(layer, fullgraph=True, dynamic=False)


def _full_layer_rows(L: int, H: int, D: int, sparsity: float, q, k, v, compiled: bool = True,
                     profile: bool = False, graphs: bool = False) -> list[Row]:
    """The full layer, BQ 128, eager, then (``compiled``) compiled, then (``graphs``) the eager module captured in
    CUDA graphs: the same module, so the rows differ only in the call."""
    topk = round(1.0 - sparsity, 6)
    kept = block_counts(math.ceil(L / 64), topk, 0.10)[0] * 64
    layer = _sla(D, topk, 128, "marginal")
    rows = [_measure(Row(L, H, D, sparsity, sweep.FULL), layer, q, k, v, kept, profile=profile)]
    if compiled:
        rows.append(_measure(Row(L, H, D, sparsity, sweep.COMPILED), _compiled(layer), q, k, v, kept,
                             profile=profile))
    if graphs:
        rows.append(_measure(Row(L, H, D, sparsity, sweep.FULL_GRAPH), layer, q, k, v, kept, graph=True))
    return rows


def _allow_recompiles() -> None:
    """Every (L, H, D) compiles FlexAttention's forward and forward+backward graphs (16 for the sweep's grid), and
    every cell the compiled layer's inference and training graphs (its topk and shape are constants of them: 64 for
    the grid), past Dynamo's default of 8 graphs per function, after which it would run them eagerly (FlexAttention
    on the whole score matrix); raise the limits, and fail loudly rather than time an eager fallback."""
    dynamo = torch._dynamo.config
    for name, older, limit in (("recompile_limit", "cache_size_limit", 128),
                               ("accumulated_recompile_limit", "accumulated_cache_size_limit", 512)):
        setattr(dynamo, name if hasattr(dynamo, name) else older, limit)
    if hasattr(dynamo, "fail_on_recompile_limit_hit"):
        dynamo.fail_on_recompile_limit_hit = True


def bench_shape(L: int, H: int, D: int, sparsity: float, full: bool, only: list[str] | None = None) -> list[Row]:
    topk = round(1.0 - sparsity, 6)
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    n_c, _ = block_counts(math.ceil(L / 64), topk, 0.10)

    def wanted(method: str) -> bool:
        return not only or any(name in method for name in only)

    rows = [_measure(Row(L, H, D, sparsity, sweep.DENSE), dense_sdpa(SDPBackend.CUDNN_ATTENTION), q, k, v, L)]
    if full and wanted("dense SDPA flash"):
        rows.append(_measure(Row(L, H, D, sparsity, "dense SDPA flash"), dense_sdpa(SDPBackend.FLASH_ATTENTION),
                             q, k, v, L))
    if full and wanted("FlexAttention"):
        rows += _flex_rows(L, H, D, sparsity, q, k, v, topk)
    if full and wanted("xformers"):
        try:
            rows.append(_measure(Row(L, H, D, sparsity, "xformers"), _xformers(), q, k, v, L))
        except Exception as exc:
            rows.append(Row(L, H, D, sparsity, "xformers", note=f"not available ({type(exc).__name__})"))
    if full and wanted("SLA sparse branch only"):
        rows.append(_measure(Row(L, H, D, sparsity, sweep.SPARSE_ONLY), _sla(D, topk, 128, "none"),
                             q, k, v, n_c * 64))
    if full and wanted("SLA full layer, BQ64"):
        rows.append(_measure(Row(L, H, D, sparsity, "SLA full layer, BQ64"), _sla(D, topk, 64, "marginal"),
                             q, k, v, n_c * 64))
    return rows + _full_layer_rows(L, H, D, sparsity, q, k, v, compiled=wanted(sweep.COMPILED))


def sweep_cell(cell: sweep.Cell, with_dense: bool, profile_glue: bool, graphs: bool = False) -> list[Row]:
    """The rows of one sweep cell: dense cuDNN when its shape has none yet, FlexAttention at the cell's density, the
    SLA sparse branch alone and the full layer (BQ 128), eager and compiled; ``graphs``: FlexAttention and the full
    layer captured in CUDA graphs too."""
    L, H, D, s = cell.L, cell.H, cell.D, cell.sparsity
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    n_c, _ = block_counts(math.ceil(L / 64), cell.topk, 0.10)
    rows = []
    if with_dense:
        rows.append(_measure(Row(L, H, D, None, sweep.DENSE), dense_sdpa(SDPBackend.CUDNN_ATTENTION), q, k, v, L))
    rows += _flex_rows(L, H, D, s, q, k, v, cell.topk, graphs=graphs)
    rows.append(_measure(Row(L, H, D, s, sweep.SPARSE_ONLY), _sla(D, cell.topk, 128, "none"), q, k, v, n_c * 64))
    return rows + _full_layer_rows(L, H, D, s, q, k, v, profile=profile_glue, graphs=graphs)


def _elapsed() -> float:
    """Seconds since this process started (its imports included), what --budget counts."""
    return time.monotonic() - _START


def _meta(autotune: bool) -> dict:
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": __import__("triton").__version__, "autotune": autotune,
            "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def run_sweep(args: argparse.Namespace, autotune: bool) -> list[dict]:
    """Measure the selected cells (those --append's file lacks), rewriting ``args.json`` after each; returns every
    row, the appended file's included."""
    cells = sweep.sweep_cells(args.cells)
    prior = sweep.load_payload(args.append) if args.append else None
    done = sweep.done_cells(prior["rows"], sweep.cell_methods(args.graphs)) if prior else set()
    dense_done = sweep.dense_shapes(prior["rows"]) if prior else set()
    todo = [c for c in cells if c not in done]
    model = sweep.CostModel(autotune=autotune, profile_glue=args.profile_glue, graphs=args.graphs)
    plan = model.plan(todo, dense_done)
    print(f"{len(cells)} cells selected, {len(cells) - len(todo)} already in {args.append}; estimated seconds "
          f"(autotune {'on' if autotune else 'off'}):\n{sweep.plan_table(plan)}", flush=True)
    if args.plan:
        return prior["rows"] if prior else []
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (--plan runs without one)")
    _allow_recompiles()
    meta = dict(_meta(autotune), budget_s=args.budget, min_reps=sweep.MIN_REPS, graphs=args.graphs, cells=[],
                skipped=[])
    rows: list[Row] = []

    def save() -> dict:
        """Write this run's rows (merged into --append's file) to --json; return what was written."""
        payload = dict(meta, rows=[asdict(r) for r in rows])
        payload = sweep.merge_payloads([prior, payload]) if prior else payload
        sweep.write_payload(args.json, payload)
        return payload

    overrun = 1.0  # the worst measured / estimated seconds of a cell that compiled: the compile times are assumed
    for i, (cell, estimate) in enumerate(plan):
        elapsed = _elapsed()
        predicted = estimate * (overrun if estimate > sweep.COMPILING_CELL_S else 1.0)
        if args.budget and elapsed + predicted > args.budget:
            meta["skipped"] = [asdict(c) for c, _ in plan[i:]]
            print(f"budget: {elapsed:.0f} s spent, the next cell's estimate {predicted:.0f} s would pass "
                  f"--budget {args.budget:.0f} s; {len(plan) - i} cells left for a run with --append", flush=True)
            break
        rows += sweep_cell(cell, cell.shape not in dense_done, args.profile_glue, args.graphs)
        dense_done.add(cell.shape)
        wall = _elapsed() - elapsed
        if estimate > sweep.COMPILING_CELL_S:
            overrun = max(overrun, wall / estimate)
        meta["cells"].append(dict(asdict(cell), estimate_s=round(predicted, 1), wall_s=round(wall, 1)))
        print(f"cell L={cell.L} D={cell.D} sparsity={cell.sparsity}: {wall:.1f} s (estimated {predicted:.1f} s), "
              f"{_elapsed():.0f} s since start", flush=True)
        save()
    return save()["rows"]  # again: a --budget stop above recorded its skipped cells in meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the headline shape")
    parser.add_argument("--only", nargs="+", help="rows whose method contains one of these (dense cuDNN and the "
                        "eager full SLA layer BQ128 always run; the compiled one runs at every shape unless --only "
                        "leaves it out)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 75600],
                        help="lengths of the L sweep besides 32768")
    parser.add_argument("--json", default="bench_attention.json")
    parser.add_argument("--sweep", action="store_true", help="issue #11's grid of cells (see above)")
    parser.add_argument("--cells", nargs="+", metavar="KEY=V1,V2",
                        help="--sweep: the cells with these L, D or sparsity values (keys intersect)")
    parser.add_argument("--append", metavar="PATH", help="--sweep: continue this JSON, skipping its measured cells")
    parser.add_argument("--budget", type=float, default=0.0, metavar="S",
                        help="--sweep: start no cell whose estimate would end past S seconds since the start")
    parser.add_argument("--profile-glue", action="store_true",
                        help="--sweep: CUDA time per kernel of the full layer in every cell")
    parser.add_argument("--graphs", action="store_true",
                        help="--sweep: FlexAttention and the full layer captured in CUDA graphs too, in every cell")
    parser.add_argument("--plan", action="store_true", help="--sweep: print the cells and estimates, then exit")
    args = parser.parse_args(argv)
    autotune = os.environ.get("SLA_DIST_AUTOTUNE") != "0"
    if args.sweep:
        rows = [Row(**r) for r in run_sweep(args, autotune)]
        if args.plan:
            return
    else:
        if args.cells or args.append or args.budget or args.profile_glue or args.graphs or args.plan:
            parser.error("--cells, --append, --budget, --profile-glue, --graphs and --plan go with --sweep")
        if not torch.cuda.is_available():
            sys.exit("bench_attention.py needs a CUDA GPU")
        _allow_recompiles()
        rows = bench_shape(32768, 12, 128, 0.95, full=True, only=args.only)
        if args.quick:
            rows += [r for L in args.lengths for r in bench_shape(L, 12, 128, 0.95, full=False)]
        else:
            for L in args.lengths:
                rows += bench_shape(L, 12, 128, 0.95, full=False)
            rows += bench_shape(32768, 24, 64, 0.95, full=False)
            for sparsity in (0.80, 0.90, 0.97):
                rows += bench_shape(32768, 12, 128, sparsity, full=False)
        sweep.write_payload(args.json, dict(_meta(autotune), rows=[asdict(r) for r in rows]))
    print_table(rows)


def print_table(rows: list[Row]) -> None:
    dense = {(r.L, r.H, r.D): r for r in rows if r.method == sweep.DENSE}
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
          "bf16, B=1; ratios are cuDNN dense time / row time; reps: timed repetitions fwd / fwd+bwd")
    print(f"{'L':>6} {'H':>3} {'D':>4} {'sparse':>6} {'method':<38} {'fwd ms':>8} {'x':>6} {'f+b ms':>8} {'x':>6} "
          f"{'TFLOP/s':>8} {'extra MiB':>9} {'first s':>7} {'reps':>7}  note")
    for r in rows:
        d = dense.get((r.L, r.H, r.D))
        fwd_x, fb_x = (d.fwd_ms / r.fwd_ms, d.fwd_bwd_ms / r.fwd_bwd_ms) if d else (math.nan, math.nan)
        sparsity = "-" if r.sparsity is None else f"{r.sparsity:.2f}"
        print(f"{r.L:>6} {r.H:>3} {r.D:>4} {sparsity:>6} {r.method:<38} {r.fwd_ms:>8.3f} {fwd_x:>6.1f} "
              f"{r.fwd_bwd_ms:>8.3f} {fb_x:>6.1f} {r.tflops_fwd:>8.1f} {r.extra_mib:>9.0f} "
              f"{r.first_fwd_s + r.first_fwd_bwd_s:>7.1f} {r.reps_fwd:>3}/{r.reps_fwd_bwd:<3}  {r.note}")


if __name__ == "__main__":
    main()
