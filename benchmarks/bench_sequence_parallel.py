"""Sequence-parallel SLA: time per layer (forward + backward) over P = 1, 2, 4 ranks, and bytes each scheme moves.

For every head count and world size P (one process per GPU, spawned here; NCCL), one SLA layer runs on a sequence of
--seq-len tokens sharded over the P ranks:

    ulysses   all-to-all (heads <-> sequence), SLA on the full sequence for H/P heads; --exchange picks the
              all-to-all ('fused': q, k, v in one collective; 'deepspeed': DeepSpeed's DistributedAttention, one
              per tensor), several of them timed side by side in one run
    context   SLA-aware context parallel over P ranks (global block map, fetch of the needed kv blocks only)

It reports the median forward + backward time (slowest rank), the Ulysses strong-scaling efficiency
T(1) / (P T(P)), peak memory, and per-rank forward bytes: the Ulysses all-to-all volume, and for context parallel the
fetched kv blocks plus the pooled-sum gather and the linear totals' all-reduce, next to what a dense ring (every kv
chunk passed around) would move.

Ulysses rows at P > 1 also time the exchanges alone: the same layer, forward + backward, with SLA replaced by a
pass-through (the output is q, the gradient of q, k and v the output's), so all that runs is the four all-to-alls
each way with their copies. 'exch. GB/s' is the bytes that cross to other ranks (forward and backward) over that
time; 'a2a GB/s' is what one bare all_to_all_single of the fused q, k, v buffer reaches (no copies): the link's
ceiling for this message size. ``--overlap-chunks`` times the fused exchange pipelined with SLA in that many chunks
of each rank's heads (SequenceParallelConfig.overlap_chunks; counts that do not divide H / P are skipped), rows side
by side with the unchunked one (1). What each exchange copies depends on the inputs' memory order:
``--input-layout`` 'bhld' (the default) gives the layer contiguous [B, H, L, D] tensors, 'blhd' [B, L, H, D] buffers
viewed as [B, H, L, D], as the model does; each layout gets its own P = 1 reference. NCCL's settings are environment
variables read when the workers start, e.g.

    python benchmarks/bench_sequence_parallel.py --sizes 1 2 --modes ulysses --exchange fused deepspeed \
        --input-layout bhld blhd
    NCCL_MIN_NCHANNELS=32 python benchmarks/bench_sequence_parallel.py --sizes 2 --heads 12 --exchange fused
    TORCH_NCCL_HIGH_PRIORITY=1 python benchmarks/bench_sequence_parallel.py --sizes 1 2 --modes ulysses \
        --overlap-chunks 1 2 3    # NCCL on high-priority streams: its kernels go ahead of queued attention blocks

``--locality`` picks the q / k inputs (locality_inputs.py): 'iid' Gaussian (the worst case for the fetch), 'field'
(a synthetic smooth content field over the T x H x W token grid, in the project's 3D-tiled order) and 'dit' (q / k
captured at a self-attention layer of the project's VideoDiT on a smooth synthetic video, random init or
``--dit-checkpoint``). For context parallel each row reports the fraction of key blocks fetched (all blocks, the
remote ones only, and what the critical lists alone would need), and the layer time that the cost model of
sla_dist.parallel.layout predicts from the P = 1 time and that fraction, next to the measured one; ``fit_context_cost``
refits the model's per-pair constant to the measured rows.

    python benchmarks/bench_sequence_parallel.py                 # GPUs: L = 131072, H = 12 and 24, D = 128, bf16
    python benchmarks/bench_sequence_parallel.py --locality iid field dit --sizes 1 2   # 32 x 64 x 64 token grid
    python benchmarks/bench_sequence_parallel.py --tiny --cpu    # CPU / gloo smoke test of every code path

DeepSpeed's comm layer is initialised from torch.distributed (see sla_dist.parallel.groups.ensure_deepspeed_comm:
on CPU it skips DeepSpeed's shared-memory op build, which would otherwise take minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from locality_inputs import LOCALITIES, LocalityConfig, add_locality_arguments, locality_config, locality_qkv
from results_io import save_results
from sla_dist import SparseLinearAttention
from sla_dist.kernels.block_map import CRITICAL
from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups, SequenceParallelSLA, SequenceShard
from sla_dist.parallel.context import ChunkLayout, FetchPlan, global_block_class
from sla_dist.parallel.layout import AttentionShape, SPCostModel, context_pairs, exchange_seconds
from sla_dist.parallel.ulysses import EXCHANGES

MODES = ("ulysses", "context")
LAYOUTS = ("bhld", "blhd")


@dataclass
class BenchConfig:
    """What to run; one instance is shipped to every worker."""

    seq_len: int = 131072
    """Valid tokens per sample (any length; the tail is padded to the shard grid)."""
    heads: list[int] = field(default_factory=lambda: [12, 24])
    """Head counts to time, one after the other."""
    head_dim: int = 128
    sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    """World sizes P; each needs P GPUs (or P CPU processes with --cpu)."""
    modes: list[str] = field(default_factory=lambda: list(MODES))
    exchanges: list[str] = field(default_factory=lambda: ["fused"])
    """Ulysses all-to-alls to time (sla_dist.parallel.ulysses.EXCHANGES), each at every P > 1."""
    topk: float = 0.05
    negligible: float = 0.10
    block_q: int = 128
    block_k: int = 64
    feature_map: str = "softmax"
    linear_scope: str = "marginal"
    locality: list[str] = field(default_factory=lambda: ["iid"])
    """Input sources (locality_inputs.py); Ulysses, whose cost does not depend on them, runs on the first only."""
    inputs: LocalityConfig = field(default_factory=LocalityConfig)
    """Token grid and source settings; any source but 'iid' needs seq_len = T H W of its grid."""
    warmup: int = 2
    iters: int = 5
    cpu: bool = False
    """Run on CPU processes with gloo (the SLA module then runs its dense reference: keep seq_len small)."""
    input_layouts: list[str] = field(default_factory=lambda: ["bhld"])
    """Memory orders of the layer's [B, H, L_local, D] inputs and output gradient to time: 'bhld' contiguous, 'blhd'
    the model's ([B, L_local, H, D] buffers viewed transposed); it changes what each exchange has to copy."""
    overlap_chunks: list[int] = field(default_factory=lambda: [1])
    """Chunks of each rank's heads the fused exchange is pipelined in (SequenceParallelConfig.overlap_chunks), one
    row each at every P > 1; counts that do not divide H / P are skipped."""
    profile: Path | None = None
    """GPUs only: profile one more forward + backward of every Ulysses row at P > 1, keep each rank's trace in this
    folder and report how long NCCL's kernels ran and how much of that no other kernel ran beside them."""

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if not self.exchanges:
            raise ValueError(f"exchanges is empty: give at least one of {EXCHANGES}")
        for exchange in self.exchanges:
            if exchange not in EXCHANGES:
                raise ValueError(f"exchange {exchange!r} is not one of {EXCHANGES}")
        if not self.overlap_chunks or min(self.overlap_chunks) < 1:
            raise ValueError(f"overlap_chunks={self.overlap_chunks} must be positive chunk counts")
        if self.profile is not None and self.cpu:
            raise ValueError(f"profile={str(self.profile)!r} needs GPUs: it measures NCCL's kernels")
        if self.seq_len < 1 or self.head_dim < 1 or min(self.heads) < 1 or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive: seq_len={self.seq_len}, heads={self.heads}, "
                             f"head_dim={self.head_dim}, sizes={self.sizes}")
        for layout in self.input_layouts:
            if layout not in LAYOUTS:
                raise ValueError(f"input layout {layout!r} is not one of {LAYOUTS}")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError(f"iters={self.iters} must be >= 1 and warmup={self.warmup} >= 0")
        for source in self.locality:
            if source not in LOCALITIES:
                raise ValueError(f"locality {source!r} is not one of {LOCALITIES}")
        if set(self.locality) - {"iid"} and self.seq_len != self.inputs.seq_len:
            raise ValueError(f"seq_len={self.seq_len} must equal the {self.inputs.grid} grid's "
                             f"{self.inputs.seq_len} tokens for locality {self.locality}")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.cpu else torch.bfloat16


