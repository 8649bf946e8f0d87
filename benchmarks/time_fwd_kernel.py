"""CUDA time of the SLA forward kernel per loop variant (SLA_DIST_FWD_LOOP), one process, identically seeded inputs.

    python benchmarks/time_fwd_kernel.py [--loops baseline fma split+even+fma ...] [--L 32768] [--calls 20]

For each linear_scope (marginal: the layer's kernel with the linear branch and proj_l in its epilogue; none: the
FlashAttention loop and the O_s / lse stores only) and each loop variant, the layer's forward runs ``--calls`` times
under torch.profiler and the table gives the mean CUDA time of `_sla_fwd_kernel` per call, so the loop variants
compare on the kernel itself and the two scopes split its time into loop and epilogue. Autotuning follows
SLA_DIST_AUTOTUNE as usual (each variant is tuned on its own). The last column is the largest difference of the
layer's output from the first loop's (bf16; a sanity check, the test suite checks accuracy).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from layer_inputs import sla_layer_inputs  # this script's folder is on sys.path when it runs
from sla_dist.kernels.configs import FWD_LOOP_ENV
KERNEL = "_sla_fwd_kernel"


def kernel_us(layer, q, k, v, calls: int) -> float:
    """Mean CUDA time of the forward kernel per layer call, in microseconds."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            layer(q, k, v)
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if e.key.startswith(KERNEL))
    return total / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", nargs="+", default=["baseline", "fma", "split", "split+fma",
                                                        "split+even+fma"])
    parser.add_argument("--L", type=int, nargs="+", default=[32768])
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, nargs="+", default=[128])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    print(f"{'L':>6} {'D':>4} {'scope':9} {'loop':16} {'kernel us':>10}  max |out - {args.loops[0]}|")
    for L in args.L:
        for D in args.D:
            for scope in ("marginal", "none"):
                reference = None
                for loop in args.loops:
                    os.environ[FWD_LOOP_ENV] = loop
                    torch.manual_seed(0)
                    layer, q, k, v, _ = sla_layer_inputs(L, args.H, D, linear_scope=scope)
                    with torch.no_grad():
                        out = layer(q, k, v)  # compiles (and tunes) this variant outside the profile
                        out = layer(q, k, v).float()
                    reference = out if reference is None else reference
                    diff = (out - reference).abs().max().item()
                    print(f"{L:>6} {D:>4} {scope:9} {loop:16} {kernel_us(layer, q, k, v, args.calls):>10.1f} "
                          f"{diff:>21.3e}", flush=True)


if __name__ == "__main__":
    main()
