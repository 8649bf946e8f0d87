"""How evenly the SLA kernels' work spreads over their programs, for the block map a layer predicts from q, k.

The forward and dQ kernels run one program per (query block, head), each walking its query block's critical list:
kv_num_blocks = n_c key blocks for every query block, balanced by construction. dK/dV runs one program per (key
block, head), each walking the query blocks that chose its key block (q_num_blocks, the transposed lists), and
that count follows the inputs: on i.i.d. q, k every key block is chosen about equally often (n_c Nq / Nk times on
average), while inputs with structure can make a few key blocks critical for most query blocks. A kernel lasts at
least as long as its longest program, and long programs launched late leave the rest of the GPU idle.

Per head: q_num_blocks mean, max, max / mean, the share of dK/dV work in the 1 % longest lists, the key blocks no
query block chose; kv_num_blocks min and max. Per layer (every head, one grid): ``dkdv_imbalance``, the dK/dV grid's
time in a list-scheduling model over its time if perfectly balanced (total / slots): programs start in launch order
(key block fastest, then batch x head, as CUDA hands out a grid's blocks), each on the first of ``--slots`` free
slots (one program per SM: H200 132), and cost ``--overhead`` (loading K, V, storing dK, dV) plus one per query
block walked. It is the slowdown that the imbalance alone would give (with the partial last wave: equal programs
give ceil(waves) / waves); 1.0 is none. ``dkdv_longest_first`` is the same grid launched longest list first (what
a kernel that walked key blocks in that order would get); ``dkdv_long_first`` and ``dkdv_lpt_head`` launched in
those orders (SLA_DIST_DKDV_ORDER); ``dkdv_split`` the split launch (SLA_DIST_DKDV_SPLIT=long) in each order it
takes, over the whole lists' balanced time.

    PYTHONPATH=$PWD python benchmarks/block_map_stats.py --inputs iid field dit --grid 21,30,52 --tile 1,1,1 \\
        --dit-model wan2.1-1.3b --qk-init independent --latents gaussian      # bench_dit_step.py's model

q, k come from layer_inputs.py / locality_inputs.py ('iid' is layer_inputs' Gaussian q, k); the block map is
predicted as the layer predicts it (q, k cast to --dtype, then sla_dist's predict_block_map), on the CPU by
default.
"""

from __future__ import annotations

import argparse
import heapq
import math
import time

import torch

from layer_inputs import sla_layer_inputs  # this script's folder is on sys.path when it runs
from locality_inputs import LOCALITIES, add_locality_arguments, locality_config
from sla_dist.kernels.block_map import BlockMap, block_counts, predict_block_map
from sla_dist.kernels.dkdv_plan import SPLIT_ORDERS, dkdv_program_order, split_plan_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def list_stats(lengths: torch.Tensor) -> dict[str, float]:
    """Statistics of one head's list lengths [N] (q_num_blocks or kv_num_blocks)."""
    lengths = lengths.double()
    mean, longest = float(lengths.mean()), float(lengths.max())
    top = max(1, math.ceil(0.01 * lengths.numel()))
    total = float(lengths.sum())
    return dict(mean=mean, min=float(lengths.min()), max=longest, max_over_mean=longest / mean if mean else math.inf,
                top1pct_share=float(lengths.topk(top).values.sum()) / total if total else 0.0,
                empty=int((lengths == 0).sum()))


def grid_imbalance(lengths: torch.Tensor, slots: int, overhead: float) -> float:
    """Makespan of a grid whose programs, in launch order, walk ``lengths`` [P] blocks each (cost overhead +
    length), on ``slots`` slots each taking the next program when free, over the balanced total / slots."""
    _check_model(slots, overhead)
    costs = (lengths.double().flatten() + overhead).tolist()
    balanced = sum(costs) / slots
    return makespan(costs, slots) / balanced if balanced else 1.0


