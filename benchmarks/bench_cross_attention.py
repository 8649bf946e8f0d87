"""Time the DiT's cross-attention (video queries over a text context): SDPA as is against query chunks folded into
the batch (sla_dist.models.layers.few_key_attention), forward and forward + backward.

    python benchmarks/bench_cross_attention.py            # GPU: Lq 32760, Lk 512, 12 heads of 128, bf16; table last
    python benchmarks/bench_cross_attention.py --tiny     # CPU smoke test of every code path

SDPA's backward runs one program per (batch, head, key tile) walking every query, so 512 text keys x 12 heads give
about 96 programs on a 132-SM card. Each row times one fixed ``chunks`` (1 = plain SDPA) with SDPA restricted
to one backend; "auto" is the number that ``query_chunks`` picks on this card. Medians of
triton.testing.do_bench (GPU) or one wall-clock call (CPU). Writes benchmarks/results/<date>-cross-attention-<card>
.{json,md} (--out to override).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_timer import median_timer
from results_io import save_results
from sla_dist.models.layers import few_key_attention, query_chunks

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--q-len", type=int, default=32760)
    parser.add_argument("--k-len", type=int, default=512)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash"], choices=sorted(BACKENDS))
    parser.add_argument("--tiny", action="store_true", help="tiny shape in float32 (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    Lq, Lk, H, D = (48, 6, 2, 16) if args.tiny else (args.q_len, args.k_len, args.heads, args.head_dim)
    backends = ["math"] if args.tiny else args.backends
    # q as the DiT holds it: a [B, H, Lq, D] view of [B, Lq, H, D]; k, v from the (short) text projection.
    q = torch.randn(1, Lq, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, Lk, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_() for _ in "kv")
    grad = torch.randn_like(q)
    auto = query_chunks(1, H, Lq, Lk, q.device)
    bench = median_timer(on_gpu=device == "cuda")
    flops = 4 * Lq * Lk * D * H  # forward; backward counted as 2.5 x forward
    rows = []
    for backend in backends:
        for chunks in args.chunks:
            if Lq % chunks:
                continue
            with sdpa_kernel([BACKENDS[backend]]):
                with torch.no_grad():
                    fwd = bench(lambda: few_key_attention(q, k, v, chunks))
                step = bench(lambda: torch.autograd.grad(few_key_attention(q, k, v, chunks), (q, k, v), grad))
            rows.append(dict(backend=backend, chunks=chunks, auto=chunks == auto, fwd_ms=fwd, fwd_bwd_ms=step,
                             fwd_tflops=flops / fwd / 1e9, fwd_bwd_tflops=3.5 * flops / step / 1e9))
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    table = "\n".join(["| backend | chunks | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |",
                       "|---|---|---|---|---|---|"] + [
        f"| {r['backend']} | {r['chunks']}{' (auto)' if r['auto'] else ''} | {r['fwd_ms']:.3f} | "
        f"{r['fwd_bwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} |" for r in rows])
    command = "python benchmarks/bench_cross_attention.py " + " ".join(sys.argv[1:])
    preamble = (f"q [1, {H}, {Lq}, {D}] (a view of [1, {Lq}, {H}, {D}]) over k, v [1, {H}, {Lk}, {D}], {dtype}; "
                f"SDPA restricted to the row's backend; query_chunks picks {auto} here. Command: `{command}`.")
    meta = dict(q_len=Lq, k_len=Lk, heads=H, head_dim=D, dtype=str(dtype), auto_chunks=auto, command=command)
    save_results("cross-attention", card, meta, rows, "Cross-attention: query chunks folded into the batch",
                 preamble, table, args.out, args.tiny)
    print(table)


if __name__ == "__main__":
    main()
