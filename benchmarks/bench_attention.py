"""Time the full SLA layer against dense and block-sparse baselines on one GPU, all in one run.

    python benchmarks/bench_attention.py [--quick] [--only NAME ...] [--json PATH]

Every row is measured in this process, so the ratios compare like with like: dense SDPA with the cuDNN and flash
backends, FlexAttention with a block mask of the same density, xformers when it loads, SLA's sparse branch alone and
the full SLA layer (block-map prediction + sparse branch + linear branch + proj_l). Times are medians of
triton.testing.do_bench; TFLOP/s counts only the computed blocks (4·L·kept_keys·D per head forward, 2.5x that
backward); "extra MiB" is the fwd+bwd peak above the inputs. The table comes last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend

from layer_inputs import dense_sdpa, flex_block_sparse  # this script's folder is on sys.path when it runs
from sla_dist import SparseLinearAttention
from sla_dist.kernels.block_map import block_counts


@dataclass
class Row:
    L: int
    H: int
    D: int
    sparsity: float
    method: str
    fwd_ms: float = float("nan")
    fwd_bwd_ms: float = float("nan")
    tflops_fwd: float = float("nan")
    extra_mib: float = float("nan")
    note: str = ""


def _bench(fn, grads) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def _measure(row: Row, fn, q, k, v, kept_keys: float) -> Row:
    """Fill fwd / fwd+bwd times, TFLOP/s and extra memory for ``fn(q, k, v)``."""
    g = torch.randn_like(q)
    try:
        with torch.no_grad():
            row.fwd_ms = _bench(lambda: fn(q, k, v), None)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        row.fwd_bwd_ms = _bench(lambda: fn(*leaves).backward(g), leaves)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*leaves).backward(g)
        torch.cuda.synchronize()
        row.extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        flops = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * kept_keys * q.shape[3]
        row.tflops_fwd = flops / (row.fwd_ms * 1e-3) / 1e12
    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
        row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    return row


def _xformers():
    import xformers.ops as xops

    return lambda q, k, v: xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sla(D: int, topk: float, block_q: int, scope: str):
    m = SparseLinearAttention(D, topk=topk, BLKQ=block_q, linear_scope=scope).cuda()
    torch.nn.init.normal_(m.proj_l.weight, std=D**-0.5)  # a trained layer's proj_l is not zero
    return m


def bench_shape(L: int, H: int, D: int, sparsity: float, full: bool, only: list[str] | None = None) -> list[Row]:
    topk = round(1.0 - sparsity, 6)
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    n_c, _ = block_counts(math.ceil(L / 64), topk, 0.10)

    def wanted(method: str) -> bool:
        return not only or any(name in method for name in only)

    rows = [_measure(Row(L, H, D, sparsity, "dense SDPA cuDNN"), dense_sdpa(SDPBackend.CUDNN_ATTENTION), q, k, v, L)]
    if full and wanted("dense SDPA flash"):
        rows.append(_measure(Row(L, H, D, sparsity, "dense SDPA flash"), dense_sdpa(SDPBackend.FLASH_ATTENTION),
                             q, k, v, L))
    if full and wanted("FlexAttention"):
        try:
            fn, kept = flex_block_sparse(q, k, topk)
            rows.append(_measure(Row(L, H, D, sparsity, "FlexAttention 128x128 (sparse only)"), fn, q, k, v, kept))
        except Exception as exc:
            rows.append(Row(L, H, D, sparsity, "FlexAttention 128x128 (sparse only)", note=type(exc).__name__))
    if full and wanted("xformers"):
        try:
            rows.append(_measure(Row(L, H, D, sparsity, "xformers"), _xformers(), q, k, v, L))
        except Exception as exc:
            rows.append(Row(L, H, D, sparsity, "xformers", note=f"not available ({type(exc).__name__})"))
    if full and wanted("SLA sparse branch only"):
        rows.append(_measure(Row(L, H, D, sparsity, "SLA sparse branch only, BQ128"), _sla(D, topk, 128, "none"),
                             q, k, v, n_c * 64))
    if full and wanted("SLA full layer, BQ64"):
        rows.append(_measure(Row(L, H, D, sparsity, "SLA full layer, BQ64"), _sla(D, topk, 64, "marginal"),
                             q, k, v, n_c * 64))
    rows.append(_measure(Row(L, H, D, sparsity, "SLA full layer, BQ128"), _sla(D, topk, 128, "marginal"),
                         q, k, v, n_c * 64))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the headline shape")
    parser.add_argument("--only", nargs="+", help="rows whose method contains one of these (dense cuDNN and the "
                        "full SLA layer BQ128 always run)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 75600],
                        help="lengths of the L sweep besides 32768")
    parser.add_argument("--json", default="bench_attention.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    rows = bench_shape(32768, 12, 128, 0.95, full=True, only=args.only)
    if args.quick:
        rows += [r for L in args.lengths for r in bench_shape(L, 12, 128, 0.95, full=False)]
    else:
        for L in args.lengths:
            rows += bench_shape(L, 12, 128, 0.95, full=False)
        rows += bench_shape(32768, 24, 64, 0.95, full=False)
        for sparsity in (0.80, 0.90, 0.97):
            rows += bench_shape(32768, 12, 128, sparsity, full=False)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "autotune": os.environ.get("SLA_DIST_AUTOTUNE") != "0",
                   "command": " ".join(sys.argv), "rows": [asdict(r) for r in rows]}, f, indent=1)

    dense = {(r.L, r.H, r.D, r.sparsity): r for r in rows if r.method == "dense SDPA cuDNN"}
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
          "bf16, B=1; ratios are cuDNN dense time / row time")
    print(f"{'L':>6} {'H':>3} {'D':>4} {'sparse':>6} {'method':<38} {'fwd ms':>8} {'x':>6} {'f+b ms':>8} {'x':>6} "
          f"{'TFLOP/s':>8} {'extra MiB':>9}  note")
    for r in rows:
        d = dense[(r.L, r.H, r.D, r.sparsity)]
        print(f"{r.L:>6} {r.H:>3} {r.D:>4} {r.sparsity:>6.2f} {r.method:<38} {r.fwd_ms:>8.3f} "
              f"{d.fwd_ms / r.fwd_ms:>6.1f} {r.fwd_bwd_ms:>8.3f} {d.fwd_bwd_ms / r.fwd_bwd_ms:>6.1f} "
              f"{r.tflops_fwd:>8.1f} {r.extra_mib:>9.0f}  {r.note}")


if __name__ == "__main__":
    main()
