"""CUDA time of the SLA dK/dV kernel per program order (SLA_DIST_DKDV_ORDER) and with long lists split
(SLA_DIST_DKDV_SPLIT=long), on i.i.d., skewed and DiT block maps.

    python benchmarks/time_bwd_kernel.py [--orders natural lpt lpt-head long-first split:lpt-head ...]
        [--L 32768 32760] [--D 128 64] [--attracted 0 0.1 0.3 1] [--hot 0.01] [--calls 20]
        [--inputs synthetic dit] [DiT options of locality_inputs.py: --grid 21,30,52 --dit-model wan2.1-1.3b ...]
    python benchmarks/time_bwd_kernel.py --tiny     # CPU smoke test in the Triton interpreter (no timings)

dK/dV runs one program per (key block, head): program j walks the query blocks that chose j as critical, so its
time grows with that list's length q_num_blocks. Every query block lists the same number of key blocks, but a key
block may be chosen by many or by few; i.i.d. inputs give near-uniform lengths, attention with keys that attract
many queries gives a few long programs, and when those start late the launch ends on a tail of them. A variant
``split:<order>`` splits the long lists over extra programs (kernels/dkdv_plan.py), in that order.

Inputs (per head, seeded): 'synthetic', q, k, v i.i.d. N(0, 1); ``--hot`` is the fraction of key blocks made
attractive (their keys, and the queries of a fraction ``--attracted`` of the query blocks, get a shared random
direction of norm ``--strength`` added, so those query blocks put every hot key block on their critical lists; 0
attracted: the i.i.d. case). 'dit': q, k entering a random-init VideoDiT's self-attention (locality_inputs.py's
'dit' source over ``--grid``, D 128; v and the gradient i.i.d.), at the grid's length. The block map is predicted
from these q, k as the layer does (topk, negligible, BQ 128 / BK 64); then ``--calls`` forward+backward passes of
``sparse_linear_attention`` (bf16, proj_l in the forward's epilogue, linear scope marginal) run per variant under
torch.profiler and the table gives the mean CUDA time per call of `_bwd_dkdv_kernel` ("dkdv us") and of the split's
plan and combine kernels ("split us"; the orders' own argsort kernels are not counted). Columns: the lengths' max /
mean over all programs; ``sim``: the launch's length in block_map_stats.py's list-scheduling model (each program
``--fixed`` + its length in units of one listed query block, the GPU's ``--sms`` SMs, one program per SM, taking
the next program in issue order whenever one finishes) in this variant's order, relative to the whole lists'
perfect balance (total work / SMs); ``|dk|``: the largest difference of dK and dV from the first variant's (0: the
orders agree bit for bit; the split's float32 partial sums differ in the last bits). Autotuning follows
SLA_DIST_AUTOTUNE as usual (each variant is tuned on its own; SLA_DIST_AUTOTUNE=0 times the fixed launch setting).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile


DKDV_ORDER_ENV = "SLA_DIST_DKDV_ORDER"  # sla_dist.kernels.configs.DKDV_ORDER_ENV
DKDV_SPLIT_ENV = "SLA_DIST_DKDV_SPLIT"  # sla_dist.kernels.configs.DKDV_SPLIT_ENV
KERNEL = "_bwd_dkdv_kernel"
SPLIT_KERNELS = ("_dkdv_split_plan_kernel", "_dkdv_combine_kernel")
H200_SMS = 132
SPLIT_PREFIX = "split:"


def skewed_inputs(L: int, H: int, D: int, *, hot: float, attracted: float, strength: float, block_q: int,
                  block_k: int, device: str, dtype: torch.dtype, generator: torch.Generator):
    """q, k, v [1, H, L, D] (requiring grad) and an output gradient: i.i.d. N(0, 1), plus per head a shared random
    direction of norm ``strength`` on the keys of a random ``hot`` fraction of key blocks (at least one when
    ``attracted`` > 0) and on the queries of a random ``attracted`` fraction of query blocks."""
    q, k, v, g = (torch.randn(1, H, L, D, generator=generator) for _ in range(4))
    nq, nk = -(-L // block_q), -(-L // block_k)
    if attracted > 0:
        for h in range(H):
            u = torch.randn(D, generator=generator)
            u *= strength / u.norm()
            for blocks, block, n, x in ((_pick(nk, hot, generator), block_k, nk, k),
                                        (_pick(nq, attracted, generator), block_q, nq, q)):
                rows = (blocks[:, None] * block + torch.arange(block)).flatten()
                x[0, h, rows[rows < L]] += u
    return [t.to(device, dtype).requires_grad_(i < 3) for i, t in enumerate((q, k, v, g))]


def _pick(n: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A random ``fraction`` of range(n), at least one."""
    return torch.randperm(n, generator=generator)[: max(1, round(fraction * n))]


