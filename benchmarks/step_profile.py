"""Where a training step's time goes, read from a torch.profiler Chrome trace (``prof.export_chrome_trace``).

A step is the time between two boundary markers (zero-length ``record_function`` ranges named :data:`BOUNDARY`
that ``bench_train.py --profile`` emits after a device synchronize at the end of each step, so a window holds
all of that step's work: data loading, callbacks, forward, backward, the optimizer step). Within it:

* GPU runs (kernels present): every kernel / memcpy / memset is classified by name (:func:`classify`) into
  SLA Triton kernels, GEMMs, other attention, NCCL collectives by kind (the Ulysses all-to-all apart from ZeRO's
  reduce-scatter / reduce / all-gather / all-reduce), optimizer, memcpy, elementwise, other. Per category: the
  union of its intervals (busy), the plain sum, the count. Compute = union of all non-collective intervals (any
  stream); comm = union of collective intervals; overlap = |comm ∩ compute|; exposed comm = |comm| − overlap;
  idle = wall − |compute ∪ comm| (no kernel anywhere: host-side time). So ``wall = compute + exposed + idle``.
* CPU runs (no device events): the same categories from CPU ops. Ops nest (``aten::linear`` holds
  ``aten::addmm``), so each instant of a thread goes to the outermost op that classifies as something other than
  ``other`` (``sla_dist::sla_forward`` stays SLA though it runs ``aten::bmm`` inside); an unclassified op keeps
  only its time outside its children. Lanes are threads instead of streams.

Plus the CPU ``record_function`` ranges (Lightning's ``[Strategy]...`` / ``[LightningModule]...`` hooks, the
DeepSpeed engine's step / backward, ``Optimizer.step#...``): the union of each name's intervals, and how much of it
fell in the idle time (what the host was doing while no kernel ran: where a per-step overhead lives). They nest, so
they do not add up to the wall.

Pure Python on purpose (no torch import): tests/test_step_profile.py proves the arithmetic on synthetic events.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

BOUNDARY = "bench_train/step_boundary"
"""The marker range bench_train.py emits at each step boundary of the profiled window."""

Interval = tuple[float, float]

DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
"""Chrome-trace categories of device work (``gpu_user_annotation`` is a projection of CPU ranges: not work)."""

COLLECTIVES = ("all_to_all", "reduce_scatter", "reduce", "all_gather", "all_reduce", "broadcast", "collective_other")
CATEGORIES = ("sla", "gemm", "attention", *COLLECTIVES, "optimizer", "memcpy", "elementwise", "other")

# Order matters: "reducescatter" and "allreduce" before "reduce"; SendRecv / Send / Recv are how NCCL (and older
# torch) run all_to_all, and nothing else in a training step sends point to point.
_COLLECTIVE_TOKENS = (("alltoall", "all_to_all"), ("sendrecv", "all_to_all"), ("reducescatter", "reduce_scatter"),
                      ("allgather", "all_gather"), ("allreduce", "all_reduce"), ("broadcast", "broadcast"),
                      ("reduce", "reduce"), ("send", "all_to_all"), ("recv", "all_to_all"))
# The SLA Triton kernels (sla_dist/kernels/: _sla_fwd_kernel, _bwd_dq_kernel, _block_sums_kernel, ...); the regex
# catches a renamed one as long as it keeps the ``_..._kernel`` form (demangled C++ names never start that way).
_SLA_PREFIXES = ("_sla", "_bwd", "_linear", "_block", "_classify", "_critical", "sla_dist::")
_SLA_KERNEL = re.compile(r"_[a-z0-9_]*_kernel")
# "lamb" but not "lambda": the "{lambda()#1}" in most aten kernel names is no optimizer.
_OPTIMIZER = re.compile(r"multi_tensor|adam|lamb(?!da)")
_GEMM = ("gemm", "cutlass", "xmma", "cublas", "nvjet", "sm90_", "sm80_", "ampere_", "hopper_")
_GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
                       "aten::linear", "aten::_addmm_activation"})
_ATTENTION = ("flash", "fmha", "attention", "scaled_dot_product")
_ELEMENTWISE = ("elementwise", "vectorized", "copy", "reduce", "unroll", "triton_", "fill", "softmax", "norm",
                "index", "scatter", "gather", "at::native")


def classify(name: str, cat: str = "kernel") -> str:
    """The category (one of :data:`CATEGORIES`) of a device kernel or CPU op, from its name and trace category."""
    low = name.lower()
    if "nccl" in low or low.startswith(("gloo:", "c10d::")):
        flat = low.replace("_", "")
        return next((kind for token, kind in _COLLECTIVE_TOKENS if token in flat), "collective_other")
    if low.startswith(_SLA_PREFIXES) or _SLA_KERNEL.fullmatch(name):
        return "sla"
    if _OPTIMIZER.search(low):
        return "optimizer"
    if any(s in low for s in _GEMM) or name in _GEMM_OPS:
        return "gemm"
    if any(s in low for s in _ATTENTION):
        return "attention"
    if cat in ("gpu_memcpy", "gpu_memset") or low.startswith(("memcpy", "memset")):
        return "memcpy"
    if cat == "cpu_op" and low.startswith("aten::"):
        return "elementwise"  # on CPU every other aten op is elementwise, a reduction, a copy or a view
    if cat != "cpu_op" and any(s in low for s in _ELEMENTWISE):
        return "elementwise"
    return "other"


# ---------------------------------------------------------------------------------------------------- intervals


def union(intervals) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points; empty ones (end <= start) dropped."""
    merged: list[list[float]] = []
    for s, e in sorted(i for i in intervals if i[1] > i[0]):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def length(intervals) -> float:
    """Total length of the points covered (overlaps counted once)."""
    return sum(e - s for s, e in union(intervals))


