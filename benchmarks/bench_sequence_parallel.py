"""Sequence-parallel SLA: time per layer (forward + backward) over P = 1, 2, 4 ranks, and bytes each scheme moves.

For every head count and world size P (one process per GPU, spawned here; NCCL), one SLA layer runs on a sequence of
--seq-len tokens sharded over the P ranks:

    ulysses   DeepSpeed all-to-all (heads <-> sequence), SLA on the full sequence for H/P heads
    context   SLA-aware context parallel over P ranks (global block map, fetch of the needed kv blocks only)

It reports the median forward + backward time (slowest rank), the Ulysses strong-scaling efficiency
T(1) / (P T(P)), peak memory, and per-rank forward bytes: the Ulysses all-to-all volume, and for context parallel the
fetched kv blocks plus the pooled-sum gather and the linear totals' all-reduce, next to what a dense ring (every kv
chunk passed around) would move. ``--locality`` adds a smooth positional component to q and k, so that attention
prefers nearby tokens as in video DiTs (0: i.i.d. Gaussian inputs, the worst case for the fetch).

    python benchmarks/bench_sequence_parallel.py                 # GPUs: L = 131072, H = 12 and 24, D = 128, bf16
    python benchmarks/bench_sequence_parallel.py --tiny --cpu    # CPU / gloo smoke test of every code path

DeepSpeed's comm layer is initialised from torch.distributed (see sla_dist.parallel.groups.ensure_deepspeed_comm:
on CPU it skips DeepSpeed's shared-memory op build, which would otherwise take minutes).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from results_io import save_results
from sla_dist import SparseLinearAttention
from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups, SequenceParallelSLA, SequenceShard
from sla_dist.parallel.context import ChunkLayout, FetchPlan, global_block_class

MODES = ("ulysses", "context")


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
    topk: float = 0.05
    negligible: float = 0.10
    block_q: int = 128
    block_k: int = 64
    feature_map: str = "softmax"
    linear_scope: str = "marginal"
    locality: float = 0.0
    """Weight of the smooth positional component added to q and k."""
    warmup: int = 2
    iters: int = 5
    cpu: bool = False
    """Run on CPU processes with gloo (the SLA module then runs its dense reference: keep seq_len small)."""

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if self.seq_len < 1 or self.head_dim < 1 or min(self.heads) < 1 or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive: seq_len={self.seq_len}, heads={self.heads}, "
                             f"head_dim={self.head_dim}, sizes={self.sizes}")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError(f"iters={self.iters} must be >= 1 and warmup={self.warmup} >= 0")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.cpu else torch.bfloat16


def _inputs(config: BenchConfig, heads: int, device: torch.device) -> list[torch.Tensor]:
    """q, k, v [1, heads, seq_len, D] (the same on every rank), with the optional positional component."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, heads, config.seq_len, config.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device) for _ in range(3))
    if config.locality:
        # Random Fourier features of the token position: nearby tokens get similar q and k.
        pos = torch.arange(config.seq_len, device=device, dtype=torch.float32)[:, None]
        freq = torch.randn(1, config.head_dim // 2, generator=gen, device=device) / config.seq_len * 64
        pe = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], -1) * config.locality
        q, k = q + pe, k + pe
    return [x.to(config.dtype) for x in (q, k, v)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor(seconds, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _time_layer(layer: SequenceParallelSLA, local: list[torch.Tensor], seq_len: int, config: BenchConfig,
                device: torch.device) -> dict:
    grad = torch.randn_like(local[0])
    fwd, step = [], []
    for i in range(config.warmup + config.iters):
        for x in local:
            x.grad = None
        _sync(device)
        start = time.perf_counter()
        out = layer(*local, seq_len=seq_len)
        _sync(device)
        mid = time.perf_counter()
        out.backward(grad)
        _sync(device)
        end = time.perf_counter()
        if i >= config.warmup:
            fwd.append(_slowest(mid - start, device))
            step.append(_slowest(end - start, device))
    return dict(fwd_ms=1e3 * statistics.median(fwd), fwd_bwd_ms=1e3 * statistics.median(step))


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
    return dict(cp_fetch_bytes=fetched, cp_bytes=fetched + pooled + totals + requests,
                ring_bytes=peers * B * h * C * 2 * D * elem,
                fetched_block_fraction=sum(plan.send_counts) / (B * h * layout.nk))


def _run(config: BenchConfig, mode: str, heads: int, device: torch.device) -> dict | None:
    world = dist.get_world_size()
    if mode == "context" and world == 1:
        return None  # one rank: context parallel is plain SLA, already timed as ulysses P=1
    if mode == "ulysses" and heads % world:
        return None
    groups = SequenceParallelGroups.build(SequenceParallelConfig(world, world if mode == "ulysses" else 1))
    attention = SparseLinearAttention(config.head_dim, config.topk, config.feature_map, config.block_q,
                                      config.block_k, negligible=config.negligible,
                                      linear_scope=config.linear_scope).to(device)
    torch.nn.init.normal_(attention.proj_l.weight, std=config.head_dim**-0.5)
    layer = SequenceParallelSLA(attention, groups)
    shard = SequenceShard.for_group(config.seq_len, groups.sp_group)
    local = [shard.split(x, 2).detach().requires_grad_() for x in _inputs(config, heads, device)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = dict(mode=mode, P=world, heads=heads, seq_len=config.seq_len, padded_len=shard.padded_len)
    row.update(_time_layer(layer, local, config.seq_len, config, device))
    if device.type == "cuda":
        row["peak_mem_gib"] = _slowest(torch.cuda.max_memory_allocated(device) / 2**30, device)
    elem = local[0].element_size()
    if mode == "ulysses":
        # q, k, v and the output each cross the all-to-all once: (P - 1) / P of every local tensor leaves the rank.
        row["ulysses_bytes"] = 4 * (world - 1) * local[0].numel() * elem // world
    else:
        sizes = _context_bytes(layer, [x.detach() for x in local], shard, groups.sp_group)
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
        rows = [_run(config, mode, heads, device) for heads in config.heads for mode in config.modes]
        if rank == 0:
            queue.put([r for r in rows if r is not None])
        dist.barrier()  # rank 0 hosts the store: no exit while others may still use it
    finally:
        dist.destroy_process_group()


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


def add_efficiency(rows: list[dict]) -> None:
    """Ulysses strong-scaling efficiency T(1) / (P T(P)) per head count."""
    base = {r["heads"]: r["fwd_bwd_ms"] for r in rows if r["mode"] == "ulysses" and r["P"] == 1}
    for r in rows:
        if r["mode"] == "ulysses" and r["heads"] in base:
            r["efficiency"] = base[r["heads"]] / (r["P"] * r["fwd_bwd_ms"])


def table(rows: list[dict]) -> str:
    head = ("| mode | P | H | fwd ms | fwd+bwd ms | Ulysses eff. | peak GiB | bytes/rank fwd (MiB) | dense ring (MiB) "
            "| fetched blocks |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sent = r.get("ulysses_bytes", r.get("cp_bytes", 0)) / 2**20
        ring = f"{r['ring_bytes'] / 2**20:.1f}" if "ring_bytes" in r else "-"
        frac = f"{100 * r['fetched_block_fraction']:.1f} %" if "fetched_block_fraction" in r else "-"
        eff = f"{100 * r['efficiency']:.0f} %" if "efficiency" in r else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        lines.append(f"| {r['mode']} | {r['P']} | {r['heads']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {eff} "
                     f"| {mem} | {sent:.1f} | {ring} | {frac} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--heads", type=int, nargs="+", default=defaults.heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--sizes", type=int, nargs="+", default=defaults.sizes)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=defaults.modes)
    parser.add_argument("--topk", type=float, default=defaults.topk)
    parser.add_argument("--negligible", type=float, default=defaults.negligible)
    parser.add_argument("--block-q", type=int, default=defaults.block_q)
    parser.add_argument("--block-k", type=int, default=defaults.block_k)
    parser.add_argument("--feature-map", default=defaults.feature_map)
    parser.add_argument("--linear-scope", default=defaults.linear_scope)
    parser.add_argument("--locality", type=float, default=defaults.locality)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--iters", type=int, default=defaults.iters)
    parser.add_argument("--cpu", action="store_true", help="CPU processes with gloo instead of GPUs with NCCL")
    parser.add_argument("--tiny", action="store_true", help="a small problem (1000 tokens, 4 heads, D 64, P 1 and "
                        "2, one timed iteration) for a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (default: "
                        "benchmarks/results/<date>-sequence-parallel-<card>)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_len, args.heads, args.head_dim, args.sizes = 1000, [4], 64, [1, 2]
        args.warmup, args.iters, args.topk = 1, 1, 0.2
    config = BenchConfig(args.seq_len, args.heads, args.head_dim, args.sizes, args.modes, args.topk, args.negligible,
                         args.block_q, args.block_k, args.feature_map, args.linear_scope, args.locality, args.warmup,
                         args.iters, args.cpu)
    if not config.cpu and torch.cuda.device_count() < max(config.sizes):
        raise ValueError(f"sizes={config.sizes} need {max(config.sizes)} GPUs; {torch.cuda.device_count()} visible "
                         f"(use --cpu for a gloo run)")
    card = "cpu" if config.cpu else torch.cuda.get_device_name(0)
    print(f"{card}: SLA layer, {config.seq_len} tokens, heads {config.heads}, D {config.head_dim}, "
          f"{config.dtype}, topk {config.topk}, sizes {config.sizes}", flush=True)

    rows = []
    for world in config.sizes:
        rows += run_world(config, world)
        print(f"P={world} done", flush=True)
    add_efficiency(rows)

    text = table(rows)
    save_results("sequence-parallel", card, dict(config=asdict(config), dtype=str(config.dtype)), rows,
                 "Sequence-parallel SLA",
                 f"One SLA layer, {config.seq_len} tokens, D {config.head_dim}, {config.dtype}, {asdict(config)}. "
                 f"Times: median over {config.iters} iterations of the slowest rank. Bytes: forward, received per "
                 f"rank (slowest rank); 'dense ring' is what passing every kv chunk around would move.", text,
                 out=args.out, tiny=args.tiny)
    print(text)


if __name__ == "__main__":
    main()
