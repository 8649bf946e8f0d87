"""Where an SLA layer's host time goes: microseconds of CPU per call of each piece, measured as the wall time of an
unsynchronised loop at a length short enough that the GPU never holds the host back.

    python benchmarks/host_overhead.py [--L 1024] [--H 12] [--D 128] [--n 200] [--repeats 5]

Rows, from the smallest unit up: one elementwise aten op (the dispatcher + launch floor); one Triton launch through
``get_kernel`` (the autotuner's per-call Python, or the fixed-setting wrapper under SLA_DIST_AUTOTUNE=0) and
through the bare ``kernel[grid]``; the block-map prediction; the forward custom op through the dispatcher and its
Python implementation called directly; the layer's forward and forward+backward. The differences between rows say
which layer of the stack costs what. Each row is the min (and median) of --repeats runs; to compare two trees,
alternate their processes (``for i in 1 2 3; do for P in base .; do PYTHONPATH=$P python3
benchmarks/host_overhead.py --L 2048; done; done``, or ``--against PATH``, which does that for the layer rows):
one process's host time alone can be tens of percent off.
Runs on CPU too (TRITON_INTERPRET=1, tiny sizes) to check the script itself; the numbers then mean nothing.

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py --noop-kernels [--L 1024] [--H 12] [--D 128] [--n 50]

``--noop-kernels`` counts the host work of each piece on a CPU instead, with every Triton launch a no-op and every
buffer allocated as on a GPU (memory_account.no_op_kernels; bf16 inputs, the H200's descriptor decisions): per call,
the dispatcher's aten ops (nested ones included) and those called from Python, the allocations, the Triton launches
and the Python functions of sla_dist that run, which no machine changes (:func:`host_counts`), and the wall time,
which this CPU's aten ops inflate a little (they do real, small work).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import memory_account  # this script's folder is on sys.path when it runs

def per_call_us(fn, n: int, sync, repeats: int = 1) -> tuple[float, float]:
    """(min, median) over ``repeats`` runs of the microseconds per call of ``n`` unsynchronised calls of ``fn``.
    A shared host's time per call moves by tens of percent from run to run (2026-12-02 on an H200's host): the
    minimum is the number to compare, and two trees are compared in alternating processes."""
    for _ in range(5):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
        sync()
    return min(runs), sorted(runs)[len(runs) // 2]


ALLOCATING = ("aten::empty", "aten::empty_strided")


def host_counts(fn) -> dict[str, int]:
    """What one call of ``fn`` asks of the host, counted under memory_account.no_op_kernels: ``aten`` every
    op the dispatcher runs, nested ones included; ``aten_top`` those called from Python; ``allocs`` the tensors
    allocated (every allocating op calls one of ALLOCATING; on a CPU this includes the temporaries that an op with
    an ``out=`` of another dtype makes there, and not on a GPU); ``launches`` the Triton launches; ``sla_calls`` the
    calls of Python functions defined in sla_dist (the package's own Python, independent of the torch version)."""
    import sla_dist

    package = str(Path(sla_dist.__file__).parent) + os.sep  # the checkout PYTHONPATH points at
    launches, calls = [], [0]

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            calls[0] += 1

    with memory_account.no_op_kernels(launches, tma_device=True):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        launches.clear()
        sys.setprofile(tracer)
        try:
            fn()
        finally:
            sys.setprofile(None)
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    return dict(aten=len(aten), aten_top=sum(1 for e in aten if not _in_aten(e)),
                allocs=sum(1 for e in aten if e.name in ALLOCATING),
                launches=len(launches), sla_calls=calls[0])


def _in_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def noop_pieces(L: int, H: int, D: int, *, linear_sums: str = "save") -> dict:
    """{piece: zero-argument callable} for --noop-kernels: the layer's forward and forward+backward (bf16 leaves
    [1, H, L, D], proj_l fused into the forward as on a GPU), block-map prediction, the forward op's implementation
    (projected, as the layer calls it) and the backward op's (from that forward's saved tensors). Call them under
    memory_account.no_op_kernels(tma_device=True)."""
    from sla_dist import SparseLinearAttention
    from sla_dist.kernels import backward_ops, op
    from sla_dist.kernels.block_map import predict_block_map

    torch.manual_seed(0)
    layer = SparseLinearAttention(D, topk=0.05, BLKQ=128, BLKK=64, linear_sums=linear_sums, backend="triton")
    torch.nn.init.normal_(layer.proj_l.weight, std=D**-0.5)
    q, k, v = (torch.randn(1, H, L, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    x = tuple(t.detach() for t in (q, k, v))
    weight, bias = layer.proj_l.weight.detach(), layer.proj_l.bias.detach()

    def predict():
        return predict_block_map(*x[:2], topk=0.05, negligible=0.1, block_q=128, block_k=64)

    with memory_account.no_op_kernels(tma_device=True):
        bm = predict()
        args = (*x, bm.block_class, bm.kv_num_blocks, bm.kv_indices, 128, 64, "softmax", "marginal", linear_sums,
                weight, bias)
        out, o, o_l, lse, sums = op._forward(*args)
    saved = (q.detach(), k.detach(), v.detach(), o, lse, bm.block_class, bm.kv_num_blocks, bm.kv_indices)

    def backward():
        return backward_ops.sla_backward(g, None, None, *saved, 128, 64, "softmax", "marginal", weight.to(g.dtype),
                            sums if linear_sums == "save" else None)

    def forward_backward():  # gradients returned, not accumulated into .grad (as time_layer.py's step)
        return torch.autograd.grad(layer(q, k, v), (q, k, v, *layer.parameters()), g)

    def layer_forward():
        with torch.no_grad():
            return layer(q, k, v)

    return {"layer forward": layer_forward, "layer forward+backward": forward_backward,
            "predict_block_map": predict, "forward op (implementation)": lambda: op._forward(*args),
            "backward op (implementation)": backward}


def noop_main(args) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--noop-kernels runs the kernel path on a CPU: set TRITON_INTERPRET=1")
    torch.set_num_threads(1)  # small ops: one thread is both faster and steadier on a shared machine
    pieces = noop_pieces(args.L, args.H, args.D)
    print(f"CPU, no-op kernels, torch {torch.__version__}, bf16 [1, {args.H}, {args.L}, {args.D}], BQ 128 / BK 64, "
          f"{args.n} calls per row; per call:")
    print(f"  {'piece':30} {'us':>8} {'aten':>5} {'top':>5} {'allocs':>6} {'launch':>6} {'sla py':>6}")
    for name, fn in pieces.items():
        with memory_account.no_op_kernels(tma_device=True):
            us, _ = per_call_us(fn, args.n, lambda: None, args.repeats)
        c = host_counts(fn)
        print(f"  {name:30} {us:8.1f} {c['aten']:5} {c['aten_top']:5} {c['allocs']:6} {c['launches']:6} "
              f"{c['sla_calls']:6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=1024)
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="runs of --n calls per row (min and median shown)")
    parser.add_argument("--noop-kernels", action="store_true",
                        help="count each piece's host work on a CPU, Triton launches as no-ops (TRITON_INTERPRET=1)")
    parser.add_argument("--layer-only", action="store_true", help="only the layer's forward and forward+backward rows")
    parser.add_argument("--json", action="store_true", help="also print the rows as one JSON line, last")
    parser.add_argument("--against", metavar="PATH", help="compare the layer rows of the sla_dist at PATH (a folder "
                        "holding an sla_dist package) with this tree's, in alternating processes")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of --against (default 3)")
    args = parser.parse_args()
    if args.noop_kernels:
        noop_main(args)
        return
    if args.against:
        compare_trees(args)
        return

    from layer_inputs import sla_layer_inputs  # this script's folder is on sys.path when it runs

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layer, q, k, v, g = sla_layer_inputs(args.L, args.H, args.D, device=device, dtype=dtype, backend="triton")
    rows = {} if args.layer_only else _stack_rows(q, k, v, args.L, args.H, args.D)
    results = {}
    with torch.no_grad():
        for name, fn in rows.items():
            results[name] = per_call_us(fn, args.n, sync, args.repeats)
        results["layer forward"] = per_call_us(lambda: layer(q, k, v), args.n, sync, args.repeats)
    results["layer forward+backward"] = per_call_us(lambda: layer(q, k, v).backward(g), args.n, sync, args.repeats)

    where = torch.cuda.get_device_name() if cuda else "CPU (interpreter: numbers meaningless)"
    print(f"{where}, torch {torch.__version__}, L={args.L} H={args.H} D={args.D}, autotune "
          f"{'off' if os.environ.get('SLA_DIST_AUTOTUNE') == '0' else 'on'}, {args.repeats} runs of {args.n} calls "
          "per row; us per call, min / median of the runs")
    for name, (low, mid) in results.items():
        print(f"  {name:38} {low:9.1f} / {mid:9.1f}")
    if args.json:
        import sla_dist

        print(json.dumps({"sla_dist": sla_dist.__file__, "rows": results}))


def _stack_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, L: int, H: int, D: int) -> dict:
    """{row: zero-argument callable} of the pieces below the layer: an aten op, a Triton launch two ways, the block
    map, the forward custom op through the dispatcher and called directly."""
    from sla_dist.kernels import configs
    from sla_dist.kernels.block_map import _tile_size, num_blocks, predict_block_map
    from sla_dist.kernels.op import sla_forward

    def predict():
        return predict_block_map(q.detach(), k.detach(), topk=0.05, negligible=0.1, block_q=128, block_k=64,
                                 kernels=True)

    bm = predict()
    op_args = (q.detach(), k.detach(), v.detach(), bm.block_class, bm.kv_num_blocks, bm.kv_indices, 128, 64,
               "softmax", "marginal", "save")
    n_blocks = num_blocks(L, 64)
    sums = torch.zeros(1, H, n_blocks, D, dtype=torch.float64, device=q.device)
    block_sums = configs.get_kernel("block_sums")
    raw = configs.jit_function("block_sums")
    launch = (q.detach(), sums, *q.stride()[:3], H, L, n_blocks, D)
    meta = dict(BLOCK=64, D_POW2=_tile_size(D))
    small = torch.ones(16, device=q.device)
    return {
        "aten add (one small op)": lambda: small.add(1.0),
        "Triton launch via get_kernel": lambda: block_sums[(n_blocks, H)](*launch, **meta),
        "Triton launch, bare kernel[grid]": lambda: raw[(n_blocks, H)](*launch, **meta, num_warps=4, num_stages=1),
        "predict_block_map": predict,
        "sla_forward op (dispatcher)": lambda: sla_forward(*op_args),
        "sla_forward implementation, direct": lambda: sla_forward._init_fn(*op_args),
    }


LAYER_ROWS = ("layer forward", "layer forward+backward")


def compare_trees(args) -> None:
    """The layer rows of the sla_dist at ``args.against`` and of this tree's, each process alone on the host, the two
    alternating ``args.rounds`` times; a table of the minima per round and their means (the host's time per call
    drifts between processes, so only alternated runs compare)."""
    this_tree = Path(__file__).resolve().parents[1]
    trees = (("against", Path(args.against).resolve()), ("this", this_tree))
    base = [sys.executable, str(Path(__file__).resolve()), "--layer-only", "--json", "--L", str(args.L), "--H",
            str(args.H), "--D", str(args.D), "--n", str(args.n), "--repeats", str(args.repeats)]
    runs = []
    for round_ in range(args.rounds):
        for label, path in trees:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(path), os.environ.get("PYTHONPATH")))))
            done = subprocess.run(base, env=env, capture_output=True, text=True, check=True)
            payload = json.loads(done.stdout.strip().splitlines()[-1])
            if not Path(payload["sla_dist"]).resolve().is_relative_to(path):
                raise RuntimeError(f"{label}: imported {payload['sla_dist']}, not the sla_dist under {path}")
            runs.append((round_, label, {row: payload["rows"][row][0] for row in LAYER_ROWS}))
    print(f"L={args.L} H={args.H} D={args.D}, {args.repeats} runs of {args.n} calls per process; us per call (min)")
    print(f"  {'round':5} {'tree':8} " + " ".join(f"{row:>24}" for row in LAYER_ROWS))
    for round_, label, rows in runs:
        print(f"  {round_:5} {label:8} " + " ".join(f"{rows[row]:24.1f}" for row in LAYER_ROWS))
    for row in LAYER_ROWS:
        mean = {label: sum(r[row] for _, lab, r in runs if lab == label) / args.rounds for label, _ in trees}
        print(f"  {row}: against {mean['against']:.1f} -> this {mean['this']:.1f} us "
              f"({100 * (mean['this'] / mean['against'] - 1):+.1f} %)")


if __name__ == "__main__":
    main()
