"""Choosing the Ulysses x ring split of a sequence-parallel group from the head count and a communication cost model.

Both schemes start from the same input, this rank's shard of L / P tokens with all H heads, and compute the same
sparse attention per rank (H / P heads over L tokens, or H heads of L / P queries), so the choice is decided by what
each adds on top of that, per rank and attention layer, forward + backward (P = U x R ranks, U Ulysses, R ring):

    Ulysses (U > 1)  8 all-to-alls (q, k, v, o and their gradients) of the [B, L / P, H, D] shard, of which
                     (U - 1) / U leaves the rank:   8 (latency + B (L / P) H D e (U - 1) / U / bandwidth)
    ring (R > 1)     context parallel (context.py) over chunks of L / R tokens with h = H / U heads:
                     9 collective calls (forward: pooled-sum gather, 2 request all-to-alls, k|v reply, 2 totals
                     all-reduces; backward: the reply's reverse and the 2 all-reduces) + bytes: the fetched k|v
                     blocks twice (reply, its gradient) 2 f (R - 1) (L / R) B h 2D e, the float64 pooled key sums
                     and the float32 linear totals; + its own work per (head, local query block, fetched key block)
                     pair (block classes, the linear branch's per-slot correction):
                     pair_seconds x B h (L / R / block_q) f (L / block_k)

f is the fraction of key blocks a rank fetches (context parallel's union of its query blocks' critical and, for
``linear_scope='marginal'``, negligible lists; benchmarks/bench_sequence_parallel.py measures it). Unknown, it is
taken as 1 (i.i.d. inputs, the measured worst case): then pure Ulysses is never predicted slower, because context
parallel then moves P / 2 times Ulysses' bytes in more calls and adds its pair work, so the default is the
measured-safe one. The bytes term applies f to the other ranks' blocks, an upper bound (a rank needs its own chunk's
blocks most, so its remote fraction is lower), i.e. conservative against the ring.

The link constants are benchmarks/scaling_model.py's fit of DeepSpeed's Ulysses exchange (4 all-to-alls per pass,
the 8 per layer counted above) to its measured times on 2x H200 (NVLink, 2026-11-30); the fused exchange, the
default, makes 4 per layer, so Ulysses is if anything overcharged. ``pair_seconds`` is fitted by
benchmarks/bench_sequence_parallel.py (``fit_context_cost``) to the measured context-parallel layer times of
2026-11-27 with those link constants. tests/test_bench_sequence_parallel.py recomputes all three from
those sources, so these defaults cannot drift from them silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_int


@dataclass(frozen=True)
class SPCostModel:
    """Per-rank cost constants of the two sequence-parallel exchanges (defaults: H200 NVLink, see the module doc)."""

    latency_s: float = 2.025e-4
    """Seconds per collective call (scaling_model.calibrate().exchanges["deepspeed"].latency_s)."""
    bytes_per_s: float = 1.7817e11
    """Bytes per second one rank sends or receives (scaling_model.calibrate().exchanges["deepspeed"].bytes_per_s)."""
    pair_seconds: float = 3.845e-9
    """Context parallel's own work per (head, local query block, fetched key block) pair, seconds
    (bench_sequence_parallel.fit_context_cost on results/2026-11-27-h200x4-sequence-parallel.json)."""

    def __post_init__(self) -> None:
        for name, least in (("latency_s", 0.0), ("bytes_per_s", None), ("pair_seconds", 0.0)):
            value = getattr(self, name)
            if not _is_number(value) or (value < least if least is not None else value <= 0):
                raise ValueError(f"SPCostModel.{name}={value!r} must be a "
                                 f"{'non-negative' if least is not None else 'positive'} number")


@dataclass(frozen=True)
class AttentionShape:
    """What one sequence-parallel attention layer processes per sample group."""

    heads: int
    seq_len: int
    head_dim: int
    batch: int = 1
    block_q: int = 128
    block_k: int = 64
    element_bytes: int = 2
    """Bytes per exchanged element (bf16)."""

    def __post_init__(self) -> None:
        for name in ("heads", "seq_len", "head_dim", "batch", "block_q", "block_k", "element_bytes"):
            check_int(name, getattr(self, name), 1)


@dataclass(frozen=True)
class LayoutChoice:
    """The chosen split, the predicted seconds of every split considered (by Ulysses degree) and why."""

    ulysses_degree: int
    ring_degree: int
    seconds: dict[int, float] = field(default_factory=dict)
    reason: str = ""


def exchange_seconds(shape: AttentionShape, ulysses: int, ring: int, fetch_fraction: float,
                     cost: SPCostModel) -> float:
    """Predicted per-rank seconds that a ``ulysses`` x ``ring`` split adds to one layer's forward + backward."""
    check_fraction(fetch_fraction)
    P, s = ulysses * ring, shape
    seconds = 0.0
    if ulysses > 1:
        nbytes = s.batch * (s.seq_len / P) * s.heads * s.head_dim * s.element_bytes * (ulysses - 1) / ulysses
        seconds += 8 * (cost.latency_s + nbytes / cost.bytes_per_s)
    if ring > 1:
        h, chunk = s.batch * s.heads / ulysses, s.seq_len / ring
        fetched = 2 * fetch_fraction * (ring - 1) * chunk * h * 2 * s.head_dim * s.element_bytes
        pooled = (ring - 1) * h * (chunk / s.block_k) * s.head_dim * 8
        totals = 2 * 2 * (ring - 1) / ring * h * (s.head_dim**2 + s.head_dim) * 4
        seconds += 9 * cost.latency_s + (fetched + pooled + totals) / cost.bytes_per_s
        seconds += cost.pair_seconds * context_pairs(shape, ulysses, ring, fetch_fraction)
    return seconds