def simulated_tail(counts: torch.Tensor, order: torch.Tensor | None, sms: int, fixed: float) -> float:
    """block_map_stats.grid_imbalance of the dK/dV programs [..., Nk] issued in the launcher's ``order`` (None:
    natural), each costing ``fixed`` + its list length: the launch's length over perfect balance (total / sms)."""
    from block_map_stats import grid_imbalance  # this script's folder is on sys.path when it runs

    flat = counts.flatten()
    return grid_imbalance(flat if order is None else flat[order.to(flat.device)], sms, fixed)


def kernel_us(step, calls: int, device: str) -> tuple[float, float] | None:
    """Mean CUDA time per ``step()`` in microseconds of the dK/dV kernel and of the split's plan and combine
    kernels; None off CUDA (the interpreter)."""
    if device != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    dkdv = sum(e.device_time_total for e in events if e.key.startswith(KERNEL))
    split = sum(e.device_time_total for e in events if e.key.startswith(SPLIT_KERNELS))
    return dkdv / calls, split / calls


def variant(name: str) -> tuple[str, bool]:
    """(order, split) of a ``--orders`` entry: an order of configs.DKDV_ORDERS, or ``split:<order>``."""
    return (name[len(SPLIT_PREFIX):], True) if name.startswith(SPLIT_PREFIX) else (name, False)


def time_case(args, L: int, D: int, attracted: float | None) -> None:
    """One table row per variant; ``attracted`` None: the DiT's q, k (args' locality options)."""
    from block_map_stats import split_imbalance
    from locality_inputs import locality_qkv
    from sla_dist.kernels.block_map import predict_block_map, transposed_lists
    from sla_dist.kernels.dkdv_plan import dkdv_program_order
    from sla_dist.kernels.op import sparse_linear_attention

    gen = torch.Generator().manual_seed(0)
    if attracted is None:
        q, k, v = (x.to(args.dtype) for x in locality_qkv("dit", args.locality, args.H, D, torch.device(args.device)))
        g = torch.randn_like(q)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    else:
        q, k, v, g = skewed_inputs(L, args.H, D, hot=args.hot, attracted=attracted, strength=args.strength,
                                   block_q=args.block_q, block_k=args.block_k, device=args.device, dtype=args.dtype,
                                   generator=gen)
    w = (torch.randn(D, D, generator=gen) * D**-0.5).to(args.device)
    b = (torch.randn(D, generator=gen) * 0.1).to(args.device)
    block_map = predict_block_map(q.detach(), k.detach(), topk=args.topk, negligible=args.negligible,
                                  block_q=args.block_q, block_k=args.block_k)
    counts = transposed_lists(block_map.block_class)[0].cpu()
    skew = float(counts.float().max() / counts.float().mean())

    def step():
        for t in (q, k, v):
            t.grad = None
        sparse_linear_attention(q, k, v, block_map, w, b).backward(g)

    reference = None
    label = "dit" if attracted is None else f"{attracted:.2f}"
    for name in args.orders:
        order, split = variant(name)
        os.environ[DKDV_ORDER_ENV] = order
        os.environ[DKDV_SPLIT_ENV] = "long" if split else "off"
        step()  # compiles (and tunes) this variant outside the profile
        grads = [t.grad.float() for t in (k, v)]
        reference = grads if reference is None else reference
        diff = max((x - r).abs().max().item() for x, r in zip(grads, reference))
        times = kernel_us(step, args.calls, args.device)
        if split:
            sim = split_imbalance(counts, args.sms, args.fixed, order)
        else:
            sim = simulated_tail(counts, dkdv_program_order(counts, order), args.sms, args.fixed)
        timing = f"{times[0]:>10.1f} {times[1]:>8.1f}" if times is not None else f"{'n/a':>10} {'n/a':>8}"
        print(f"{L:>6} {D:>4} {label:>9} {skew:>8.2f} {name:16} {timing} {sim:>6.3f} {diff:>9.2e}", flush=True)
    for env in (DKDV_ORDER_ENV, DKDV_SPLIT_ENV):
        os.environ.pop(env, None)


