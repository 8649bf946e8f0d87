"""Time a DiT's q / k RMS norm + RoPE: the fused Triton kernels against the PyTorch reference, eager and compiled.

    python benchmarks/bench_norm_rope.py              # GPU: L 32760, dim 1536, 12 heads, bf16; table last
    python benchmarks/bench_norm_rope.py --tiny       # smoke test, tiny shape (CPU: the interpreter)

x is the q slice of a fused qkv projection [B, L, 3 dim] (the DiT's layout). Medians of triton.testing.do_bench
(fwd, and fwd+bwd with dx and dW) per method; "GB/s" counts the bytes the op must move at least (fwd: x read, out
written; fwd+bwd: that plus grad and x read, dx written), so the fused row's share of the card's bandwidth shows how
much is left. At this size a fwd+bwd call is bound by host time (autograd, the custom op's dispatch): the
"kernels us" column (CUDA time of the kernels of one fwd+bwd call, torch.profiler over 10 calls; GPU only; each
kernel's time in the JSON) is what the card spends. Writes benchmarks/results/<date>-norm-rope-<card>.{json,md} (--out to override).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch  # noqa: E402

if "--tiny" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first launch defines the kernels

from bench_timer import median_timer  # noqa: E402
from glue_fraction import profile_kernels  # noqa: E402
from results_io import save_results  # noqa: E402
from sla_dist.kernels import norm_rope as norm_rope_module  # noqa: E402
from sla_dist.kernels.norm_rope import BackwardLaunch, norm_rope, norm_rope_ref  # noqa: E402
from sla_dist.models.rope import rope_tables  # noqa: E402


def _kernel_us(step, calls: int = 10) -> dict[str, float]:
    """CUDA time per call of each kernel that ``step`` launches: glue_fraction.profile_kernels over ``calls`` calls,
    after 3 warm-up calls."""
    for _ in range(3):
        step()
    return profile_kernels(step, calls)


def _launch_name(launch: BackwardLaunch) -> str:
    return f"{launch.rows} rows x {launch.programs_per_sm}/SM x {launch.warps} warps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="tiny shape in float32 (on a CPU-only machine in the "
                        "interpreter): a smoke test")
    parser.add_argument("--backward-launch", nargs="*", default=[], metavar="ROWSxPER_SMxWARPS",
                        help="also time the fused op with these backward launches (norm_rope.BackwardLaunch), e.g. 4x8x8")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    L, heads, D = (37, 2, 12) if args.tiny else (args.L, args.heads, args.head_dim)
    dim = heads * D
    qkv = torch.randn(1, L, 3 * dim, device=device, dtype=dtype)
    x = qkv[..., :dim]
    x_grad = qkv.detach().requires_grad_()[..., :dim]
    weight = (1 + 0.1 * torch.randn(dim, device=device)).to(dtype).requires_grad_()
    cos, sin = (t.to(device) for t in rope_tables((1, L, 1), D))
    grad = torch.randn(1, L, heads, D, device=device, dtype=dtype)
    default = norm_rope_module.BACKWARD_LAUNCH
    methods = {  # name: (function, backward launch)
        "PyTorch reference, eager": (norm_rope_ref, default),
        f"fused Triton (backward {_launch_name(default)})": (functools.partial(norm_rope, fused=True), default),
    }
    for text in args.backward_launch:
        launch = BackwardLaunch(*(int(v) for v in text.split("x")))
        methods[f"fused Triton (backward {_launch_name(launch)})"] = (functools.partial(norm_rope, fused=True), launch)
    if not args.tiny:
        methods["PyTorch reference, torch.compile"] = (torch.compile(norm_rope_ref, fullgraph=True), default)
    bench = median_timer(on_gpu=not args.tiny)
    element = torch.finfo(dtype).bits // 8
    fwd_bytes = 2 * L * dim * element
    rows = []
    for name, (fn, launch) in methods.items():
        norm_rope_module.BACKWARD_LAUNCH = launch
        fwd = bench(lambda: fn(x, weight, cos, sin, heads, 1e-6))
        step = bench(lambda: torch.autograd.grad(fn(x_grad, weight, cos, sin, heads, 1e-6), (x_grad, weight), grad))
        kernels = None
        if device == "cuda":
            kernels = _kernel_us(lambda: torch.autograd.grad(fn(x_grad, weight, cos, sin, heads, 1e-6),
                                                             (x_grad, weight), grad))
        rows.append(dict(method=name, fwd_ms=fwd, fwd_bwd_ms=step, fwd_gbs=fwd_bytes / fwd / 1e6,
                         fwd_bwd_gbs=(fwd_bytes + 3 * L * dim * element) / step / 1e6, kernels_us=kernels,
                         kernels_total_us=sum(kernels.values()) if kernels else None))
    norm_rope_module.BACKWARD_LAUNCH = default
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    table = "\n".join(["| method | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | kernels us (fwd+bwd) |",
                       "|---|---|---|---|---|---|"] + [
        f"| {r['method']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_gbs']:.0f} | {r['fwd_bwd_gbs']:.0f} | "
        + (f"{r['kernels_total_us']:.1f} ({len(r['kernels_us'])} kernels)" if r["kernels_us"] else "-") + " |"
        for r in rows])
    command = "python benchmarks/bench_norm_rope.py " + " ".join(sys.argv[1:])
    preamble = (f"x [1, {L}, {dim}] ({heads} heads of {D}), a slice of a fused qkv projection, {dtype}; "
                f"medians of triton.testing.do_bench. Command: `{command}`.")
    meta = dict(L=L, heads=heads, head_dim=D, dtype=str(dtype), command=command)
    save_results("norm-rope", card, meta, rows, "q / k RMS norm + RoPE", preamble, table, args.out, args.tiny)
    print(table)


if __name__ == "__main__":
    main()
