"""Where an SLA layer's host time goes: microseconds of CPU per call of each piece, measured as the wall time of an
unsynchronised loop at a length short enough that the GPU never holds the host back.

    python benchmarks/host_overhead.py [--L 1024] [--H 12] [--D 128] [--n 200]

Rows, from the smallest unit up: one elementwise aten op (the dispatcher + launch floor); one Triton launch through
``get_kernel`` (the autotuner's per-call Python, or the fixed-setting wrapper under SLA_DIST_AUTOTUNE=0) and
through the bare ``kernel[grid]``; the block-map prediction; the forward custom op through the dispatcher and its
Python implementation called directly; the layer's forward and forward+backward. The differences between rows say
which layer of the stack costs what. Runs on CPU too (TRITON_INTERPRET=1, tiny sizes) to check the script itself;
the numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def per_call_us(fn, n: int, sync) -> float:
    for _ in range(5):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    sync()
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=1024)
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()

    from layer_inputs import sla_layer_inputs  # this script's folder is on sys.path when it runs

    from sla_dist.kernels import configs
    from sla_dist.kernels.block_map import _tile_size, num_blocks, predict_block_map
    from sla_dist.kernels.op import sla_forward

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layer, q, k, v, g = sla_layer_inputs(args.L, args.H, args.D, device=device, dtype=dtype, backend="triton")
    def predict():
        return predict_block_map(q.detach(), k.detach(), topk=0.05, negligible=0.1, block_q=128, block_k=64,
                                 kernels=True)

    bm = predict()
    op_args = (q.detach(), k.detach(), v.detach(), bm.block_class, bm.kv_num_blocks, bm.kv_indices, 128, 64,
               "softmax", "marginal", "save")
    n_blocks = num_blocks(args.L, 64)
    sums = torch.zeros(1, args.H, n_blocks, args.D, dtype=torch.float64, device=device)
    block_sums = configs.get_kernel("block_sums")
    raw = configs.jit_function("block_sums")
    launch = (q.detach(), sums, *q.stride()[:3], args.H, args.L, n_blocks, args.D)
    meta = dict(BLOCK=64, D_POW2=_tile_size(args.D))
    small = torch.ones(16, device=device)

    rows = {
        "aten add (one small op)": lambda: small.add(1.0),
        "Triton launch via get_kernel": lambda: block_sums[(n_blocks, args.H)](*launch, **meta),
        "Triton launch, bare kernel[grid]": lambda: raw[(n_blocks, args.H)](*launch, **meta, num_warps=4,
                                                                            num_stages=1),
        "predict_block_map": predict,
        "sla_forward op (dispatcher)": lambda: sla_forward(*op_args),
        "sla_forward implementation, direct": lambda: sla_forward._init_fn(*op_args),
    }
    results = {}
    with torch.no_grad():
        for name, fn in rows.items():
            results[name] = per_call_us(fn, args.n, sync)
        results["layer forward"] = per_call_us(lambda: layer(q, k, v), args.n, sync)
    results["layer forward+backward"] = per_call_us(lambda: layer(q, k, v).backward(g), args.n, sync)

    where = torch.cuda.get_device_name() if cuda else "CPU (interpreter: numbers meaningless)"
    print(f"{where}, torch {torch.__version__}, L={args.L} H={args.H} D={args.D}, autotune "
          f"{'off' if os.environ.get('SLA_DIST_AUTOTUNE') == '0' else 'on'}, {args.n} calls per row")
    for name, us in results.items():
        print(f"  {name:38} {us:9.1f} us/call")


if __name__ == "__main__":
    main()
