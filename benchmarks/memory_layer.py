"""Peak extra GPU memory of one forward+backward: the SLA layer against dense SDPA (cuDNN) on the same q, k, v.

    PYTHONPATH=/path/to/checkout python benchmarks/memory_layer.py [--lengths 8192 32768] [--flex]
        [--linear-sums save recompute] [--compiled] [--out PATH]

bf16, B = 1, H = 12, D = 128, topk 0.05 (95 % sparsity), BQ 128 / BK 64. Rows: (a) dense SDPA with the cuDNN
backend, (b) the full SLA layer (SparseLinearAttention, kernel path: block-map prediction, both branches, proj_l),
(c) with ``--flex``, FlexAttention with a 128 x 128 block mask of the same density (sparse branch only; compiling
it takes a while). "extra" is ``torch.cuda.max_memory_allocated`` during ``fn(q, k, v).backward(g)`` minus what was
allocated before it (q, k, v, g, parameters), so it counts the output, what the forward saves, the backward's
temporaries and the three input gradients; "held" is what the forward leaves allocated for the backward, output
included. Each row is measured after two untimed steps (autotuning, lazy workspaces); its fwd+bwd time is a median
of ``triton.testing.do_bench``. The sla_dist that PYTHONPATH points at is measured (its path is printed first), so
two checkouts compare on one card in one device call. ``benchmarks/memory_account.py`` counts the same SLA peak on
a CPU. ``--linear-sums`` measures row (b) once per SLAConfig.linear_sums given (without it: the layer's default, so
a checkout from before the option can be measured). ``--compiled`` adds each SLA layer through
``torch.compile(fullgraph=True)`` (Inductor's default mode, static shapes: bench_attention.py's compiled row), its
first steps compiling it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend

from layer_inputs import dense_sdpa, flex_block_sparse  # this script's folder is on sys.path when it runs

MIB = 2**20


@dataclass
class Row:
    L: int
    method: str
    extra_mib: float = float("nan")
    held_mib: float = float("nan")
    fwd_bwd_ms: float = float("nan")
    note: str = ""


def measure(row: Row, fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> Row:
    import triton.testing

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(g)

    try:
        step()
        step()
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(*leaves)
        torch.cuda.synchronize()
        row.held_mib = (torch.cuda.memory_allocated() - base) / MIB
        out.backward(g)
        del out
        torch.cuda.synchronize()
        row.extra_mib = (torch.cuda.max_memory_allocated() - base) / MIB
        row.fwd_bwd_ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
        row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    for t in leaves:
        t.grad = None
    return row


def sla_layer(D: int, topk: float, **kwargs):
    from sla_dist import SparseLinearAttention

    layer = SparseLinearAttention(D, topk=topk, BLKQ=128, BLKK=64, **kwargs).cuda()
    torch.nn.init.normal_(layer.proj_l.weight, std=D**-0.5)  # a trained layer's proj_l is not zero
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--flex", action="store_true", help="also FlexAttention block-sparse (compiles first)")
    parser.add_argument("--linear-sums", nargs="+", choices=("save", "recompute"), metavar="MODE",
                        help="SLAConfig.linear_sums values of the SLA layer, one row each (save, recompute)")
    parser.add_argument("--compiled", action="store_true",
                        help="also each SLA layer through torch.compile(fullgraph=True), one row each")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_layer.py measures CUDA memory and needs a GPU (benchmarks/memory_account.py counts the SLA "
                 "layer's peak on a CPU)")
    print("sla_dist from", __import__("sla_dist").__file__)
    layers = {}
    for sums in args.linear_sums or [None]:
        torch.manual_seed(0)
        name = "SLA layer (kernels)" if sums is None else f"SLA layer ({sums})"
        layers[name] = sla_layer(args.D, args.topk, **({} if sums is None else dict(linear_sums=sums)))
    rows = []
    for L in args.lengths:
        q, k, v, g = (torch.randn(1, args.H, L, args.D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        rows.append(measure(Row(L, "dense SDPA cuDNN"), dense_sdpa(SDPBackend.CUDNN_ATTENTION), q, k, v, g))
        for name, layer in layers.items():
            rows.append(measure(Row(L, name), layer, q, k, v, g))
            if args.compiled:
                compiled = torch.compile(layer, fullgraph=True, dynamic=False)
                rows.append(measure(Row(L, name.replace("SLA layer", "SLA compiled")), compiled, q, k, v, g))
        if args.flex:
            try:
                flex = flex_block_sparse(q, k, args.topk)[0]
            except Exception as exc:  # not importable, or no block mask API in this torch
                rows.append(Row(L, "FlexAttention 128x128", note=f"{type(exc).__name__}: {exc}"[:80]))
            else:
                rows.append(measure(Row(L, "FlexAttention 128x128"), flex, q, k, v, g))
        del q, k, v, g

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, B=1 H={args.H} D={args.D}, "
          f"topk {args.topk}, BQ 128 / BK 64")
    print(f"{'L':>6} {'method':<22} {'extra MiB':>9} {'held MiB':>9} {'f+b ms':>8}  note")
    for r in rows:
        print(f"{r.L:>6} {r.method:<22} {r.extra_mib:>9.1f} {r.held_mib:>9.1f} {r.fwd_bwd_ms:>8.3f}  {r.note}")
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=__import__("triton").__version__, sla_dist=__import__("sla_dist").__file__,
                    command=" ".join(sys.argv), H=args.H, D=args.D, topk=args.topk)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=[asdict(r) for r in rows]), f, indent=1)


if __name__ == "__main__":
    main()
