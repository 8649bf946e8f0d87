"""Where each kernel's warps wait, from Nsight Compute's stall sampling: the SLA kernels' ncu source page as tables.

On the GPU machine (ncu reads the hardware counters there), ``python3 benchmarks/ncu_stalls.py --profile $OUT``
(``gpu_suite.sh ncu``) runs::

    ncu --clock-control none --kernel-name regex:'_sla_fwd_kernel|_bwd_dq_kernel|_bwd_dkdv_kernel' \\
        --launch-skip 6 --launch-count 3 --section WarpStateStats --section SchedulerStats --section SourceCounters \\
        --export $OUT/sla --force-overwrite python3 benchmarks/ncu_stalls.py --run --L 32768
    ncu --import $OUT/sla.ncu-rep --page source --csv --print-source sass > $OUT/sass.csv

and prints the tables (``python3 benchmarks/ncu_stalls.py $OUT/sass.csv`` prints them again; ``--clock-control none``
leaves the clocks alone). ``--run`` is the profiled program: the layer's forward+backward three times
(bf16, B 1, H 12, D 128, 95 %), so that skipping the first call's six kernel launches (tuning, first compiles) leaves
one launch of each kernel. The report gives per kernel the share of stall samples by reason (ncu's ``stall_*``
columns: long_sb a global-memory or TMA wait, barrier a CTA-wide or warp-group barrier, wait a fixed-latency
dependency, ...) and the SASS instructions holding most samples: the 2026-12-01 reading of these tables found the
split forward waiting for its K / V copies at 24 % of its samples (a third pipeline stage then took the kernel
1021 -> 858 us) and dQ / dK/dV waiting for their own wgmma results (``WARPGROUP.DEPBAR``).
"""

from __future__ import annotations

import argparse
import collections
import csv
import shutil
import subprocess
import sys
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


def read_source_page(path: Path) -> dict[str, list[dict[str, str]]]:
    """ncu's ``--page source --csv`` output -> {kernel name: its SASS rows (column -> value)}. The page repeats a
    ``"Kernel Name",<name>`` line, then a header, then one row per instruction, for each profiled launch; a kernel
    profiled more than once keeps its first launch."""
    kernels: dict[str, list[dict[str, str]]] = {}
    name, header, seen = None, None, set()
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                name, header = (row[1] if row[1] not in seen else None), None
                seen.add(row[1])
            elif row[0] == "Address":
                header = row
            elif name is not None and header is not None and len(row) == len(header):
                kernels.setdefault(name, []).append(dict(zip(header, row)))
    if not kernels:
        raise ValueError(f"{path}: no kernel rows; expected ncu's '--page source --csv --print-source sass' output")
    return kernels


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def stall_summary(rows: list[dict[str, str]], top: int) -> tuple[float, list[tuple[str, float]],
                                                                 list[tuple[str, str, float, str]]]:
    """(all samples, [(reason, share)] largest first, [(address, SASS, share, its largest reason)] of the ``top``
    instructions holding most samples)."""
    reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    by_reason = collections.Counter()
    for r in rows:
        for c in reasons:
            by_reason[c] += _number(r[c])
    total = sum(by_reason.values()) or 1.0
    shares = [(c.removeprefix("stall_"), v / total) for c, v in by_reason.most_common()]
    hottest = sorted(rows, key=lambda r: -_number(r[SAMPLES]))[:top]
    lines = [(r["Address"], r["Source"].strip(), _number(r[SAMPLES]) / total,
              max(reasons, key=lambda c: _number(r[c])).removeprefix("stall_")) for r in hottest]
    return total, shares, lines


def report(kernels: dict[str, list[dict[str, str]]], top: int) -> str:
    out = []
    for name, rows in kernels.items():
        total, shares, lines = stall_summary(rows, top)
        out.append(f"== {name}: {len(rows)} SASS instructions, {total:.0f} stall samples")
        out.append("   " + "  ".join(f"{reason} {100 * share:.1f} %" for reason, share in shares[:9]))
        out += [f"   {100 * share:5.1f} %  {address[-6:]}  {source[:72]:72}  ({reason})"
                for address, source, share, reason in lines]
    return "\n".join(out)


def run_layer(L: int) -> None:
    """The program ncu profiles: three forward+backward calls of the layer at L tokens."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from layer_inputs import layer_gradients, sla_layer_inputs

    layer, q, k, v, g = sla_layer_inputs(L, 12, 128)
    for _ in range(3):
        layer_gradients(layer, layer(q, k, v), q, k, v, g)
    torch.cuda.synchronize()


KERNELS = "regex:_sla_fwd_kernel|_bwd_dq_kernel|_bwd_dkdv_kernel"


def profile(out: Path, L: int) -> Path:
    """Run ncu over ``--run`` at L tokens and export the source page: the CSV's path."""
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not Path(ncu).exists():
        raise FileNotFoundError(f"no ncu on PATH or at {ncu}")
    out.mkdir(parents=True, exist_ok=True)
    report_file, sass = out / "sla.ncu-rep", out / "sass.csv"
    subprocess.run([ncu, "--clock-control", "none", "--kernel-name", KERNELS, "--launch-skip", "6", "--launch-count",
                    "3", "--section", "WarpStateStats", "--section", "SchedulerStats", "--section", "SourceCounters",
                    "--export", str(report_file.with_suffix("")), "--force-overwrite", sys.executable, __file__,
                    "--run", "--L", str(L)], check=True)
    with open(sass, "w") as f:
        subprocess.run([ncu, "--import", str(report_file), "--page", "source", "--csv", "--print-source", "sass"],
                       stdout=f, check=True)
    report_file.unlink()  # tens of MB; the CSV holds what the tables need
    return sass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=12, help="instructions listed per kernel")
    parser.add_argument("--run", action="store_true", help="run the layer for ncu to profile instead")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="run ncu (GPU) and write DIR/sass.csv first")
    parser.add_argument("--L", type=int, default=32768)
    args = parser.parse_args(argv)
    if args.run:
        run_layer(args.L)
        return
    if args.profile is not None:
        args.csv = profile(args.profile, args.L)
    if args.csv is None:
        parser.error("give the CSV to read, --profile DIR or --run")
    print(report(read_source_page(args.csv), args.top))


if __name__ == "__main__":
    main()
