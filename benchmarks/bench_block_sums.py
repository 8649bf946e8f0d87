"""Time the block-map prediction's block sums (sla_dist.kernels.block_map.block_sums: the float64 sums of each
block of q and of k, one program per block) under several warp counts, on one GPU.

    python3 benchmarks/bench_block_sums.py [--L 32768 8192 75600] [--warps 1 2 4] [--json PATH]

Each row: the q sums (block_q) or the k sums (block_k) of a [1, H, L, D] bf16 tensor laid out [B, L, H, D] as the
layer reads it, microseconds (median of triton.testing.do_bench) and the bytes read over that time; every launch's
sums are checked against the float64 PyTorch path first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sla_dist.kernels import block_map  # noqa: E402
from sla_dist.kernels.configs import fixed_settings  # noqa: E402

from bench_timer import median_timer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--L", type=int, nargs="+", default=[32768, 8192, 75600])
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    timer = median_timer(on_gpu)
    results = []
    for L in args.L:
        gen = torch.Generator(device=device).manual_seed(L)
        x = torch.randn(1, L, args.H, args.D, generator=gen, device=device, dtype=torch.bfloat16).transpose(1, 2)
        for name, block in (("q", args.block_q), ("k", args.block_k)):
            expected = block_map.block_sums(x, block, kernels=False)
            for warps in args.warps:
                with fixed_settings({"block_sums": (warps, 1)}):
                    torch.testing.assert_close(block_map.block_sums(x, block, kernels=True), expected, rtol=1e-6,
                                               atol=1e-4)
                    ms = timer(lambda: block_map.block_sums(x, block, kernels=True))
                gbps = x.numel() * x.element_size() / (ms * 1e-3) / 1e9
                results.append(dict(L=L, tensor=name, block=block, warps=warps, us=round(ms * 1e3, 2),
                                    gb_per_s=round(gbps, 1)))
                print(f"L {L:6d} {name} block {block:4d} warps {warps}: {ms * 1e3:8.2f} us {gbps:7.1f} GB/s",
                      flush=True)
    if args.json:
        card = torch.cuda.get_device_name() if on_gpu else "cpu"
        args.json.write_text(json.dumps(dict(card=card, torch=torch.__version__, H=args.H, D=args.D,
                                             results=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
