"""Time one SLA layer (bf16 or fp16, B=1 H=12 D=128, 95 %, BQ128) at L = 32768 and 8192, to compare code versions.

    PYTHONPATH=/path/to/checkout python benchmarks/time_layer.py LABEL [--compile MODE]

The sla_dist that PYTHONPATH points at is timed (its path is printed first), so two checkouts compare on one card in
one device call, e.g. ``git worktree add /tmp/old <commit>`` beside this one. Medians of triton.testing.do_bench;
"host-side" is the wall time of 20 unsynchronised forward+backward calls, the launch-bound floor at short L.
``--compile MODE`` times ``torch.compile(layer, mode=MODE)`` instead (e.g. ``reduce-overhead``); ``--graph`` times
the layer captured by ``torch.cuda.make_graphed_callables`` (forward and backward replayed as CUDA graphs: no host
time per call beyond the replay). ``--fwd-loop baseline fma ...`` times the forward kernel's loop variants one after
the other in the same process, on identically seeded inputs (SLA_DIST_FWD_LOOP; options joined by '+', e.g.
``even+fma``); without it the environment's setting is timed. ``--tma off all fwd+dq ...`` likewise times the
kernels' tile loads through tensor descriptors (SLA_DIST_TMA: off, all, or kernels from fwd, dq, dkdv joined by '+'),
each value under every forward loop; the label says which (``+tma:all``). ``--prepass block loop`` likewise times the
backward pre-pass's launches (SLA_DIST_PREPASS: one program per query block, or programs looping over the blocks;
label ``+prepass:loop``). ``--classify separate packed`` likewise times the block map's classify kernel's radix
selects (SLA_DIST_CLASSIFY; label ``+classify:packed``). ``--dq-split off halves`` likewise times dQ's launch
(SLA_DIST_DQ_SPLIT: a program per query block, or two over its row halves; label ``+dq:halves``). ``--linear-sums
save recompute`` times the layer with each SLAConfig.linear_sums in turn (without it the layer's default, so a
checkout from before the option can be timed). ``--setting fwd_split=4x3 dq=8x4+dkdv=8x2 default`` times fixed
launch settings (warps x stages per kernel of configs.py's tuning table, untuned; ``dkdv=4x2/Q_STEPS=2`` also sets
constexprs) one after the other. ``--kernels`` adds the CUDA time of the
forward, dQ and dK/dV kernels, the backward's pre-pass and the glue's Triton kernels (the linear summaries, block sums
and classify) in one forward+backward (torch.profiler over 5 calls): what a variant changes.
``--dtype float16`` times float16 inputs (label suffix ``+float16``; their linear-branch summaries are float32,
layout.summary_dtype).

Inputs like a model's, one factor at a time (each a list: one run per value, after the L loop; a label suffix names
every value that is not the default): ``--L 32760`` a length with partial last blocks; ``--layout blhd fused`` q, k,
v and dO in a model's memory order (layer_inputs.LAYOUTS); ``--inputs field dit`` q, k from locality_inputs.py over
``--grid`` (its T H W tokens replace --L; ``--tile 1,1,1 --dit-model wan2.1-1.3b --qk-init independent --latents
gaussian`` is bench_dit_step.py's model); ``--negligible X`` the layer's negligible fraction. ``--tiny`` runs a tiny
problem on the CPU (the reference backend, float32, plain wall-clock timing): a smoke test of every option.
"""

import argparse
import contextlib
import itertools
import os
import statistics
import time

import torch
import triton.testing as tt
from torch.nn.attention import SDPBackend

# this script's folder is on sys.path when it runs
from glue_fraction import PREPASS_KERNEL, SPARSE_KERNELS, is_kernel, profile_kernels
from layer_inputs import (add_input_arguments, dense_sdpa, input_lengths, input_settings, layer_gradients,
                          sla_layer_inputs)

# sla_dist.kernels.configs' switches, named here: a checkout from before them is timed too, without them
FWD_LOOP_ENV = "SLA_DIST_FWD_LOOP"
TMA_ENV = "SLA_DIST_TMA"
PREPASS_ENV = "SLA_DIST_PREPASS"
CLASSIFY_ENV = "SLA_DIST_CLASSIFY"
DQ_SPLIT_ENV = "SLA_DIST_DQ_SPLIT"
GLUE_KERNELS = ("_linear_summaries_kernel", "_block_sums_kernel", "_classify_kernel")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_side_ms(step, device: torch.device) -> float:
    n = 20 if device.type == "cuda" else 2  # the CPU smoke test needs the code path, not the number
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    elapsed = (time.perf_counter() - start) / n * 1e3
    sync(device)
    return elapsed


