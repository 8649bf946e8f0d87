"""Peak extra memory of the SLA layer's forward+backward, counted on a CPU with the Triton kernels replaced by no-ops.

    TRITON_INTERPRET=1 python benchmarks/memory_account.py [--L 32768] [--H 12] [--D 128]
        [--dtype bfloat16] [--linear-sums save recompute] [--compiled] [--json PATH]

Every buffer the layer allocates is allocated as on a GPU (same shapes and dtypes: the summaries in
layout.summary_dtype's GPU dtype, bfloat16 for bfloat16 inputs and float32 for float16 ones; the block map through its kernel path), but no
kernel runs, so the full 32K shape takes a minute or two (the 0/1 products and proj_l's GEMMs run on the CPU). The
CPU allocator's allocations and frees are read back from the profiler's memory timeline; "extra" is the peak above
what was allocated before the forward (inputs, the output gradient, parameters), as
``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` reports on a GPU, up to the caching allocator's rounding
(512 bytes) and its workspaces. The output is held during the backward (as in
``layer(q, k, v).backward(g)``), and the kernels' outputs hold no values, so only sizes are meaningful.
``--linear-sums`` counts the layer with each SLAConfig.linear_sums given (default: both); ``--compiled`` counts it
through torch.compile (see :func:`layer_account`); ``--phases`` also prints, for the backward, the bytes live at each
kernel launch and the sizes of the allocations live at its peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile
from torch._C._profiler import _EventType
from torch.profiler._memory_profiler import Action, MemoryProfile

from sla_dist.config import LINEAR_SUMS

MIB = 2**20


class _NoOpKernel:
    """Launched as ``kernel[grid](*args, **meta)``; does nothing but append its name to ``launches`` (if given)."""

    def __init__(self, name: str, launches: list[str] | None) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        if self.launches is not None:
            self.launches.append(self.name)


@contextlib.contextmanager
def no_op_kernels(launches: list[str] | None = None, *, tma_device: bool = False):
    """Every SLA Triton launch a no-op, the block map and the summaries on their GPU code paths. ``launches``
    collects the name of every launch; ``tma_device``: the device counts as one with tensor descriptors (compute
    capability 9.0, an H200), so that the launches' descriptor decisions take their GPU path too."""
    from sla_dist.kernels import backward_ops, block_map, configs, layout, op, summary_rows

    gpu_summary_dtype = layout.summary_dtype
    as_on_a_gpu = lambda dtype, interpreting: gpu_summary_dtype(dtype, False)  # noqa: E731
    kernel = lambda name: _NoOpKernel(name, launches)  # noqa: E731
    with mock.patch.object(op, "get_kernel", kernel), mock.patch.object(configs, "get_kernel", kernel), \
            mock.patch.object(backward_ops, "get_kernel", kernel), mock.patch.object(summary_rows, "get_kernel", kernel), \
            mock.patch.object(block_map, "_on_kernels", lambda x, kernels: x.dtype != torch.float64), \
            mock.patch.object(layout, "summary_dtype", as_on_a_gpu), \
            mock.patch.object(summary_rows, "summary_dtype", as_on_a_gpu), \
            mock.patch.object(backward_ops, "summary_dtype", as_on_a_gpu), \
            mock.patch.object(configs, "_hopper", lambda device, *_: tma_device), \
            mock.patch.object(summary_rows, "sum_over_scope", _sum_over_scope_as_on_a_gpu(summary_rows.sum_over_scope)):
        # Launch constants are cached per shape with their summaries' dtype: none made here may outlive the block.
        layout._cached_problem.cache_clear()
        try:
            yield
        finally:
            layout._cached_problem.cache_clear()


def _sum_over_scope_as_on_a_gpu(sum_over_scope):
    """summary_rows.sum_over_scope's allocations on a GPU (values not meaningful): a product into ``out`` whose rows
    are a column slice of a wider buffer (key_rows_in_slabs) reads them in place on a GPU (cuBLAS takes the row
    stride), where a CPU product first copies them (a q-sized transient at D 128)."""

    def as_on_a_gpu(x, marginal, precision, transpose=False, out=None):
        if out is not None and not x.is_contiguous():
            return out
        return sum_over_scope(x, marginal, precision, transpose, out)

    return as_on_a_gpu


