"""Where an SLA layer's time goes on one GPU: CUDA kernels of a forward and of a forward+backward, by total time.

    python benchmarks/profile_sla.py [--L 32768 8192] [--H 12] [--D 128] [--topk 0.05] [--block-q 128]
                                     [--linear-scope marginal none]

Each table lists CUDA time per kernel and, in its last lines, the CPU time of the calls: at short sequences the
layer is bound by launching work, not by the GPU. ``--host N`` adds the N Python functions with the most own time
over 20 forward+backward calls (cProfile): where the host time goes. ``--linear-scope marginal none`` profiles the
layer with and without the linear branch, splitting the forward kernel's time into its FlashAttention loop and its
linear epilogue. After each profile, the share of its CUDA time outside the sparse-branch kernels (glue_fraction.py:
issue #11's "glue <= 15 %", with the backward pre-pass counted as glue and as sparse branch). ``--inputs``,
``--layout``, ``--negligible`` and the token-grid options are time_layer.py's: one
profile per value, on model-like inputs (layer_inputs.py).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

# this script's folder is on sys.path when it runs
from glue_fraction import glue_lines, kernel_times
from layer_inputs import add_input_arguments, input_lengths, input_settings, layer_gradients, sla_layer_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, nargs="+", default=[32768])
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--linear-scope", nargs="+", default=["marginal"], choices=("marginal", "all", "none"),
                        help="the layer's linear_scope; several: one profile each")
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--host", type=int, default=0, metavar="N", help="also list the N Python functions with the "
                        "most own time (cProfile)")
    add_input_arguments(parser)
    args = parser.parse_args()
    for L in input_lengths(args, args.L):
        for source, layout, inputs in input_settings(args):
            for scope in args.linear_scope:
                profile_layer(L, scope, f"inputs={source} layout={layout}", inputs, args)


def profile_layer(L: int, linear_scope: str, setting: str, inputs: dict, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    m, q, k, v, g = sla_layer_inputs(L, args.H, args.D, topk=args.topk, block_q=args.block_q,
                                     linear_scope=linear_scope, **inputs)
    def train_step():
        layer_gradients(m, m(q, k, v), q, k, v, g)  # returned, not accumulated, as a training step's (see there)

    for _ in range(3):  # compile and warm up
        train_step()
    torch.cuda.synchronize()

    for name, step in (("forward", lambda: m(q, k, v)), ("forward+backward", train_step)):
        with torch.no_grad() if name == "forward" else torch.enable_grad():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
        print(f"\n== {name}, L={L} H={args.H} D={args.D} topk={args.topk} BQ={args.block_q} "
              f"linear_scope={linear_scope} negligible={m.config.negligible} {setting} (5 iterations)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        print(glue_lines(f"{name}, L={L}", kernel_times(prof.key_averages(), 5)))
    if args.host:
        host = cProfile.Profile()
        host.enable()
        for _ in range(20):
            train_step()
        host.disable()
        torch.cuda.synchronize()
        print(f"\n== host, L={L}: 20 forward+backward calls, top {args.host} functions by own time")
        pstats.Stats(host).sort_stats("tottime").print_stats(args.host)


if __name__ == "__main__":
    main()