def _inputs(config: BenchConfig, locality: str, heads: int, device: torch.device) -> list[torch.Tensor]:
    """q, k, v [1, heads, seq_len, D] (the same on every rank)."""
    if locality == "iid":
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (1, heads, config.seq_len, config.head_dim)
        qkv = [torch.randn(shape, generator=gen, device=device) for _ in range(3)]
    else:
        qkv = locality_qkv(locality, config.inputs, heads, config.head_dim, device)
    return [x.to(config.dtype) for x in qkv]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor(seconds, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _layer_inputs(local: list[torch.Tensor], layout: str) -> list[torch.Tensor]:
    """The layer's [B, H, L_local, D] inputs from the leaves ``local``, stored in ``layout`` (LAYOUTS)."""
    return [x.transpose(1, 2) for x in local] if layout == "blhd" else local


def _time_layer(layer: SequenceParallelSLA, local: list[torch.Tensor], layout: str, seq_len: int,
                config: BenchConfig, device: torch.device) -> dict:
    grad = torch.randn_like(_layer_inputs(local, layout)[0])  # in the inputs' layout, as the model's would be
    fwd, step = [], []
    for i in range(config.warmup + config.iters):
        for x in local:
            x.grad = None
        _sync(device)
        start = time.perf_counter()
        out = layer(*_layer_inputs(local, layout), seq_len=seq_len)
        _sync(device)
        mid = time.perf_counter()
        out.backward(grad)
        _sync(device)
        end = time.perf_counter()
        if i >= config.warmup:
            fwd.append(_slowest(mid - start, device))
            step.append(_slowest(end - start, device))
    return dict(fwd_ms=1e3 * statistics.median(fwd), fwd_bwd_ms=1e3 * statistics.median(step))


def _profile_nccl(layer: SequenceParallelSLA, local: list[torch.Tensor], layout: str, seq_len: int,
                  device: torch.device, trace: Path) -> dict:
    """One more forward + backward under torch.profiler, its trace written to ``trace``: how long NCCL's kernels
    ran (the union of their spans) and how much of that no other kernel or copy ran beside them (exposed), in ms,
    slowest rank. An NCCL kernel's span includes waiting for its peers."""
    from torch.profiler import ProfilerActivity, profile

    grad = torch.randn_like(_layer_inputs(local, layout)[0])
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer(*_layer_inputs(local, layout), seq_len=seq_len).backward(grad)
        torch.cuda.synchronize(device)
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    nccl, other = [], []
    for event in json.loads(trace.read_text())["traceEvents"]:
        if event.get("ph") == "X" and event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            spans = nccl if "nccl" in event["name"].lower() else other
            spans.append((event["ts"], event["ts"] + event["dur"]))  # microseconds
    busy = _union(nccl)
    total = sum(end - start for start, end in busy)
    exposed = total - _intersection(busy, _union(other))
    return dict(nccl_ms=_slowest(total / 1e3, device), nccl_exposed_ms=_slowest(exposed / 1e3, device))


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint spans covering the same time as ``spans``."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """The time two lists of sorted, disjoint spans share."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


class _PassThrough(torch.autograd.Function):
    """Attention's stand-in for timing the exchanges alone: q comes out, and the output's gradient goes to q, k, v."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad, grad


class _ExchangeOnly(SequenceParallelSLA):
    """The Ulysses layer with SLA replaced by ``_PassThrough``: what is left is the exchanges and their copies."""

    def _attend_valid(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int) -> torch.Tensor:
        return _PassThrough.apply(q[:, :, :seq_len], k[:, :, :seq_len], v[:, :, :seq_len])


def _all_to_all_gbps(local: torch.Tensor, config: BenchConfig, group) -> float:
    """GB/s to the other ranks (slowest rank) of one all_to_all_single of a buffer the size of q, k and v."""
    world = dist.get_world_size(group)
    send = torch.empty(world, 3 * local.numel() // world, dtype=local.dtype, device=local.device)
    recv = torch.empty_like(send)
    times = []
    for i in range(config.warmup + config.iters):
        _sync(local.device)
        start = time.perf_counter()
        dist.all_to_all_single(recv, send, group=group)
        _sync(local.device)
        if i >= config.warmup:
            times.append(_slowest(time.perf_counter() - start, local.device))
    return (world - 1) / world * send.numel() * send.element_size() / statistics.median(times) / 1e9


def _exchange_alone(attention: SparseLinearAttention, groups: SequenceParallelGroups, exchange: str,
                    local: list[torch.Tensor], layout: str, config: BenchConfig) -> dict:
    """The exchanges' fwd+bwd time (the layer with SLA passed through) and a bare all-to-all's GB/s."""
    alone = _time_layer(_ExchangeOnly(attention, groups, exchange), local, layout, config.seq_len, config,
                        local[0].device)
    return dict(exchange_ms=alone["fwd_bwd_ms"],
                a2a_gbps=_all_to_all_gbps(local[0].detach(), config, groups.ulysses_group))


def _context_bytes(layer: SequenceParallelSLA, local: list[torch.Tensor], shard: SequenceShard, group) -> dict:
    """Forward bytes received by this rank: context parallel (from its fetch plan) vs a dense ring."""
    c, (q, k, _) = layer.attention.config, local
    B, h, C, D = q.shape
    elem = q.element_size()
    layout = ChunkLayout(shard.seq_len, shard.world, shard.rank, C, c.block_q, c.block_k)
    n = layout.n_valid
    block_class = global_block_class(q[:, :, :n], k[:, :, :n], layout, c.topk, c.negligible, group)
    plan = FetchPlan.build(block_class, layout, fetch_negligible=c.linear_scope == "marginal", group=group)
    peers = shard.world - 1
    fetched = sum(plan.send_counts) * c.block_k * 2 * D * elem
    pooled = peers * B * h * layout.k_blocks_per_rank * D * 8
    totals = 2 * peers / shard.world * B * h * (D * D + D) * 4 if c.linear_scope != "none" else 0
    requests = 8 * (sum(plan.send_counts) + sum(plan.recv_counts))
    own = (min(layout.nk, (shard.rank + 1) * layout.k_blocks_per_rank)
           - min(layout.nk, shard.rank * layout.k_blocks_per_rank))
    remote = sum(plan.send_counts) - plan.send_counts[shard.rank]
    return dict(cp_fetch_bytes=fetched, cp_bytes=fetched + pooled + totals + requests,
                ring_bytes=peers * B * h * C * 2 * D * elem,
                fetched_block_fraction=sum(plan.send_counts) / (B * h * layout.nk),
                remote_block_fraction=remote / max(B * h * (layout.nk - own), 1),
                critical_block_fraction=float((block_class == CRITICAL).any(2).float().mean()) if n else 0.0)


def _run(config: BenchConfig, mode: str, locality: str, heads: int, device: torch.device,
         exchange: str = "fused", layout: str = "bhld", chunks: int = 1) -> dict | None:
    world = dist.get_world_size()
    if mode == "context" and world == 1:
        return None  # one rank: context parallel is plain SLA, already timed as ulysses P=1
    if mode == "ulysses" and (heads % world or (heads // world) % chunks or locality != config.locality[0]):
        return None
    groups = SequenceParallelGroups.build(SequenceParallelConfig(world, world if mode == "ulysses" else 1,
                                                                 overlap_chunks=chunks))
    attention = SparseLinearAttention(config.head_dim, config.topk, config.feature_map, config.block_q,
                                      config.block_k, negligible=config.negligible,
                                      linear_scope=config.linear_scope).to(device)
    torch.nn.init.normal_(attention.proj_l.weight, std=config.head_dim**-0.5)
    layer = SequenceParallelSLA(attention, groups, exchange)
    shard = SequenceShard.for_group(config.seq_len, groups.sp_group)
    full = _inputs(config, locality, heads, device)
    if layout == "blhd":
        local = [shard.split(x.transpose(1, 2).contiguous(), 1).detach().requires_grad_() for x in full]
    else:
        local = [shard.split(x, 2).detach().requires_grad_() for x in full]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = dict(mode=mode, exchange=exchange if mode == "ulysses" and world > 1 else "-", locality=locality,
               layout=layout, P=world, heads=heads, head_dim=config.head_dim, seq_len=config.seq_len,
               padded_len=shard.padded_len, overlap_chunks=chunks)
    row.update(_time_layer(layer, local, layout, config.seq_len, config, device))
    if device.type == "cuda":
        row["peak_mem_gib"] = _slowest(torch.cuda.max_memory_allocated(device) / 2**30, device)
    elem = local[0].element_size()
    if mode == "ulysses":
        # q, k, v and the output each cross the all-to-all once: (P - 1) / P of every local tensor leaves the rank.
        row["ulysses_bytes"] = 4 * (world - 1) * local[0].numel() * elem // world
        if world > 1:
            if config.profile is not None:
                trace = config.profile / f"{layout}-H{heads}-P{world}-{exchange}-c{chunks}-rank{dist.get_rank()}.json"
                row.update(_profile_nccl(layer, local, layout, config.seq_len, device, trace))
            row.update(_exchange_alone(attention, groups, exchange, local, layout, config))
            row["exchange_gbps"] = 2 * row["ulysses_bytes"] / row["exchange_ms"] / 1e6
    else:
        sizes = _context_bytes(layer, [x.detach() for x in _layer_inputs(local, layout)], shard, groups.sp_group)
        for key, value in sizes.items():
            t = torch.tensor(float(value), device=device, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            row[key] = t.item()
    return row


def _worker(rank: int, world: int, port: int, config: BenchConfig, queue) -> None:
    device = torch.device("cpu") if config.cpu else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if config.cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        rows = [_run(config, mode, locality, heads, device, exchange, layout, chunks)
                for locality in config.locality for layout in config.input_layouts for heads in config.heads
                for mode in config.modes
                for exchange in (config.exchanges if mode == "ulysses" and world > 1 else config.exchanges[:1])
                for chunks in (config.overlap_chunks if (mode, exchange) == ("ulysses", "fused") and world > 1
                               else [1])]
        if rank == 0:
            queue.put([r for r in rows if r is not None])
        dist.barrier()  # rank 0 hosts the store: no exit while others may still use it
    finally:
        dist.destroy_process_group()
    # A finished rank leaves without the interpreter's teardown: torch 2.13's gloo threads, destroyed during it, aborted
    # 2 of 6 CPU runs of this benchmark's tests ("terminate called without an active exception", SIGABRT, in a thread
    # with no Python frame) after every row was made and sent. Forked children (tests/parallel) already leave this way
    # (multiprocessing ends them with os._exit); spawned ones run the teardown. What a rank had to say is in the queue.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(config: BenchConfig, world: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), config, queue), nprocs=world, join=True,
                       start_method="spawn")
    return queue.get()


def _key(row: dict) -> tuple[int, str]:
    """What a row's P = 1 reference shares with it: the head count and the input layout (rows written before the
    layout was recorded had contiguous inputs)."""
    return row["heads"], row.get("layout", "bhld")


def _single_rank_ms(rows: list[dict]) -> dict[tuple[int, str], float]:
    return {_key(r): r["fwd_bwd_ms"] for r in rows if r["mode"] == "ulysses" and r["P"] == 1}


def add_efficiency(rows: list[dict]) -> None:
    """Ulysses strong-scaling efficiency T(1) / (P T(P)) per head count and input layout."""
    base = _single_rank_ms(rows)
    for r in rows:
        if r["mode"] == "ulysses" and _key(r) in base:
            r["efficiency"] = base[_key(r)] / (r["P"] * r["fwd_bwd_ms"])


def add_predictions(rows: list[dict], cost: SPCostModel | None = None) -> None:
    """Context rows: the fwd+bwd time sla_dist.parallel.layout predicts, P = 1 time / P plus the exchange at the
    measured fetched fraction (the fraction of all key blocks: what the pair work scales with)."""
    cost = cost or SPCostModel()
    base = _single_rank_ms(rows)
    for r in rows:
        if r["mode"] == "context" and _key(r) in base:
            shape = _shape(r)
            extra = exchange_seconds(shape, 1, r["P"], r["fetched_block_fraction"], cost)
            r["predicted_fwd_bwd_ms"] = base[_key(r)] / r["P"] + 1e3 * extra


def fit_context_cost(rows: list[dict], latency_s: float, bytes_per_s: float) -> SPCostModel:
    """The cost model with ``pair_seconds`` fitted (least squares) to the measured context rows: what each row's
    time exceeds the P = 1 time / P and the link's share by, over its (head, query block, key block) pairs."""
    link = SPCostModel(latency_s, bytes_per_s, 0.0)
    base = _single_rank_ms(rows)
    excess, pairs = [], []
    for r in rows:
        if r["mode"] == "context" and _key(r) in base:
            shape, f = _shape(r), r["fetched_block_fraction"]
            excess.append((r["fwd_bwd_ms"] - base[_key(r)] / r["P"]) / 1e3 - exchange_seconds(shape, 1, r["P"], f,
                                                                                                  link))
            pairs.append(context_pairs(shape, 1, r["P"], f))
    if not pairs:
        raise ValueError("no context-parallel row with a P = 1 Ulysses row of the same heads to fit to")
    pair_seconds = max(sum(e * p for e, p in zip(excess, pairs)) / sum(p * p for p in pairs), 0.0)
    return SPCostModel(latency_s, bytes_per_s, pair_seconds)