def split_imbalance(lengths: torch.Tensor, slots: int, overhead: float, order: str) -> float:
    """:func:`grid_imbalance` of the split dK/dV launch (SLA_DIST_DKDV_SPLIT=long) over the lists ``lengths``
    [..., Nk] of one launch's heads, its programs in the ``order`` the split plan gives them
    (sla_dist.kernels.dkdv_plan.split_plan_reference, ``slots`` SMs): a part costs overhead + its query blocks, an
    unused program nothing (it returns at once). Over the same balanced time as the whole lists', so the split's
    extra programs count as a loss; the combine launch after it is not modelled (PERF_NOTES 2026-12-01 sizes it)."""
    _check_model(slots, overhead)
    work = split_plan_reference(lengths, order, slots).work.double()
    costs = torch.where(work[:, 0] >= 0, work[:, 2] + overhead, 0.0).tolist()
    balanced = (float(lengths.double().sum()) + overhead * lengths.numel()) / slots
    return makespan(costs, slots) / balanced if balanced else 1.0


def makespan(costs: list[float], slots: int) -> float:
    """When the last of the programs of ``costs`` (in launch order) ends, each of ``slots`` slots taking the next
    program as soon as it is free."""
    free_at = [0.0] * min(slots, len(costs))
    for cost in costs:
        heapq.heappush(free_at, heapq.heappop(free_at) + cost)
    return max(free_at, default=0.0)


def _check_model(slots: int, overhead: float) -> None:
    if slots < 1 or overhead < 0:
        raise ValueError(f"slots={slots} must be >= 1 and overhead={overhead} >= 0")


def block_map_stats(block_map: BlockMap, slots: int = 132, overhead: float = 1.0) -> dict:
    """Per-head statistics of the dK/dV lists (q_num_blocks) and of the forward / dQ lists (kv_num_blocks), and the
    dK/dV grid's imbalance (:func:`grid_imbalance`, programs ordered as its launch: key block fastest; and longest
    list first)."""
    q_num, _ = block_map.transposed()
    B, H, nq, nk = block_map.shape
    heads = [dict(head=h, dkdv=list_stats(q_num[b, h]), fwd_dq=list_stats(block_map.kv_num_blocks[b, h]))
             for b in range(B) for h in range(H)]
    return dict(nq=nq, nk=nk, critical_fraction=block_map.critical_fraction(), heads=heads,
                dkdv_imbalance=grid_imbalance(q_num, slots, overhead),
                dkdv_longest_first=grid_imbalance(q_num.flatten().sort(descending=True).values, slots, overhead),
                dkdv_long_first=grid_imbalance(q_num.flatten()[dkdv_program_order(q_num, "long-first")], slots,
                                               overhead),
                dkdv_lpt_head=grid_imbalance(q_num.flatten()[dkdv_program_order(q_num, "lpt-head")], slots, overhead),
                dkdv_split={order: split_imbalance(q_num, slots, overhead, order) for order in SPLIT_ORDERS},
                fwd_dq_imbalance=grid_imbalance(block_map.kv_num_blocks, slots, overhead))


def layer_block_map(q: torch.Tensor, k: torch.Tensor, *, topk: float, negligible: float, block_q: int, block_k: int,
                    dtype: torch.dtype) -> BlockMap:
    """The block map an SLA layer computing in ``dtype`` predicts for q, k [B, H, L, D]."""
    return predict_block_map(q.to(dtype), k.to(dtype), topk=topk, negligible=negligible, block_q=block_q,
                             block_k=block_k)


