"""CUDA time of the SLA dK/dV kernel per program order (SLA_DIST_DKDV_ORDER), on i.i.d. and skewed block maps.

    python benchmarks/time_bwd_kernel.py [--orders natural lpt lpt-head long-first] [--L 32768 32760]
        [--D 128 64] [--attracted 0 0.1 0.3 1] [--hot 0.01] [--calls 20]
    python benchmarks/time_bwd_kernel.py --tiny     # CPU smoke test in the Triton interpreter (no timings)

dK/dV runs one program per (key block j, head): program j walks the query blocks that chose j as critical, so its
time grows with that list's length q_num_blocks. Every query block lists the same number of key blocks, but a key
block may be chosen by many or by few; i.i.d. inputs give near-uniform lengths, attention with keys that attract
many queries gives a few long programs, and when those start late the launch ends on a tail of them.

Inputs (per head, seeded): q, k, v i.i.d. N(0, 1); ``--hot`` is the fraction of key blocks made attractive (their
keys, and the queries of a fraction ``--attracted`` of the query blocks, get a shared random direction of norm
``--strength`` added, so those query blocks put every hot key block on their critical lists; 0 attracted: the i.i.d.
case). The block map is predicted from these q, k as the layer does (topk, negligible, BQ 128 / BK 64); then
``--calls`` forward+backward passes of ``sparse_linear_attention`` (bf16, proj_l in the forward's epilogue, linear
scope marginal) run per order under torch.profiler and the table gives the mean CUDA time of `_bwd_dkdv_kernel` per
call. Columns: the lengths' max / mean over all programs; ``sim``: the launch's length in block_map_stats.py's
list-scheduling model (each program ``--fixed`` + its length in units of one listed query block, the GPU's ``--sms``
SMs, one program per SM, taking the next program in issue order whenever one finishes) in this order, relative to
the perfect balance (total work / SMs); ``|dk|``: the largest difference of dK and dV from the first order's (0: the orders agree bit for bit).
Autotuning follows SLA_DIST_AUTOTUNE as usual (each order is tuned on its own; SLA_DIST_AUTOTUNE=0 times the fixed
launch setting).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from block_map_stats import grid_imbalance  # this script's folder is on sys.path when it runs

DKDV_ORDER_ENV = "SLA_DIST_DKDV_ORDER"  # sla_dist.kernels.configs.DKDV_ORDER_ENV
KERNEL = "_bwd_dkdv_kernel"
H200_SMS = 132


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
    flat = counts.flatten()
    return grid_imbalance(flat if order is None else flat[order.to(flat.device)], sms, fixed)


def kernel_us(step, calls: int, device: str) -> float | None:
    """Mean CUDA time of the dK/dV kernel per ``step()`` in microseconds; None off CUDA (the interpreter)."""
    if device != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if e.key.startswith(KERNEL)) / calls


def time_case(args, L: int, D: int, attracted: float) -> None:
    from sla_dist.kernels.block_map import predict_block_map, transposed_lists
    from sla_dist.kernels.op import dkdv_program_order, sparse_linear_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v, g = skewed_inputs(L, args.H, D, hot=args.hot, attracted=attracted, strength=args.strength,
                               block_q=args.block_q, block_k=args.block_k, device=args.device, dtype=args.dtype,
                               generator=gen)
    w = (torch.randn(D, D, generator=gen) * D**-0.5).to(args.device)
    b = (torch.randn(D, generator=gen) * 0.1).to(args.device)
    block_map = predict_block_map(q.detach(), k.detach(), topk=args.topk, negligible=args.negligible,
                                  block_q=args.block_q, block_k=args.block_k)
    counts = transposed_lists(block_map.block_class)[0].float()
    skew = float(counts.max() / counts.mean())

    def step():
        for t in (q, k, v):
            t.grad = None
        sparse_linear_attention(q, k, v, block_map, w, b).backward(g)

    reference = None
    for order in args.orders:
        os.environ[DKDV_ORDER_ENV] = order
        step()  # compiles (and tunes) this order outside the profile
        grads = [t.grad.float() for t in (k, v)]
        reference = grads if reference is None else reference
        diff = max((x - r).abs().max().item() for x, r in zip(grads, reference))
        us = kernel_us(step, args.calls, args.device)
        sim = simulated_tail(counts, dkdv_program_order(counts.int(), order), args.sms, args.fixed)
        timing = f"{us:>10.1f}" if us is not None else f"{'n/a':>10}"
        print(f"{L:>6} {D:>4} {attracted:>9.2f} {skew:>8.2f} {order:9} {timing} {sim:>6.3f} {diff:>9.2e}",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", nargs="+", default=["natural", "lpt", "lpt-head", "long-first"])
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
    args = parser.parse_args(argv)
    args.device, args.dtype = "cuda", torch.bfloat16
    if args.tiny:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel is defined
            args.device = "cpu"
        args.L, args.H, args.D, args.block_q, args.calls, args.sms = [459], 2, [32], 64, 1, 4
        args.dtype, args.hot, args.topk = torch.float32, 0.15, 0.25
    print(f"{'L':>6} {'D':>4} {'attracted':>9} {'max/mean':>8} {'order':9} {'kernel us':>10} {'sim':>6} "
          f"{'|dk|':>9}")
    for L in args.L:
        for D in args.D:
            for attracted in args.attracted:
                time_case(args, L, D, attracted)


if __name__ == "__main__":
    main()
