"""Compile the SLA kernels ahead of time for a GPU architecture, on any machine (no GPU needed).

Triton's compiler is a library: :func:`compile_variant` lowers one kernel variant through Triton IR to PTX and a cubin
for a target such as Hopper (``sm_90``), with the alignment hints a real launch gets (16-byte aligned pointers and
strides that are multiples of 16 elements), and reads back what the assembler decided: registers per thread, bytes
spilled to local memory, shared memory, and whether the dots became Hopper ``wgmma`` instructions. The test suite
uses it to check on a CPU-only machine that every tile shape the autotuner may pick compiles for Hopper, and
``benchmarks/compile_report.py`` tabulates it over all autotune candidates. :func:`model_kernels` lists the DiT's
own kernels (norm_rope, gelu_mlp) as their launchers call them, for the same check (``--model-kernels DTYPE``).
These are static facts about the code, not timings.

The kernel modules must be imported without ``TRITON_INTERPRET=1`` (the interpreter replaces them with Python
functions that cannot be compiled); ``python -m sla_dist.kernels.aot`` runs a check in a clean process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from ..config import FEATURE_MAPS
from .configs import (_KERNELS, CLASSIFY_ENV, DKDV_ORDER_ENV, DKDV_ORDERS, DKDV_PROGRAM_COST, DKDV_SPLIT_MIN_PART,
                      DQ_SPLIT_Q, FWD_SPLIT_Q, LONG_FIRST_FACTOR, SPLIT_MIN_ROWS, TMA_ENV, FwdLoop, check_choice,
                      interpreting)
from .block_map import SCORE_TILE
from .dkdv_plan import ORDER_COLS, ORDER_ROWS
from .layout import dot_precision, summary_dtype

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# Pointer arguments by role: "x" the input dtype, "sum" the linear-branch summaries h, z and their sums and gradients
# (layout.summary_dtype, as on a GPU), "proj" proj_l's weight and bias (Variant.proj_dtype), "f32" / "f64" / "i64" /
# "i32" / "i8" fixed. Other non-constexpr arguments are int32 scalars, except the float scales.
_POINTERS = {
    "fwd": dict(Q="x", K="x", V="x", O="x", OL="x", LSE="f32", OUT="x", W="proj", B="proj", KV_NUM="i32",
                KV_IDX="i32", HL="sum", ZL="sum"),
    "summaries": dict(K="x", V="x", HZ="sum"),
    "block_sums": dict(X="x", SUMS="f64"),
    "block_scores": dict(Q_SUMS="f64", K_SUMS="f64", K_TOTAL="f64", SCORES="f32"),
    "classify": dict(SCORES="f32", CLASS="i8", KV_IDX="i32"),
    "critical_columns": dict(CLASS="i8", Q_NUM="i32", Q_IDX="i32"),
    # The pre-pass takes proj_l's W in the inputs' dtype (the launcher casts it, as for the product it replaces).
    "prepass": dict(Q="x", O="x", DO="x", DOL="x", W="x", DQ="x", DLSE="f32", DELTA="f32", HL="sum", ZL="sum",
                    DHZ="sum"),
    "dq": dict(Q="x", K="x", V="x", DO="x", DQ="x", LSE="f32", DELTA="f32", KV_NUM="i32", KV_IDX="i32"),
    "dkdv": dict(Q="x", K="x", V="x", DO="x", DK="x", DV="x", LSE="f32", DELTA="f32", Q_NUM="i32", Q_IDX="i32",
                 DHS="sum", DZS="sum", ORDER="i64", WORK="i32", SCRATCH="f32"),
    "dkdv_combine": dict(SCRATCH="f32", COMBINE="i32", DK="x", DV="x"),
    "dkdv_split_plan": dict(Q_NUM="i32", WORK="i32", COMBINE="i32", PART="i32"),
    "long_first_order": dict(Q_NUM="i32", ORDER="i64"),
}
_POINTERS["fwd_split"] = _POINTERS["fwd"]
_POINTERS["dq_split"] = _POINTERS["dq"]
_POINTERS["prepass_loop"] = _POINTERS["prepass"]
_FLOATS = {"qk_scale", "sm_scale"}
TMA_ENTRIES = ("fwd", "fwd_split", "dq", "dq_split", "dkdv")
"""Launch entries whose kernels take USE_TMA (configs.TMA_KERNELS' fwd and dq are both entries of each)."""
SPLIT_ENTRIES = {"fwd_split": FWD_SPLIT_Q, "dq_split": DQ_SPLIT_Q}
"""Launch entries that take a query block in several programs, and how many: the block needs that many times
SPLIT_MIN_ROWS rows."""


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of one kernel."""

    kernel: str
    """Key of the tuning table in configs.py: fwd, fwd_split, summaries, block_sums, block_scores, classify,
    critical_columns, prepass, dq, dq_split, dkdv, long_first_order, dkdv_split_plan, dkdv_combine."""
    dtype: str = "bfloat16"
    D: int = 128
    block_q: int = 128
    block_k: int = 64
    feature_map: str = "softmax"
    has_linear: bool = True
    has_proj: bool = True
    """The forward applies proj_l in its epilogue (with a bias), and the backward's pre-pass makes dO_l = dOut W
    (no stored dO_l), as in the layer; False: sla_branches, whose dO_l the pre-pass reads."""
    proj_dtype: str = "float32"
    """proj_l's stored dtype: float32 master weights under autocast."""
    num_warps: int | None = None
    """None: the kernel's fixed (non-autotuned) setting."""
    num_stages: int | None = None
    choices: dict[str, int] = field(default_factory=dict)
    """Tile-shape constexprs (KEYS_AS_COLUMNS, Q_STEPS); missing ones take their first option."""
    fwd_loop: str = "baseline"
    """The forward's loop options (configs.FwdLoop, as in SLA_DIST_FWD_LOOP; 'even' compiles the unmasked loop).
    'split' is the fwd_split entry, not an option here."""
    dkdv_order: str = "natural"
    """dK/dV's program order (configs.DKDV_ORDERS, as in SLA_DIST_DKDV_ORDER); every order but natural compiles the
    same ORDERED kernel."""
    dkdv_split: bool = False
    """dK/dV takes its work from the split plan (SPLIT, as SLA_DIST_DKDV_SPLIT=long)."""
    v_like_k: bool = True
    """v shares k's strides (forward and dQ address both with one offset tile); False: v in its own layout, as a
    DiT's v sliced from the fused qkv projection."""
    tma: bool = False
    """The loop's tiles through tensor descriptors (USE_TMA, as SLA_DIST_TMA turns on for fwd, dq and dkdv)."""
    packed: bool = False
    """classify's two radix selects in one loop (PACKED, the default; SLA_DIST_CLASSIFY=separate turns it off)."""

    def __post_init__(self) -> None:
        if self.kernel not in _KERNELS:
            raise ValueError(f"kernel={self.kernel!r}; choose one of {sorted(_KERNELS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {sorted(DTYPES)}")
        if self.proj_dtype not in DTYPES:
            raise ValueError(f"proj_dtype={self.proj_dtype!r}; choose one of {sorted(DTYPES)}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={self.feature_map!r}; choose one of {FEATURE_MAPS}")
        if FwdLoop.parse(self.fwd_loop).split:
            raise ValueError(f"fwd_loop={self.fwd_loop!r}: compile kernel 'fwd_split' for the split loop")
        if self.fwd_loop != "baseline" and not self.kernel.startswith("fwd"):
            raise ValueError(f"fwd_loop={self.fwd_loop!r} applies to the forward kernels, not {self.kernel}")
        check_choice(DKDV_ORDER_ENV, self.dkdv_order, DKDV_ORDERS)
        if self.dkdv_order != "natural" and self.kernel != "dkdv":
            raise ValueError(f"dkdv_order={self.dkdv_order!r} applies to dkdv, not {self.kernel}")
        if self.dkdv_split and self.kernel != "dkdv":
            raise ValueError(f"dkdv_split=True applies to dkdv, not {self.kernel}")
        split = SPLIT_ENTRIES.get(self.kernel, 1)
        if self.block_q < split * SPLIT_MIN_ROWS:
            raise ValueError(f"block_q={self.block_q}: {self.kernel} takes query blocks of at least "
                             f"{split * SPLIT_MIN_ROWS} rows")
        if self.tma and self.kernel not in TMA_ENTRIES:
            raise ValueError(f"tma=True ({TMA_ENV}) applies to {sorted(TMA_ENTRIES)}, not {self.kernel}")
        if self.packed and self.kernel != "classify":
            raise ValueError(f"packed=True ({CLASSIFY_ENV}) applies to classify, not {self.kernel}")
        known = {name for name, _ in _KERNELS[self.kernel].choices}
        if set(self.choices) - known:
            raise ValueError(f"choices {sorted(set(self.choices) - known)} do not apply to {self.kernel}; "
                             f"it takes {sorted(known)}")

    def constexprs(self) -> dict:
        values = dict(D=self.D, BLOCK_Q=self.block_q, BLOCK_K=self.block_k,
                      FEATURE_MAP=FEATURE_MAPS.index(self.feature_map), HAS_LINEAR=self.has_linear,
                      HAS_PROJ=self.has_proj, HAS_BIAS=self.has_proj, HAS_DOL=not self.has_proj,
                      PRECISION=dot_precision(getattr(torch, self.dtype)), HAS_DLSE=True, BLOCK=self.block_k,
                      NK_POW2=1024, NQ_POW2=512, D_POW2=self.D, BLOCK_M=SCORE_TILE, BLOCK_N=SCORE_TILE,
                      ORDERED=self.dkdv_order != "natural" and not self.dkdv_split, SPLIT=self.dkdv_split,
                      Q_SPLIT=1,  # dK/dV's row slices within a step: a kernel option outside the tuning
                      SPLIT_Q=1,  # programs per query block (the split entries' constants override it)
                      # the split plan kernel: lpt-head's comparisons (MODE 1), dkdv_plan's PLAN_ROWS / PLAN_COLS
                      MODE=1, COST=DKDV_PROGRAM_COST, MIN_PART=DKDV_SPLIT_MIN_PART, LONG_FACTOR=LONG_FIRST_FACTOR,
                      ROWS=128, COLS=32,
                      V_LIKE_K=self.v_like_k, USE_TMA=self.tma, PACKED=self.packed)
        if self.kernel == "long_first_order":
            values.update(ROWS=ORDER_ROWS, COLS=ORDER_COLS)
        values.update({name: options[0] for name, options in _KERNELS[self.kernel].choices})
        values.update(self.choices)
        values.update(FwdLoop.parse(self.fwd_loop).constexprs(even_keys=True))
        values.update(_KERNELS[self.kernel].constants)
        return values

    def launch(self) -> tuple[int, int]:
        fixed = _KERNELS[self.kernel].fixed
        return self.num_warps or fixed[0], self.num_stages or fixed[1]


@dataclass(frozen=True)
class Compiled:
    """What the assembler made of one variant."""

    variant: Variant
    registers: int
    spill_bytes: int
    """Per-thread stack frame (spilled registers); 0 when everything fits in registers."""
    shared_bytes: int
    wgmma: int
    """Hopper warp-group MMA instructions in the PTX (0: the dots use older mma or FMA)."""
    tma_copies: int = 0
    """Tensor-descriptor copies (``cp.async.bulk.tensor``, Hopper's TMA engine) in the PTX: the tiles loaded through
    descriptors (Variant.tma); 0 on the pointer path."""
    async_copies: int = 0
    """Asynchronous global-to-shared copies by pointers (``cp.async``, issued per thread) in the PTX: the loads that
    the software pipeliner (num_stages > 1) copies ahead of their use; 0 where every load waits in place."""


def _signature(fn, variant: Variant) -> tuple[dict, dict, dict]:
    summaries = str(summary_dtype(getattr(torch, variant.dtype), interpreting=False)).removeprefix("torch.")
    roles = dict(x=DTYPES[variant.dtype], sum=DTYPES[summaries], proj=DTYPES[variant.proj_dtype], f32="fp32",
                 f64="fp64", i64="i64", i32="i32", i8="i8")
    pointers = _POINTERS[variant.kernel]
    names = fn.arg_names
    constexprs = {name: value for name, value in variant.constexprs().items() if name in names}
    signature = {}
    for name in names:
        if name in pointers:
            signature[name] = "*" + roles[pointers[name]]
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name in _FLOATS else "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
               if name in pointers or name.startswith("stride")}
    return signature, constexprs, aligned