def intersect(a, b) -> list[Interval]:
    """The points in both ``a`` and ``b``, as disjoint intervals."""
    a, b = union(a), union(b)
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a, b) -> list[Interval]:
    """The points in ``a`` and not in ``b``."""
    out, b = [], union(b)
    for s, e in union(a):
        for bs, be in b:
            if be <= s or bs >= e:
                continue
            if bs > s:
                out.append((s, bs))
            s = max(s, be)
        if e > s:
            out.append((s, e))
    return out


def clip(intervals, window: Interval) -> list[Interval]:
    """``intervals`` cut to ``window`` (those outside it dropped)."""
    lo, hi = window
    return [(max(s, lo), min(e, hi)) for s, e in intervals if min(e, hi) > max(s, lo)]


# ------------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """One complete ("X") event of a Chrome trace: times in microseconds, ``lane`` the stream (device events) or
    thread (CPU events)."""

    name: str
    cat: str
    start: float
    dur: float
    lane: str = "0"

    @property
    def end(self) -> float:
        return self.start + self.dur


def read_trace(path: Path | str) -> dict:
    """A Chrome trace's JSON (gzipped when the name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        return json.load(file)


def events_of(trace: dict) -> list[Event]:
    """The complete events of a Chrome trace (torch.profiler's layout: ``traceEvents``; a device event's stream in
    ``args.stream``, else its ``tid``)."""
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        args = ev.get("args") or {}
        lane = args.get("stream", ev.get("tid", 0)) if ev.get("cat") in DEVICE_CATS else ev.get("tid", 0)
        out.append(Event(str(ev.get("name", "")), str(ev.get("cat", "")), float(ev["ts"]), float(ev["dur"]),
                         str(lane)))
    return out


def step_windows(events: list[Event], marker: str = BOUNDARY) -> list[Interval]:
    """The intervals between consecutive boundary markers (N + 1 markers: N steps)."""
    marks = sorted(e.start for e in events if e.name == marker and e.cat == "user_annotation")
    return list(zip(marks, marks[1:]))


@dataclass(frozen=True)
class Piece:
    """Time of one category on one lane."""

    category: str
    lane: str
    start: float
    end: float
    name: str


def device_pieces(events: list[Event]) -> list[Piece]:
    return [Piece(classify(e.name, e.cat), e.lane, e.start, e.end, e.name) for e in events if e.cat in DEVICE_CATS]


def cpu_pieces(events: list[Event]) -> list[Piece]:
    """CPU ops attributed without double counting nested ones: per thread, each op's whole interval goes to it if it
    classifies as anything but ``other``, else only its time outside its child ops (and its children are looked at
    in turn)."""
    by_lane: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        if e.cat == "cpu_op":
            by_lane[e.lane].append(e)
    pieces: list[Piece] = []
    for lane, ops in by_lane.items():
        children: dict[int, list[Event]] = defaultdict(list)
        roots: list[Event] = []
        stack: list[Event] = []
        for op in sorted(ops, key=lambda e: (e.start, -e.dur)):
            while stack and stack[-1].end <= op.start:
                stack.pop()
            (children[id(stack[-1])] if stack else roots).append(op)
            stack.append(op)
        todo = list(roots)
        while todo:
            op = todo.pop()
            category = classify(op.name, op.cat)
            if category != "other":
                pieces.append(Piece(category, lane, op.start, op.end, op.name))
                continue
            kids = children[id(op)]
            own = subtract([(op.start, op.end)], [(k.start, k.end) for k in kids])
            pieces += [Piece("other", lane, s, e, op.name) for s, e in own]
            todo += kids
    return pieces


