"""Time the DiT MLP's GELU backward pass (read dy W2 and h; write dh and a; sum dh's columns) and the whole MLP:
torch.compile's fused kernel against sla_dist's Triton kernel (sla_dist.kernels.gelu_mlp), on one GPU.

    python3 benchmarks/bench_gelu_mlp.py [--tokens 32760] [--dim 1536] [--hidden 8960] [--json PATH]

Rows: the backward pass alone (compiled PyTorch vs the kernel under each launch of --launches, ms and the bytes of
the four [tokens, hidden] tensors over the time), then the MLP module's forward+backward, eager and compiled, with
the module calls (fused=False) and the fused path (fused=True) under the fastest of those launches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sla_dist.kernels import gelu_mlp as gelu_module  # noqa: E402
from sla_dist.kernels.gelu_mlp import BackwardLaunch, gelu_tanh_backward_ref  # noqa: E402
from sla_dist.models.layers import MLP  # noqa: E402

LAUNCHES = ["16x128x256x4", "16x128x128x4", "16x128x512x4", "16x64x256x2", "32x64x256x4", "16x256x256x8",
            "8x256x256x4"]


def parse_launch(text: str) -> BackwardLaunch:
    """'BMxBNxROWSxWARPS' -> BackwardLaunch."""
    try:
        block_m, block_n, rows, warps = (int(v) for v in text.split("x"))
    except ValueError:
        raise ValueError(f"--launches: {text!r} is not BLOCK_MxBLOCK_NxROWSxWARPS, e.g. 32x128x256x4") from None
    return BackwardLaunch(block_m=block_m, block_n=block_n, rows=rows, warps=warps)


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=8960)
    parser.add_argument("--launches", nargs="+", default=LAUNCHES)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    launches = [parse_launch(t) for t in args.launches]
    if not torch.cuda.is_available():
        raise SystemExit("bench_gelu_mlp.py times CUDA kernels: no GPU here")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    M, N = args.tokens, args.hidden
    ga = torch.randn(M, N, device=dev, dtype=dtype)
    h = 3 * torch.randn(M, N, device=dev, dtype=dtype)
    gbytes = 4 * M * N * ga.element_size() / 1e9
    rows = []
    compiled_ref = torch.compile(gelu_tanh_backward_ref)
    ms = bench(lambda: compiled_ref(ga, h))
    rows.append(dict(part="backward pass", method="torch.compile (PyTorch ops)", ms=ms, tb_s=gbytes / ms))
    timed = []
    for launch, text in zip(launches, args.launches):
        ms = bench(lambda launch=launch: gelu_module._gelu_tanh_backward_impl(ga, h, launch))
        rows.append(dict(part="backward pass", method=f"Triton {text}", ms=ms, tb_s=gbytes / ms))
        timed.append((ms, text, launch))
    best = min(timed, key=lambda t: t[0])
    gelu_module.BACKWARD_LAUNCH = best[2]
    mlp = MLP(args.dim, N, "gelu").to(dev, dtype)
    x = torch.randn(1, M, args.dim, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(1, M, args.dim, device=dev, dtype=dtype)
    params = [x, *mlp.parameters()]
    for compiled in (False, True):
        for fused in (False, True):
            mlp.fused = fused
            torch._dynamo.reset()
            fn = torch.compile(mlp) if compiled else mlp

            def step(fn=fn):
                return torch.autograd.grad(fn(x), params, dy)
            ms = bench(step)
            launch = f" ({best[1]})" if fused else ""
            rows.append(dict(part="MLP fwd+bwd", method=f"{'compiled' if compiled else 'eager'}, fused={fused}{launch}",
                             ms=ms, tb_s=None))
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, tokens=M, dim=args.dim, hidden=N,
                dtype=str(dtype), command=" ".join(sys.argv), fused_launch=best[1])
    print(f"{meta['card']}, tokens {M}, dim {args.dim}, hidden {N}, bf16")
    print(f"{'part':<14} {'method':<40} {'ms':>8} {'TB/s':>6}   (launches: BLOCK_MxBLOCK_NxROWSxWARPS)")
    for r in rows:
        tb = f"{r['tb_s']:.2f}" if r["tb_s"] else "-"
        print(f"{r['part']:<14} {r['method']:<40} {r['ms']:8.3f} {tb:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
