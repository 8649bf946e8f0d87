"""Every launch-setting candidate of every SLA kernel, timed at one shape: which settings win, by how much, and what
the first call's search costs, with a cold Triton cache and with the cache another process left.

    python benchmarks/sweep_kernels.py [--L 32768] [--H 12] [--D 128] [--topk 0.05] [--block-q 128] [--json F]

One forward+backward of the full layer with autotuning on, in a fresh Triton cache directory (so every candidate
compiles and is timed, as on a new machine); its wall time is the first-call cost a user sees once per layer shape.
Then a second process with the same cache directory times its first call (tuning results cached on disk, Triton
>= 3.4). The tables list each kernel's candidates from Triton's own autotune timings (median ms), best first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def first_call_seconds(args: argparse.Namespace) -> float:
    import torch
    from layer_inputs import sla_layer_inputs  # this script's folder is on sys.path when it runs

    m, q, k, v, g = sla_layer_inputs(args.L, args.H, args.D, topk=args.topk, block_q=args.block_q)
    torch.cuda.synchronize()
    start = time.perf_counter()
    m(q, k, v).backward(g)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def candidate_timings() -> dict[str, list[dict]]:
    from sla_dist.kernels.configs import _KERNELS, get_kernel

    tables = {}
    for name in _KERNELS:
        timings = getattr(get_kernel(name), "configs_timings", None)  # absent: one candidate, or cached results
        if not timings:
            continue
        rows = []
        for config, t in timings.items():
            ms = t[0] if isinstance(t, (list, tuple)) else t
            rows.append(dict(**config.kwargs, warps=config.num_warps, stages=config.num_stages, ms=float(ms)))
        tables[name] = sorted(rows, key=lambda r: r["ms"])
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=32768)
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--json", default="sweep_kernels.json")
    parser.add_argument("--cache-dir", help="Triton cache directory to fill (must be empty or absent; default: a new "
                        "temporary one); later processes pointed at it reuse the tuning")
    parser.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_call_only:
        print(json.dumps(first_call_seconds(args)))
        return

    os.environ.pop("SLA_DIST_AUTOTUNE", None)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="sla-sweep-cache-")
    if os.path.isdir(cache) and os.listdir(cache):
        parser.error(f"--cache-dir {cache} is not empty: the first call would not compile and tune from scratch")
    os.environ["TRITON_CACHE_DIR"] = cache
    cold = first_call_seconds(args)
    tables = candidate_timings()
    warm = json.loads(subprocess.run([sys.executable, __file__, "--first-call-only", *sys.argv[1:]], check=True,
                                     capture_output=True, text=True, env=os.environ).stdout.splitlines()[-1])
    import torch
    import triton

    result = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(sys.argv), shape=dict(L=args.L, H=args.H, D=args.D, topk=args.topk,
                                                         block_q=args.block_q),
                  first_call_s=dict(cold_cache=round(cold, 1), cache_from_another_process=round(warm, 1)),
                  candidates=tables)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    for name, rows in tables.items():
        print(f"\n{name}: {len(rows)} candidates, best {rows[0]['ms']:.3f} ms, worst {rows[-1]['ms']:.3f} ms")
        for r in rows:
            print("   " + " ".join(f"{key}={value}" for key, value in r.items() if key != "ms") + f"  {r['ms']:.3f}")
    print(f"\nfirst fwd+bwd call: {cold:.1f} s with a cold cache, {warm:.1f} s in a second process (cached tuning)")


if __name__ == "__main__":
    main()