# ---------------------------------------------------------------------------------------------------- breakdown


@dataclass
class CategoryTime:
    busy: float = 0.0
    """Union of the category's intervals (µs)."""
    total: float = 0.0
    """Plain sum of its durations: above ``busy`` when it runs on several lanes at once."""
    count: int = 0
    exposed: float | None = None
    """Collectives only: busy time no compute ran beside."""


@dataclass
class StepBreakdown:
    """One step window, in microseconds."""

    source: str
    """'device kernels' or 'cpu ops' (a run without device events)."""
    wall: float
    compute: float
    """Union of non-collective work."""
    comm: float
    """Union of collective work."""
    overlap: float
    """|comm ∩ compute|."""
    exposed_comm: float
    idle: float
    """No work on any lane."""
    categories: dict[str, CategoryTime]
    lanes: dict[str, float]
    """Busy time per stream (or thread)."""
    ranges: dict[str, float]
    """Union of each CPU record_function range's intervals."""
    ranges_idle: dict[str, float]
    """The part of each range during ``idle``."""
    top: list[tuple[str, str, float, int]] = field(default_factory=list)
    """(name, category, summed µs, count) of the longest-running kernels / ops."""


def breakdown(events: list[Event], window: Interval, top: int = 40) -> StepBreakdown:
    """Where ``window``'s time went (see the module docstring)."""
    inside = [e for e in events if e.end > window[0] and e.start < window[1]]
    pieces = device_pieces(inside)
    source = "device kernels"
    if not pieces:
        pieces, source = cpu_pieces(inside), "cpu ops"
    clipped = [(p, iv) for p in pieces for iv in clip([(p.start, p.end)], window)]
    per_cat: dict[str, list[Interval]] = defaultdict(list)
    per_lane: dict[str, list[Interval]] = defaultdict(list)
    per_name: dict[tuple[str, str], list[float]] = defaultdict(list)
    for p, iv in clipped:
        per_cat[p.category].append(iv)
        per_lane[p.lane].append(iv)
        per_name[(p.name, p.category)].append(iv[1] - iv[0])
    comm = union(iv for c in COLLECTIVES for iv in per_cat.get(c, []))
    compute = union(iv for c, ivs in per_cat.items() if c not in COLLECTIVES for iv in ivs)
    overlap = length(intersect(comm, compute))
    categories = {}
    for c in CATEGORIES:
        ivs = per_cat.get(c, [])
        if not ivs:
            continue
        busy = length(ivs)
        exposed = busy - length(intersect(ivs, compute)) if c in COLLECTIVES else None
        categories[c] = CategoryTime(busy, sum(e - s for s, e in ivs), len(ivs), exposed)
    ranges: dict[str, list[Interval]] = defaultdict(list)
    for e in inside:
        if e.cat == "user_annotation" and e.name != BOUNDARY:
            ranges[e.name] += clip([(e.start, e.end)], window)
    idle = subtract([window], comm + compute)
    wall = window[1] - window[0]
    names = sorted(((n, c, sum(d), len(d)) for (n, c), d in per_name.items()), key=lambda t: -t[2])
    return StepBreakdown(source=source, wall=wall, compute=length(compute), comm=length(comm), overlap=overlap,
                         exposed_comm=length(comm) - overlap, idle=length(idle), categories=categories,
                         lanes={k: length(v) for k, v in per_lane.items()},
                         ranges={k: length(v) for k, v in ranges.items()},
                         ranges_idle={k: length(intersect(v, idle)) for k, v in ranges.items()}, top=names[:top])


def mean(steps: list[StepBreakdown]) -> StepBreakdown:
    """The per-step average of several windows (the longest kernels / ops: the first step's)."""
    if not steps:
        raise ValueError("no step windows to average: the trace holds fewer than 2 boundary markers")
    n = len(steps)

    def avg(get) -> float:
        return sum(get(s) for s in steps) / n

    def avg_dict(get) -> dict[str, float]:
        keys = dict.fromkeys(k for s in steps for k in get(s))
        return {k: sum(get(s).get(k, 0.0) for s in steps) / n for k in keys}

    categories = {}
    for c in dict.fromkeys(c for s in steps for c in s.categories):
        got = [s.categories.get(c, CategoryTime()) for s in steps]
        exposed = [g.exposed for g in got if g.exposed is not None]
        categories[c] = CategoryTime(sum(g.busy for g in got) / n, sum(g.total for g in got) / n,
                                     round(sum(g.count for g in got) / n),
                                     sum(exposed) / n if exposed else None)
    return StepBreakdown(source=steps[0].source, wall=avg(lambda s: s.wall), compute=avg(lambda s: s.compute),
                         comm=avg(lambda s: s.comm), overlap=avg(lambda s: s.overlap),
                         exposed_comm=avg(lambda s: s.exposed_comm), idle=avg(lambda s: s.idle),
                         categories=categories, lanes=avg_dict(lambda s: s.lanes), ranges=avg_dict(lambda s: s.ranges),
                         ranges_idle=avg_dict(lambda s: s.ranges_idle),
                         top=steps[0].top)