def main(argv: list[str] | None = None) -> None:
    smoke = argparse.ArgumentParser(add_help=False)
    smoke.add_argument("--tiny", action="store_true")
    if smoke.parse_known_args(argv)[0].tiny and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before sla_dist is imported: it defines kernels
    from locality_inputs import add_locality_arguments, locality_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", nargs="+", default=["natural", "lpt", "lpt-head", "long-first"],
                        help="orders (SLA_DIST_DKDV_ORDER), or split:<order> for the split launch in that order")
    parser.add_argument("--inputs", nargs="+", choices=("synthetic", "dit"), default=["synthetic"])
    parser.add_argument("--L", type=int, nargs="+", default=[32768, 32760])
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--attracted", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0],
                        help="fractions of query blocks drawn to the hot key blocks (0: i.i.d. inputs)")
    parser.add_argument("--hot", type=float, default=0.01, help="fraction of key blocks made attractive, per head")
    parser.add_argument("--strength", type=float, default=4.0, help="norm of the shared direction")
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--negligible", type=float, default=0.1)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--sms", type=int, default=H200_SMS, help="SMs in the list-scheduling model")
    parser.add_argument("--fixed", type=float, default=2.0,
                        help="a program's fixed cost in the model, in listed query blocks")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: L 459, H 2, D 32, BQ 64, fp32, one call; on CPU in the Triton interpreter")
    add_locality_arguments(parser)
    args = parser.parse_args(argv)
    for name in args.orders:
        order, split = variant(name)
        _check_variant(name, order, split)
    args.device, args.dtype = "cuda", torch.bfloat16
    if args.tiny:
        if not torch.cuda.is_available():
            args.device = "cpu"
        args.L, args.H, args.D, args.block_q, args.calls, args.sms = [459], 2, [32], 64, 1, 4
        args.dtype, args.hot, args.topk = torch.float32, 0.15, 0.25
    args.locality = locality_config(args)
    print(f"{'L':>6} {'D':>4} {'attracted':>9} {'max/mean':>8} {'variant':16} {'dkdv us':>10} {'split us':>8} "
          f"{'sim':>6} {'|dk|':>9}")
    if "synthetic" in args.inputs:
        for L in args.L:
            for D in args.D:
                for attracted in args.attracted:
                    time_case(args, L, D, attracted)
    if "dit" in args.inputs:
        time_case(args, args.locality.seq_len, 128, None)


def _check_variant(name: str, order: str, split: bool) -> None:
    """A ValueError naming ``name`` unless it is an order, or split:<order> for an order the split takes."""
    from sla_dist.kernels.configs import DKDV_ORDERS
    from sla_dist.kernels.dkdv_plan import SPLIT_ORDERS

    if order not in (SPLIT_ORDERS if split else DKDV_ORDERS):
        raise ValueError(f"--orders {name!r}: give one of {DKDV_ORDERS} or split:<one of {tuple(SPLIT_ORDERS)}>")


if __name__ == "__main__":
    main()
