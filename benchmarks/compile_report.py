"""Static compile report of the SLA kernels for Hopper (sm_90), made on any machine (no GPU).

For every autotune candidate (tile-shape choices x warps x pipeline stages, from the tuning table in
sla_dist/kernels/configs.py) at the given shapes, compile through Triton's ahead-of-time path
(sla_dist.kernels.aot) and tabulate registers per thread, bytes spilled, shared memory and wgmma use. A candidate
that spills or exceeds the 228 KiB of shared memory an H100/H200 SM offers is marked: these facts say which tile
shapes can be fast, not how fast they are (that is bench_attention.py's job, on a GPU).

    python benchmarks/compile_report.py --out benchmarks/results/<date>-sm90-compile-report.md

``--tma both`` compiles the kernels that can load their loop tiles through tensor descriptors (SLA_DIST_TMA: fwd,
fwd_split, dq, dkdv) with and without them, one row each; ``--tma on`` only with them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

from sla_dist.kernels.aot import TMA_ENTRIES, Variant, compile_variant  # noqa: E402
from sla_dist.kernels.configs import _KERNELS, FWD_SPLIT_Q, SPLIT_MIN_ROWS  # noqa: E402

HOPPER_SHARED_KIB = 228


TMA_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def candidates(kernel: str, tma: str = "off", **shape) -> list[Variant]:
    """Every autotune candidate of ``kernel``, for each tensor-descriptor setting of ``tma`` (TMA_MODES) that it
    takes (kernels without descriptor loads: the pointer path alone)."""
    modes = TMA_MODES[tma] if kernel in TMA_ENTRIES else (False,)
    return [Variant(kernel, num_warps=warps, num_stages=stages, choices=meta, tma=on, **shape)
            for meta, warps, stages in _KERNELS[kernel].candidates() for on in modes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="markdown file to write")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--block-q", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--kernels", nargs="+", choices=list(_KERNELS), default=list(_KERNELS))
    parser.add_argument("--tma", choices=list(TMA_MODES), default="off",
                        help="tile loads through tensor descriptors (SLA_DIST_TMA) in the kernels that have them")
    args = parser.parse_args(argv)
    rows = ["| kernel | D | BQ | tile choice | warps | stages | TMA | regs | spilled B | shared KiB | wgmma | fixed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for D, block_q, kernel in itertools.product(args.head_dims, args.block_q, args.kernels):
        if kernel == "fwd_split" and block_q < FWD_SPLIT_Q * SPLIT_MIN_ROWS:  # the launcher runs fwd there
            continue
        for v in candidates(kernel, args.tma, dtype=args.dtype, D=D, block_q=block_q):
            r = compile_variant(v)
            shared = r.shared_bytes / 1024
            flags = (" (spills)" if r.spill_bytes else "") + (" (too much shared)" if shared > HOPPER_SHARED_KIB
                                                               else "")
            choice = ", ".join(f"{k}={val}" for k, val in v.choices.items()) or "-"
            t = _KERNELS[kernel]
            fixed = "yes" if (v.num_warps, v.num_stages) == t.fixed and v.choices == t.metas()[0] else ""
            rows.append(f"| {kernel} | {D} | {block_q} | {choice} | {v.num_warps} | {v.num_stages} | "
                        f"{'on' if v.tma else 'off'} | {r.registers} | "
                        f"{r.spill_bytes}{flags} | {shared:.0f} | {r.wgmma} | {fixed} |")
            print(rows[-1], flush=True)
    header = (f"# SLA kernels compiled for sm_90 — static report\n\n- triton {triton.__version__}, dtype {args.dtype}, "
              f"softmax feature map, linear branch on; every autotune candidate of configs.py "
              f"({', '.join(args.kernels)}; tensor descriptors: {args.tma}).\n"
              f"- Command: `python benchmarks/compile_report.py {' '.join(argv or sys.argv[1:])}`\n"
              f"- Compiled on a machine without a GPU (Triton's AOT path, alignment hints of a real launch); "
              f"no timings.\n\n")
    if args.out:
        Path(args.out).write_text(header + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