def profile_trace(trace: dict) -> tuple[list[StepBreakdown], StepBreakdown]:
    """Each step of a bench_train profile trace and their average."""
    events = events_of(trace)
    steps = [breakdown(events, w) for w in step_windows(events)]
    return steps, mean(steps)


# ------------------------------------------------------------------------------------------------------- report


def to_json(steps: list[StepBreakdown], avg: StepBreakdown, **meta) -> dict:
    """The JSON written per rank: milliseconds throughout."""

    def ms(b: StepBreakdown) -> dict:
        d = asdict(b)
        for key in ("wall", "compute", "comm", "overlap", "exposed_comm", "idle"):
            d[key] = d[key] / 1e3
        d["categories"] = {c: {k: (v / 1e3 if k != "count" and v is not None else v) for k, v in t.items()}
                           for c, t in d["categories"].items()}
        d["lanes"] = {k: v / 1e3 for k, v in d["lanes"].items()}
        d["ranges"] = {k: v / 1e3 for k, v in d["ranges"].items()}
        d["ranges_idle"] = {k: v / 1e3 for k, v in d["ranges_idle"].items()}
        d["top"] = [{"name": n, "category": c, "ms": t / 1e3, "count": k} for n, c, t, k in d["top"]]
        return d

    return {**meta, "unit": "ms per step", "mean": ms(avg), "steps": [ms(s) for s in steps]}


def markdown(avg: StepBreakdown, title: str, steps: int, ranges: int = 16, top: int = 12) -> str:
    """A per-step table of ``avg``: the wall split (compute / exposed comm / idle), categories, lanes, CPU ranges."""
    w = avg.wall / 1e3
    what = "GPU kernels" if avg.source == "device kernels" else "CPU ops (no device kernels in this run)"
    lines = [f"### {title}", "", f"Mean of {steps} profiled step(s); times are {what}, ms per step.", "",
             "| wall split | ms | % of wall |", "|---|---|---|"]
    for label, v in (("wall (boundary to boundary)", avg.wall), ("compute busy (union, non-collective)",
                                                                   avg.compute),
                     ("collectives exposed (no compute beside)", avg.exposed_comm),
                     ("idle (nothing running)", avg.idle), ("collectives busy (union)", avg.comm),
                     ("collectives overlapped with compute", avg.overlap)):
        lines.append(f"| {label} | {v / 1e3:.1f} | {100 * v / avg.wall if avg.wall else 0:.1f} |")
    lines += ["", "| category | busy ms | sum ms | count | exposed ms | % of wall |", "|---|---|---|---|---|---|"]
    for c, t in sorted(avg.categories.items(), key=lambda kv: -kv[1].busy):
        exposed = "-" if t.exposed is None else f"{t.exposed / 1e3:.1f}"
        lines.append(f"| {c} | {t.busy / 1e3:.1f} | {t.total / 1e3:.1f} | {t.count} | {exposed} | "
                     f"{100 * t.busy / avg.wall if avg.wall else 0:.1f} |")
    lane = "stream" if avg.source == "device kernels" else "thread"
    lines += ["", f"Busy per {lane}: " + ", ".join(f"{k} {v / 1e3:.1f}" for k, v in
                                                  sorted(avg.lanes.items(), key=lambda kv: -kv[1]))]
    if avg.ranges:
        lines += ["", "| CPU range (nested: does not add up) | ms | of which idle ms |", "|---|---|---|"]
        for name, v in sorted(avg.ranges.items(), key=lambda kv: -kv[1])[:ranges]:
            lines.append(f"| `{name}` | {v / 1e3:.1f} | {avg.ranges_idle.get(name, 0.0) / 1e3:.1f} |")
    lines += ["", "| longest (first step) | category | ms | count |", "|---|---|---|---|"]
    shown = avg.top[:top] + [t for t in avg.top[top:] if t[1] == "other"][:5]  # what 'other' holds, to classify
    for name, c, t, k in shown:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {c} | {t / 1e3:.1f} | {k} |")
    lines.append(f"\n(wall = compute + exposed collectives + idle: {w:.1f} = {avg.compute / 1e3:.1f} + "
                 f"{avg.exposed_comm / 1e3:.1f} + {avg.idle / 1e3:.1f})")
    return "\n".join(lines) + "\n"