def context_pairs(shape: AttentionShape, ulysses: int, ring: int, fetch_fraction: float) -> float:
    """(head, local query block, fetched key block) pairs of one ring rank: what context parallel's own work
    (block classes, the linear branch's per-slot correction) scales with."""
    s = shape
    return s.batch * s.heads / ulysses * (s.seq_len / ring / s.block_q) * fetch_fraction * (s.seq_len / s.block_k)


def choose_layout(sp_size: int, shape: AttentionShape, fetch_fraction: float | None = None,
                  ring_allowed: bool = True, cost: SPCostModel | None = None) -> LayoutChoice:
    """The Ulysses x ring split of ``sp_size`` ranks with the least predicted exchange time.

    Candidates: every Ulysses degree U dividing both ``sp_size`` and the head count (the ring takes the rest);
    without ``ring_allowed`` (a layer that only runs under Ulysses, e.g. dense attention) only U = sp_size. Ties go
    to the larger U. ``fetch_fraction`` None is taken as 1 (the worst case), which picks pure Ulysses whenever the
    heads divide. Raises ValueError naming the values when no split can run.
    """
    cost = cost or SPCostModel()
    if fetch_fraction is not None:
        check_fraction(fetch_fraction)
    candidates = ulysses_candidates(sp_size, shape.heads, ring_allowed)
    if sp_size == 1:
        return LayoutChoice(1, 1, {1: 0.0}, "one rank: nothing to exchange")
    f = 1.0 if fetch_fraction is None else fetch_fraction
    seconds = {u: exchange_seconds(shape, u, sp_size // u, f, cost) for u in candidates}
    best = min(candidates, key=lambda u: (seconds[u], -u))
    if len(candidates) == 1:
        why = (f"only ulysses_degree={best} fits {shape.heads} heads over sp_size={sp_size}" if ring_allowed else
               "ring not allowed")
    else:
        known = "assumed 1 (unknown)" if fetch_fraction is None else f"{f:.3g}"
        why = (f"least predicted exchange time at fetched fraction {known}: "
               + ", ".join(f"U={u} x R={sp_size // u}: {1e3 * t:.2f} ms" for u, t in seconds.items()))
    return LayoutChoice(best, sp_size // best, seconds, why)


def ulysses_candidates(sp_size: int, heads: int, ring_allowed: bool = True) -> list[int]:
    """The Ulysses degrees (largest first) that can split ``heads`` over ``sp_size`` ranks, the ring taking the rest;
    only ``sp_size`` itself when the ring is not allowed. Raises ValueError naming both when there is none."""
    check_int("sp_size", sp_size, 1)
    check_int("heads", heads, 1)
    candidates = [u for u in range(sp_size, 0, -1) if sp_size % u == 0 and heads % u == 0]
    if not ring_allowed:
        candidates = [u for u in candidates if u == sp_size]
        if not candidates:
            raise ValueError(f"{heads} heads do not divide over sp_size={sp_size} and these attention layers run "
                             "under Ulysses only (ring_degree must be 1); choose an sp_size dividing the heads")
    return candidates


def check_fraction(fetch_fraction: float) -> None:
    if not (_is_number(fetch_fraction) and 0 <= fetch_fraction <= 1):
        raise ValueError(f"fetch_fraction={fetch_fraction!r} must be a number in [0, 1] (the fraction of key "
                         "blocks context parallel fetches)")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