def format_stats(name: str, stats: dict) -> str:
    """A markdown table: one row per head, then the layer's imbalance."""
    lines = [f"### {name}: Nq {stats['nq']}, Nk {stats['nk']}, critical fraction {stats['critical_fraction']:.4f}",
             "", "| head | q_num mean | max | max/mean | top 1 % share | empty | kv_num min | max |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in stats["heads"]:
        d, f = row["dkdv"], row["fwd_dq"]
        lines.append(f"| {row['head']} | {d['mean']:.2f} | {d['max']:.0f} | {d['max_over_mean']:.2f} | "
                     f"{d['top1pct_share']:.3f} | {d['empty']} | {f['min']:.0f} | {f['max']:.0f} |")
    worst = max(stats["heads"], key=lambda r: r["dkdv"]["max_over_mean"])["dkdv"]
    split = ", ".join(f"{order} {value:.3f}" for order, value in stats["dkdv_split"].items())
    lines += ["", f"dK/dV: worst head max/mean {worst['max_over_mean']:.2f}; grid imbalance (model) "
              f"{stats['dkdv_imbalance']:.3f}, longest first {stats['dkdv_longest_first']:.3f}, long-first "
              f"{stats['dkdv_long_first']:.3f}, lpt-head {stats['dkdv_lpt_head']:.3f}; split: {split}; "
              "forward / dQ grid "
              f"imbalance {stats['fwd_dq_imbalance']:.3f}"]
    return "\n".join(lines)


def summary_row(name: str, stats: dict) -> str:
    """One markdown row of :data:`SUMMARY_HEADER`: the worst head of each statistic, the layer's imbalances."""
    dkdv = [row["dkdv"] for row in stats["heads"]]
    return (f"| {name} | {dkdv[0]['mean']:.2f} | {max(d['max'] for d in dkdv):.0f} | "
            f"{max(d['max_over_mean'] for d in dkdv):.2f} | {max(d['top1pct_share'] for d in dkdv):.3f} | "
            f"{max(d['empty'] for d in dkdv)} | {stats['dkdv_imbalance']:.3f} | {stats['dkdv_longest_first']:.3f} | "
            f"{stats['dkdv_long_first']:.3f} | {stats['dkdv_lpt_head']:.3f} | "
            + " | ".join(f"{stats['dkdv_split'][order]:.3f}" for order in SPLIT_ORDERS)
            + f" | {stats['fwd_dq_imbalance']:.3f} |")


SUMMARY_HEADER = ("| inputs | q_num mean | max | max/mean | top 1 % share | empty | dK/dV imbalance | longest first "
                  "| long-first | lpt-head | " + " | ".join(f"split {order}" for order in SPLIT_ORDERS)
                  + " | fwd/dQ imbalance |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                  + "---:|" * len(SPLIT_ORDERS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", nargs="+", choices=LOCALITIES, default=["iid", "field", "dit"])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--negligible", type=float, default=0.10)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the layer's compute dtype")
    parser.add_argument("--slots", type=int, default=132, help="programs running at once (SMs x programs per SM)")
    parser.add_argument("--overhead", type=float, default=1.0,
                        help="a dK/dV program's fixed cost, in query-block steps")
    parser.add_argument("--device", default="cpu")
    add_locality_arguments(parser)
    args = parser.parse_args(argv)
    locality = locality_config(args)
    n_c, _ = block_counts(-(-locality.seq_len // args.block_k), args.topk, args.negligible)
    print(f"{locality.seq_len} tokens (grid {locality.grid}, tile {locality.tile}), {args.heads} heads of "
          f"{args.head_dim}, topk {args.topk} (n_c {n_c}), negligible {args.negligible}, blocks "
          f"({args.block_q}, {args.block_k}), {args.dtype}; dK/dV model: {args.slots} slots, overhead "
          f"{args.overhead}")
    rows = []
    for source in args.inputs:
        start = time.perf_counter()
        torch.manual_seed(locality.seed)
        _, q, k, _, _ = sla_layer_inputs(locality.seq_len, args.heads, args.head_dim, device=args.device,
                                         dtype=torch.float32, source=source, locality=locality, backend="reference")
        block_map = layer_block_map(q.detach(), k.detach(), topk=args.topk, negligible=args.negligible,
                                    block_q=args.block_q, block_k=args.block_k, dtype=DTYPES[args.dtype])
        stats = block_map_stats(block_map, args.slots, args.overhead)
        print(f"\n{format_stats(source, stats)}\n({time.perf_counter() - start:.1f} s)", flush=True)
        rows.append(summary_row(source, stats))
    print("\nWorst head of each statistic:\n\n" + "\n".join([SUMMARY_HEADER, *rows]))


if __name__ == "__main__":
    main()