def _shape(row: dict, head_dim: int = 128) -> AttentionShape:
    return AttentionShape(row["heads"], row["seq_len"], row.get("head_dim", head_dim))


def table(rows: list[dict]) -> str:
    head = ("| mode | exchange | inputs | P | H | chunks | fwd ms | fwd+bwd ms | predicted ms | Ulysses eff. "
            "| peak GiB "
            "| bytes/rank fwd (MiB) | exchange ms | exch. GB/s | a2a GB/s | dense ring (MiB) | fetched blocks "
            "| remote fetched | critical only | NCCL ms | NCCL exposed ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    pct = lambda r, key: f"{100 * r[key]:.1f} %" if key in r else "-"  # noqa: E731
    for r in rows:
        sent = r.get("ulysses_bytes", r.get("cp_bytes", 0)) / 2**20
        ring = f"{r['ring_bytes'] / 2**20:.1f}" if "ring_bytes" in r else "-"
        eff = f"{100 * r['efficiency']:.0f} %" if "efficiency" in r else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        pred = f"{r['predicted_fwd_bwd_ms']:.1f}" if "predicted_fwd_bwd_ms" in r else "-"
        exch = (f"{r['exchange_ms']:.2f} | {r['exchange_gbps']:.0f} | {r['a2a_gbps']:.0f}" if "exchange_ms" in r
                else "- | - | -")
        chunks = r.get("overlap_chunks", 1) if r.get("exchange") == "fused" else "-"
        nccl = f"{r['nccl_ms']:.2f} | {r['nccl_exposed_ms']:.2f}" if "nccl_ms" in r else "- | -"
        lines.append(f"| {r['mode']} | {r.get('exchange', '-')} | {r.get('locality', 'iid')} {_key(r)[1]} "
                     f"| {r['P']} "
                     f"| {r['heads']} | {chunks} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {pred} | {eff} | {mem} "
                     f"| {sent:.1f} | {exch} | {ring} "
                     f"| {pct(r, 'fetched_block_fraction')} | {pct(r, 'remote_block_fraction')} "
                     f"| {pct(r, 'critical_block_fraction')} | {nccl} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--heads", type=int, nargs="+", default=defaults.heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--sizes", type=int, nargs="+", default=defaults.sizes)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=defaults.modes)
    parser.add_argument("--exchange", nargs="+", choices=EXCHANGES, default=defaults.exchanges,
                        help="Ulysses all-to-alls to time side by side (default: fused)")
    parser.add_argument("--overlap-chunks", type=int, nargs="+", default=defaults.overlap_chunks,
                        help="chunks of each rank's heads to pipeline the fused exchange in, side by side "
                        "(default: 1, no pipelining)")
    parser.add_argument("--topk", type=float, default=defaults.topk)
    parser.add_argument("--negligible", type=float, default=defaults.negligible)
    parser.add_argument("--block-q", type=int, default=defaults.block_q)
    parser.add_argument("--block-k", type=int, default=defaults.block_k)
    parser.add_argument("--feature-map", default=defaults.feature_map)
    parser.add_argument("--linear-scope", default=defaults.linear_scope)
    parser.add_argument("--locality", nargs="+", choices=LOCALITIES, default=defaults.locality,
                        help="q / k sources (any but iid set --seq-len to the --grid's T H W)")
    add_locality_arguments(parser)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--iters", type=int, default=defaults.iters)
    parser.add_argument("--cpu", action="store_true", help="CPU processes with gloo instead of GPUs with NCCL")
    parser.add_argument("--input-layout", nargs="+", choices=LAYOUTS, default=defaults.input_layouts,
                        help="memory orders of the inputs to time: bhld contiguous [B, H, L, D] (default), blhd the "
                        "model's")
    parser.add_argument("--profile", type=Path, default=None, help="GPUs: profile one more step of every Ulysses "
                        "row at P > 1, keep the traces in this folder, report NCCL's kernel time and its exposed part")
    parser.add_argument("--tiny", action="store_true", help="a small problem (1000 tokens, 4 heads, D 64, P 1 and "
                        "2, one timed iteration) for a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (default: "
                        "benchmarks/results/<date>-sequence-parallel-<card>)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_len, args.heads, args.head_dim, args.sizes = 1000, [4], 64, [1, 2]
        args.warmup, args.iters, args.topk, args.grid = 1, 1, 0.2, (4, 16, 16)
    inputs = locality_config(args)
    if set(args.locality) - {"iid"}:
        args.seq_len = inputs.seq_len
    config = BenchConfig(args.seq_len, args.heads, args.head_dim, args.sizes, args.modes, args.exchange, args.topk,
                         args.negligible, args.block_q, args.block_k, args.feature_map, args.linear_scope,
                         args.locality, inputs, args.warmup, args.iters, args.cpu, args.input_layout,
                         args.overlap_chunks, args.profile)
    if not config.cpu and torch.cuda.device_count() < max(config.sizes):
        raise ValueError(f"sizes={config.sizes} need {max(config.sizes)} GPUs; {torch.cuda.device_count()} visible "
                         f"(use --cpu for a gloo run)")
    card = "cpu" if config.cpu else torch.cuda.get_device_name(0)
    print(f"{card}: SLA layer, {config.seq_len} tokens, inputs {config.locality}, heads {config.heads}, "
          f"D {config.head_dim}, "
          f"{config.dtype}, topk {config.topk}, sizes {config.sizes}, exchanges {config.exchanges}, "
          f"overlap chunks {config.overlap_chunks}, "
          f"input layouts {config.input_layouts}", flush=True)

    rows = []
    for world in config.sizes:
        rows += run_world(config, world)
        print(f"P={world} done", flush=True)
    add_efficiency(rows)
    add_predictions(rows)

    text = table(rows)
    settings = asdict(config, dict_factory=lambda items: {k: str(v) if isinstance(v, Path) else v for k, v in items})
    save_results("sequence-parallel", card, dict(config=settings, dtype=str(config.dtype)), rows,
                 "Sequence-parallel SLA",
                 f"One SLA layer, {config.seq_len} tokens, D {config.head_dim}, {config.dtype}, {settings}. "
                 f"Times: median over {config.iters} iterations of the slowest rank. Bytes: forward, received per "
                 f"rank (slowest rank); 'dense ring' is what passing every kv chunk around would move. Fetched "
                 f"blocks (slowest rank): of all key blocks, of the other ranks' key blocks, and of all key blocks "
                 f"if only the critical lists were fetched (linear_scope 'marginal' also fetches the negligible "
                 f"ones). Predicted: sla_dist.parallel.layout's model from the P = 1 time and the fetched fraction. "
                 f"Exchange: the Ulysses layer's fwd+bwd with SLA replaced by a pass-through, its bytes to other "
                 f"ranks per second, and one bare all_to_all_single of the q, k, v volume.",
                 text, out=args.out, tiny=args.tiny)
    print(text)


if __name__ == "__main__":
    main()