def nvidia_tool(name: str) -> str:
    """Path of one of the NVIDIA binaries (ptxas, cuobjdump) that Triton's wheel carries."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resources(cubin: bytes) -> dict[str, int]:
    tool = nvidia_tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out.stdout)}


def _compile(fn, signature: dict, constexprs: dict, aligned: dict, warps: int, stages: int, arch: int):
    """(Triton's compiled kernel, the cubin's resource usage) of ``fn`` for ``sm_<arch>``."""
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 turns the kernels into Python functions; compile in a process "
                           "without it (python -m sla_dist.kernels.aot)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=aligned),
                            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    return kernel, _resources(kernel.asm["cubin"])


def compile_variant(variant: Variant, arch: int = 90) -> Compiled:
    """Compile ``variant`` for ``sm_<arch>`` and report registers, spills, shared memory and wgmma use."""
    tuning = _KERNELS[variant.kernel]
    module = __import__(f"{__package__}.{tuning.module}", fromlist=[tuning.function])
    fn = getattr(module, tuning.function)
    signature, constexprs, aligned = _signature(fn, variant)
    kernel, usage = _compile(fn, signature, constexprs, aligned, *variant.launch(), arch)
    return Compiled(variant, registers=usage.get("REG", 0), spill_bytes=usage.get("STACK", 0),
                    shared_bytes=int(kernel.metadata.shared), wgmma=kernel.asm["ptx"].count("wgmma.mma_async"),
                    tma_copies=kernel.asm["ptx"].count("cp.async.bulk.tensor"),
                    async_copies=sum(kernel.asm["ptx"].count(f"cp.async.{c}.shared.global") for c in ("ca", "cg")))


@dataclass(frozen=True)
class ModelKernel:
    """One of the DiT's own kernels (norm_rope, gelu_mlp) as its launcher calls it at the 1.3B DiT's shape (dim
    1536, 12 heads, hidden 8960): argument types by name, compile-time values, warps."""

    name: str
    module: str
    function: str
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 3  # Triton's default on CUDA, which these launches keep


def model_kernels(dtype: str = "bf16") -> list[ModelKernel]:
    """The DiT's kernels with their launchers' settings, for inputs of ``dtype`` (bf16, fp16, fp32)."""
    from .gelu_mlp import BACKWARD_LAUNCH as gelu
    from .norm_rope import BACKWARD_LAUNCH as rope
    from .norm_rope import launch_constants

    x = "*" + dtype
    dim, heads = 1536, 12
    rope_sizes = launch_constants(dim, heads)
    tables = dict(cos_ptr="*fp32", sin_ptr="*fp32", rstd_ptr="*fp32")
    return [
        ModelKernel("norm_rope_fwd", "norm_rope_kernels", "norm_rope_fwd_kernel",
                    dict(x_ptr=x, w_ptr=x, **tables, out_ptr=x, L="i32", stride_xb="i32", stride_xl="i32",
                         eps="fp32"), rope_sizes, 4),
        ModelKernel("norm_rope_bwd", "norm_rope_kernels", "norm_rope_bwd_kernel",
                    dict(g_ptr=x, x_ptr=x, w_ptr=x, **tables, dx_ptr=x, dw_ptr="*fp32", N="i32", L="i32",
                         tokens_per_program="i32", stride_gb="i32", stride_gl="i32", stride_gh="i32",
                         stride_xb="i32", stride_xl="i32"), dict(rope_sizes, ROWS=rope.rows), rope.warps),
        ModelKernel("gelu_tanh_bwd", "gelu_kernels", "gelu_tanh_bwd_kernel",
                    dict(ga_ptr=x, h_ptr=x, dh_ptr=x, a_ptr=x, part_ptr="*fp32", M="i32", N="i32",
                         rows_per_program="i32"), dict(BLOCK_M=gelu.block_m, BLOCK_N=gelu.block_n), gelu.warps),
    ]


def compile_model_kernel(kernel: ModelKernel, arch: int = 90) -> dict:
    """Compile one of :func:`model_kernels` for ``sm_<arch>``: its name, registers, spilled bytes, shared memory."""
    module = __import__(f"{__package__}.{kernel.module}", fromlist=[kernel.function])
    fn = getattr(module, kernel.function)
    names = fn.arg_names
    signature = {name: kernel.signature.get(name, "constexpr") for name in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name.endswith("_ptr")}
    compiled, usage = _compile(fn, signature, kernel.constexprs, aligned, kernel.num_warps, kernel.num_stages, arch)
    return dict(name=kernel.name, registers=usage.get("REG", 0), spill_bytes=usage.get("STACK", 0),
                shared_bytes=int(compiled.metadata.shared))


def check_variants() -> list[Variant]:
    """Every tile-shape option of every kernel at the headline shape, plus other dtypes, head dims, block sizes
    and feature maps (each value at least once)."""
    variants = []
    for name, tuning in _KERNELS.items():
        variants.append(Variant(name))
        for choice, options in tuning.choices:
            variants += [Variant(name, choices={choice: option}) for option in options[1:]]
        block_q = 128 if name in SPLIT_ENTRIES else 64  # the split needs two warp groups' rows
        variants.append(Variant(name, dtype="float16", D=64, block_q=block_q, feature_map="elu", has_linear=False))
        # The linear branch without the projection: sla_branches' forward.
        variants.append(Variant(name, dtype="float32", D=32, block_q=block_q, feature_map="relu", has_proj=False))
    # The forward's loop options as the layer launches them at D 128 (configs._MEASURED_FWD_LOOPS).
    variants += [Variant("fwd_split", fwd_loop="even+fma"), Variant("fwd", fwd_loop="fma", has_linear=False)]
    variants += [Variant("dkdv", dkdv_order="lpt"), Variant("dkdv", dkdv_split=True), Variant("classify", packed=True)]
    # The tensor-descriptor loads (SLA_DIST_TMA, half dtypes only): each kernel at the headline shape, dK/dV's row
    # slices, and the narrowest rows a descriptor takes (float16 D 32: 64 bytes) with 64-row query blocks.
    variants += [Variant(name, tma=True) for name in TMA_ENTRIES]
    variants += [Variant("dkdv", tma=True, choices={"Q_STEPS": 1}), Variant("fwd_split", fwd_loop="even+fma", tma=True)]
    variants += [Variant(name, tma=True, dtype="float16", D=32, block_q=128 if name in SPLIT_ENTRIES else 64,
                         feature_map="relu", has_proj=False) for name in TMA_ENTRIES]
    return variants


def run_in_clean_process(variants: list[Variant], arch: int = 90) -> list[dict]:
    """compile_variant for each variant in a child process without TRITON_INTERPRET; the results as dicts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"arch": arch, "variants": [asdict(v) for v in variants]})
    out = subprocess.run([sys.executable, "-m", __name__, "--json"], input=payload, capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"compiling for sm_{arch} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the SLA kernels for a GPU architecture without a GPU.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    parser.add_argument("--json", action="store_true", help="read {arch, variants} on stdin, write results")
    parser.add_argument("--model-kernels", metavar="DTYPE", help="compile the DiT's kernels (model_kernels) for "
                        "inputs of DTYPE (bf16, fp16, fp32) and write their resources as JSON")
    args = parser.parse_args(argv)
    if args.model_kernels:
        json.dump([compile_model_kernel(k, args.arch) for k in model_kernels(args.model_kernels)], sys.stdout)
        return 0
    if args.json:
        request = json.load(sys.stdin)
        results = [compile_variant(Variant(**v), request["arch"]) for v in request["variants"]]
        json.dump([asdict(r) for r in results], sys.stdout)
        return 0
    for result in map(lambda v: compile_variant(v, args.arch), check_variants()):
        v = result.variant
        print(f"{v.kernel:9} {v.dtype:8} D{v.D:<3} BQ{v.block_q:<3} {v.feature_map:7} linear={v.has_linear!s:5} "
              f"{v.choices or ''} -> {result.registers} regs, {result.spill_bytes} B spilled, "
              f"{result.shared_bytes // 1024} KiB shared, {result.wgmma} wgmma"
              + (f", {result.tma_copies} TMA copies" if v.tma else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