def allocations(fn) -> tuple[int, int]:
    """(peak bytes above the start, bytes still allocated at the end) of the CPU allocations ``fn`` makes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak, live


def phases(fn) -> dict:
    """Where the memory of ``fn`` goes, launch by launch, under :func:`no_op_kernels`: "at_launch", (kernel name,
    bytes live above the start when it was launched) in launch order, and "at_peak", the sizes of the allocations
    live at the peak (largest first; those made before ``fn`` are not seen). The launches are found in the profile as
    calls of the no-op launcher, on the allocations' clock; their names come from ``no_op_kernels``' list."""
    names: list[str] = []
    with no_op_kernels(names), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                       with_stack=True) as prof:
        fn()
    changes, launch_times = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            changes.append((event.start_time_ns, event.typed[1].ptr, event.typed[1].alloc_size))
        elif event.typed[0] == _EventType.PyCall and event.name.endswith(f"): {_NoOpKernel._launch.__name__}"):
            launch_times.append(event.start_time_ns)
    if len(launch_times) != len(names):
        raise RuntimeError(f"found {len(launch_times)} launches in the profile, {len(names)} made")
    live: dict[int, int] = {}
    total = peak = 0
    at_peak: list[int] = []
    at_launch = iter(sorted(launch_times))
    next_launch = next(at_launch, None)
    launches = []
    for t, ptr, size in sorted(changes, key=lambda change: change[0]):
        while next_launch is not None and next_launch <= t:
            launches.append(total)
            next_launch = next(at_launch, None)
        if size > 0:
            live[ptr] = size
        else:
            live.pop(ptr, None)
        total += size
        if total > peak:
            peak, at_peak = total, sorted(live.values(), reverse=True)
    launches += [total] * (len(names) - len(launches))
    return dict(at_launch=list(zip(names, launches)), at_peak=at_peak)


def _column_sums_as_on_a_gpu(rows: torch.Tensor) -> torch.Tensor:
    """projection.column_sums' allocations on a GPU (values not meaningful): its float32 partial sums and their total. A
    CUDA reduction of half rows into float32 reads them in place, but a CPU one first copies all of them into float32
    (twice their bytes: 192 MiB for the bias gradient's rows at the full 32K bfloat16 shape)."""
    from sla_dist.kernels.projection import ROWS_PER_PARTIAL

    partials = rows.new_empty((rows.shape[0] // ROWS_PER_PARTIAL + 1, rows.shape[-1]), dtype=torch.float32)
    return partials.sum(0)


@contextlib.contextmanager
def _gemms_as_on_a_gpu():
    """CPU matrix products without oneDNN: on CPUs with AMX / AVX-512 bf16 its bfloat16 GEMMs allocate scratch
    buffers (0.9 MiB for proj_l's weight gradient at L 2048, H 2, D 64, live at the backward's peak) that a GPU's
    cuBLAS call does not make, so the count would depend on the machine's CPU. ATen's own GEMM allocates only the
    output, as on a GPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # flags() sets tf32 too
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def layer_account(L: int, H: int, D: int, *, topk: float = 0.05, block_q: int = 128, block_k: int = 64,
                  dtype: torch.dtype = torch.bfloat16, linear_sums: str = "save",
                  backward_phases: bool = False, compiled: bool = False) -> dict:
    """Bytes of ``out = layer(q, k, v); out.backward(g)`` for the kernel path at [1, H, L, D]: the forward's peak
    ("forward_peak"), what it leaves allocated for the backward, output included ("held"), the backward's peak
    ("backward_peak") and the peak over both ("peak"), each above what was allocated before. With
    ``backward_phases``, "backward" is :func:`phases` of the backward (its bytes above what the forward left: add
    "held" for the layer's), from a second forward+backward.
    ``compiled``: the layer through ``torch.compile(fullgraph=True)`` with the aot_eager backend (the custom ops
    and the graph's frees as Inductor's graph has them, no Inductor kernels), compiled by a first, uncounted call."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1: the layer takes its kernel path on a CPU only in interpreter mode")
    from sla_dist import SparseLinearAttention

    torch.manual_seed(0)
    layer = SparseLinearAttention(D, topk=topk, BLKQ=block_q, BLKK=block_k, linear_sums=linear_sums,
                                  backend="triton")
    torch.nn.init.normal_(layer.proj_l.weight, std=D**-0.5)
    q, k, v = (torch.randn(1, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    out = []
    from sla_dist.kernels import projection

    with no_op_kernels(), mock.patch.object(projection, "column_sums", _column_sums_as_on_a_gpu), _gemms_as_on_a_gpu():
        if compiled:
            layer = torch.compile(layer, backend="aot_eager", fullgraph=True)
            layer(q, k, v).backward(g)
            q.grad = k.grad = v.grad = None
        forward_peak, held = allocations(lambda: out.append(layer(q, k, v)))
        backward_peak, _ = allocations(lambda: out[0].backward(g))
        account = dict(forward_peak=forward_peak, held=held, backward_peak=held + backward_peak,
                       peak=max(forward_peak, held + backward_peak))
        if backward_phases:  # the forward profiled too: the CPU allocator sizes frees only of blocks it saw made
            allocations(lambda: out.__setitem__(0, layer(q, k, v)))
            account["backward"] = phases(lambda: out[0].backward(g))
    return account


def layer_peak_extra(L: int, H: int, D: int, **kwargs) -> int:
    """Peak extra bytes of ``layer(q, k, v).backward(g)`` (see :func:`layer_account`)."""
    return layer_account(L, H, D, **kwargs)["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=32768)
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--linear-sums", nargs="+", choices=LINEAR_SUMS, default=list(LINEAR_SUMS),
                        help="SLAConfig.linear_sums values to count, one after the other")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="q, k, v's dtype")
    parser.add_argument("--compiled", action="store_true",
                        help="the layer through torch.compile(fullgraph=True), aot_eager backend")
    parser.add_argument("--phases", action="store_true",
                        help="also print the backward's bytes at each launch and its live allocations at its peak")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    one = args.H * args.L * args.D * dtype.itemsize
    print(f"SLA layer fwd+bwd, kernel path{' (torch.compile, aot_eager)' if args.compiled else ''}, {args.dtype}, "
          f"[1, {args.H}, {args.L}, {args.D}], BQ 128 / BK 64, "
          f"topk 0.05; MiB above the inputs (x one q-sized tensor, {one / MIB:.1f} MiB):")
    accounts = {}
    for linear_sums in args.linear_sums:
        account = layer_account(args.L, args.H, args.D, dtype=dtype, linear_sums=linear_sums,
                                backward_phases=args.phases, compiled=args.compiled)
        backward = account.pop("backward", None)
        accounts[linear_sums] = account
        print(f" linear_sums={linear_sums!r}")
        for name, n in account.items():
            print(f"  {name:12} {n / MIB:8.1f} MiB  {n / one:5.2f} x q")
        if backward:
            print("  backward, MiB live above the inputs at each launch (held + the backward's own):")
            for name, n in backward["at_launch"]:
                print(f"   {name:16} {(account['held'] + n) / MIB:8.1f}")
            sizes = ", ".join(f"{n / MIB:.1f}" for n in backward["at_peak"] if n >= MIB)
            print(f"   allocated by the backward and live at its peak (MiB, >= 1): {sizes}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(L=args.L, H=args.H, D=args.D, dtype=args.dtype, compiled=args.compiled, q_mib=one / MIB,
                           **{linear_sums: {f"{name}_mib": n / MIB for name, n in account.items()}
                              for linear_sums, account in accounts.items()}), f, indent=1)


if __name__ == "__main__":
    main()