def bench_ms(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn``: triton's do_bench on a GPU, the wall time of a few calls on the CPU."""
    if device.type == "cuda":
        return tt.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sparse_kernel_us(step) -> str:
    """The CUDA time of each sparse-branch kernel (forward, dQ, dK/dV), of the pre-pass and of the glue's Triton
    kernels (GLUE_KERNELS) in one ``step``, as 'name us' columns."""
    times = profile_kernels(step, calls=5)
    return "  ".join(f"{kernel} {sum(t for name, t in times.items() if is_kernel(name, kernel)):.0f} us"
                     for kernel in SPARSE_KERNELS + (PREPASS_KERNEL,) + GLUE_KERNELS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label", nargs="?", default="sla_dist")
    capture = parser.add_mutually_exclusive_group()
    capture.add_argument("--compile", metavar="MODE", help="torch.compile mode, e.g. default or reduce-overhead")
    capture.add_argument("--graph", action="store_true", help="time the layer captured in CUDA graphs")
    parser.add_argument("--dense", action="store_true",
                        help="also time dense SDPA (cuDNN) on the same q, k, v: the baseline of the same run")
    parser.add_argument("--fwd-loop", nargs="+", metavar="LOOP",
                        help="forward loop variants to time one after the other (baseline, or options from "
                             "even, fma, split joined by '+'); default: the measured rule, or SLA_DIST_FWD_LOOP")
    parser.add_argument("--linear-sums", nargs="+", choices=("save", "recompute"), metavar="MODE",
                        help="SLAConfig.linear_sums values to time one after the other (save, recompute)")
    parser.add_argument("--tma", nargs="+", metavar="KERNELS",
                        help="tensor-descriptor tile loads to time one after the other (off, all, or kernels from fwd, "
                             "dq, dkdv joined by '+'); default: SLA_DIST_TMA, else the device's default "
                             "(configs.tma_kernels)")
    parser.add_argument("--prepass", nargs="+", choices=("block", "loop"), metavar="LAUNCH",
                        help="backward pre-pass launches to time one after the other (block, loop); default: "
                             "SLA_DIST_PREPASS, else the device's default (configs.prepass_launch)")
    parser.add_argument("--classify", nargs="+", choices=("separate", "packed"), metavar="SELECT",
                        help="the block map's classify selects to time one after the other (separate, packed); "
                             "default: SLA_DIST_CLASSIFY, else packed (configs.DEFAULT_CLASSIFY)")
    parser.add_argument("--dq-split", nargs="+", choices=("off", "halves"), metavar="SPLIT",
                        help="dQ launches to time one after the other (off: a program per query block, halves: two); "
                             "default: SLA_DIST_DQ_SPLIT, else off")
    parser.add_argument("--setting", nargs="+", metavar="KERNEL=WxS",
                        help="fixed launch settings to time one after the other, untuned: kernels of the tuning table "
                             "(sla_dist/kernels/configs.py) with warps x stages and optional constexprs, several "
                             "joined by '+', e.g. fwd_split=4x3+dq=8x4 or dkdv=4x2/Q_STEPS=2; 'default' for the "
                             "table's own")
    parser.add_argument("--kernels", action="store_true",
                        help="also the forward, dQ and dK/dV kernels' and the pre-pass' CUDA time in a "
                             "forward+backward")
    parser.add_argument("--L", type=int, nargs="+", default=[32768, 8192], help="sequence lengths (iid inputs)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="q, k, v's dtype (GPU)")
    parser.add_argument("--head-dim", type=int, default=128, help="D of the 12 heads (GPU)")
    add_input_arguments(parser)
    parser.add_argument("--tiny", action="store_true", help="H 2, D 32, L 256 (grid 4,8,8), float32 on the CPU: a "
                        "smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        if args.graph or args.dense or args.kernels:
            parser.error("--tiny runs on the CPU: --graph, --dense and --kernels need a GPU")
        args.L, args.grid, args.heads, args.head_dim = [256], (4, 8, 8), 2, 32
        args.device = torch.device("cpu")
    else:
        args.heads, args.device = 12, torch.device("cuda")
    label = args.label + (f"+{args.dtype}" if args.dtype != "bfloat16" else "")
    label += f"+D{args.head_dim}" if args.head_dim != 128 and not args.tiny else ""
    args.dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    label += (f"+compile:{args.compile}" if args.compile else "") + ("+graph" if args.graph else "")
    print("sla_dist from", __import__("sla_dist").__file__)
    for L in input_lengths(args, args.L):
        for source, layout, inputs in input_settings(args):
            suffix = "".join(f"+{v}" for v in (source, layout) if v not in ("iid", "bhld"))
            suffix += f"+neg:{args.negligible}" if args.negligible is not None else ""
            for loop, tma, prepass, select, dq_split, sums, setting in itertools.product(
                    args.fwd_loop or [None], args.tma or [None], args.prepass or [None], args.classify or [None],
                    args.dq_split or [None], args.linear_sums or [None], args.setting or [None]):
                variant = ""
                for env, value, name in ((FWD_LOOP_ENV, loop, "fwd"), (TMA_ENV, tma, "tma"),
                                         (PREPASS_ENV, prepass, "prepass"), (CLASSIFY_ENV, select, "classify"),
                                         (DQ_SPLIT_ENV, dq_split, "dq")):
                    if value is not None:
                        os.environ[env] = value
                        variant += f"+{name}:{value}"
                variant += f"+sums:{sums}" if sums else ""
                variant += f"+set:{setting}" if setting else ""
                variant_inputs = inputs if sums is None else dict(inputs, linear_sums=sums)
                with launch_settings(setting):
                    time_layer(L, label + suffix + variant, variant_inputs, args)
        if args.dense:
            torch.manual_seed(0)  # the layer's q, k, v
            _, q, k, v, g = sla_layer_inputs(L, 12, args.head_dim, dtype=args.dtype)
            dense = dense_sdpa(SDPBackend.CUDNN_ATTENTION)
            with torch.no_grad():
                fwd = tt.do_bench(lambda: dense(q, k, v), warmup=25, rep=100, return_mode="median")
            fwd_bwd = tt.do_bench(lambda: dense(q, k, v).backward(g), warmup=25, rep=100, grad_to_none=[q, k, v],
                                  return_mode="median")
            print(f"{'cuDNN':8} L={L:6} fwd {fwd:.3f} ms  fwd+bwd {fwd_bwd:.3f} ms  (dense SDPA)")


def launch_settings(setting: str | None):
    """The kernels' fixed launch settings for one run (configs.fixed_settings): None leaves the launches alone, so
    a checkout from before that function is timed too; 'default' is the tuning table's own, untuned."""
    if setting is None:
        return contextlib.nullcontext()
    from sla_dist.kernels.configs import fixed_settings, parse_settings
    return fixed_settings({} if setting == "default" else parse_settings(setting))


def time_layer(L: int, label: str, inputs: dict, args: argparse.Namespace) -> None:
    """Print the layer's forward and forward+backward times at length L (fresh inputs, seeded identically);
    ``inputs``: sla_layer_inputs' source / layout / layer keywords."""
    torch.manual_seed(0)
    layer, q, k, v, g = sla_layer_inputs(L, args.heads, args.head_dim, device=args.device, dtype=args.dtype,
                                         **inputs)
    compiled = torch.compile(layer, mode=args.compile) if args.compile else layer
    if args.graph:
        compiled = torch.cuda.make_graphed_callables(layer, (q, k, v))

    def m(*inputs):
        if args.compile:  # CUDA-graph outputs of one call are reused by the next: say where a step begins
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*inputs)

    with torch.no_grad():
        fwd = bench_ms(lambda: m(q, k, v), args.device)

    def step():
        # Gradients returned, not accumulated (see layer_gradients); under reduce-overhead a .grad allocated in a CUDA
        # graph would also be overwritten by the next replay, so accumulating into it fails.
        layer_gradients(layer, m(q, k, v), q, k, v, g)

    fwd_bwd = bench_ms(step, args.device)
    kernels = f"  kernels: {sparse_kernel_us(step)}" if args.kernels else ""
    print(f"{label:8} L={L:6} fwd {fwd:.3f} ms  fwd+bwd {fwd_bwd:.3f} ms  host-side fwd+bwd "
          f"{host_side_ms(step, args.device):.3f} ms{kernels}")


if __name__ == "__main__":
    main()
