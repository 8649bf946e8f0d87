"""Every kernel, and every tile shape the autotuner may choose, compiles for Hopper (sm_90) with its dots on
warp-group tensor cores: checked on any machine through Triton's ahead-of-time compiler (sla_dist.kernels.aot),
in a child process without the interpreter."""

import json
import os
import subprocess
import sys

import pytest
import triton

from sla_dist.kernels.aot import Variant, check_variants, nvidia_tool, run_in_clean_process
from sla_dist.kernels.configs import _KERNELS

NO_DOTS = ("block_sums", "classify", "critical_columns", "long_first_order", "dkdv_split_plan", "dkdv_combine")
FLOAT64_DOTS = ("block_scores",)  # float64 sums whatever the inputs' dtype: double-precision mma, not wgmma


@pytest.mark.skipif(not os.path.exists(nvidia_tool("ptxas")), reason="this Triton has no NVIDIA assembler")
def test_every_variant_compiles_for_hopper():
    variants = check_variants()
    results = run_in_clean_process(variants, arch=90)
    assert [r["variant"]["kernel"] for r in results] == [v.kernel for v in variants]
    for r in results:
        v = r["variant"]
        assert 0 < r["registers"] <= 255, r
        has_dots = v["kernel"] not in NO_DOTS + FLOAT64_DOTS and (
            not v["kernel"].startswith("prepass") or v["has_linear"])
        if v["dtype"] != "float32" and has_dots:  # half-precision dots -> Hopper wgmma
            assert r["wgmma"] > 0, r
        assert (r["tma_copies"] > 0) == v["tma"], r  # descriptor loads -> TMA copies, and only those
    choices = {(r["variant"]["kernel"], tuple(r["variant"]["choices"].items())) for r in results}
    assert {("dkdv", (("KEYS_AS_COLUMNS", 0),)), ("dkdv", (("Q_STEPS", 1),))} <= choices
    assert {(r["variant"]["kernel"], r["variant"]["fwd_loop"]) for r in results} >= {
        ("fwd", "fma"), ("fwd_split", "even+fma")}
    assert {r["variant"]["kernel"] for r in results if r["variant"]["tma"]} == {"fwd", "fwd_split", "dq", "dq_split",
                                                                                     "dkdv"}
    assert [r["variant"]["kernel"] for r in results if r["variant"]["packed"]] == ["classify"]


HOPPER_SM_SHARED_BYTES = 228 * 1024  # per SM, of which each resident block reserves 1 KiB


@pytest.mark.skipif(not os.path.exists(nvidia_tool("ptxas")), reason="this Triton has no NVIDIA assembler")
def test_split_forward_fits_two_programs_per_sm():
    """The split forward (SLA_DIST_FWD_LOOP=split: 64-row programs of 4 warps, bf16, D 128, its fixed launch
    setting) exists to run two programs per SM where the 8-warp forward runs one: registers (<= 255 per thread at
    128 threads) and shared memory for two must fit. Under Triton 3.6: 255 registers, no spills, 80 KiB."""
    (r,) = run_in_clean_process([Variant("fwd_split")], arch=90)
    assert r["registers"] <= 255 and 2 * (r["shared_bytes"] + 1024) <= HOPPER_SM_SHARED_BYTES, r


# The elu pre-pass still spills under Triton 3.6 (the GPU machine's): bytes measured per Triton minor version, a bound
# that a change must not exceed (the three variants of test_prepass_does_not_spill_at_head_dim_128 spill 0 under both).
ELU_PREPASS_SPILL_BYTES = {"3.6": 232, "3.9": 0}


@pytest.mark.skipif(not os.path.exists(nvidia_tool("ptxas")), reason="this Triton has no NVIDIA assembler")
def test_prepass_does_not_spill_at_head_dim_128():
    """The backward's pre-pass at the headline shape (bf16, D 128, BQ 128, its fixed launch setting), for the layer
    (dO_l made from dOut in the kernel), for sla_branches (dO_l read) and with the relu feature map: no register
    spills, under Triton 3.6 and 3.9 alike. It spilled 408 B per thread before it took dO_l in column halves and
    dropped the N = phi(Q_i) H_i product, and 88 B with relu while phi's backward kept Q's tile live; under Triton
    3.6 8 / 0 / 328 B while phi(Q_i) was the first operand of the dH_i product (a second register copy of it), Z_i
    stayed live across the loop and relu's mask was an i1 tile moved between register layouts. elu is held to its
    measured bytes per Triton version (ELU_PREPASS_SPILL_BYTES) where one was measured."""
    variants = [Variant("prepass", has_proj=True), Variant("prepass", has_proj=False),
                Variant("prepass", feature_map="relu"), Variant("prepass", feature_map="elu")]
    results = run_in_clean_process(variants, arch=90)
    spills = [r["spill_bytes"] for r in results]
    assert spills[:3] == [0, 0, 0], results
    elu_bound = ELU_PREPASS_SPILL_BYTES.get(".".join(triton.__version__.split(".")[:2]))
    if elu_bound is not None:
        assert spills[3] <= elu_bound, (triton.__version__, results[3])


@pytest.mark.skipif(not os.path.exists(nvidia_tool("ptxas")), reason="this Triton has no NVIDIA assembler")
def test_prepass_fits_two_programs_per_sm_at_head_dim_64():
    """At D 64 the pre-pass (8 warps) fits in 128 registers per thread, so two programs share an SM, for
    sla_branches at BQ 128 and for both paths at BQ 64 (Triton 3.6 / 3.9: 126 / 128, 124 / 122, 93 / 95). Making dH_i
    as dH_i^T = dN^T phi(Q_i) at D 64 too took 169-178 and 130 registers."""
    variants = [Variant("prepass", D=64, block_q=128, has_proj=False), Variant("prepass", D=64, block_q=64),
                Variant("prepass", D=64, block_q=64, has_proj=False)]
    results = run_in_clean_process(variants, arch=90)
    assert all(r["registers"] <= 128 and r["spill_bytes"] == 0 for r in results), results


# The looping pre-pass (SLA_DIST_PREPASS=loop) at D 128 holds 255 registers and spills: bytes per thread measured per
# Triton minor version (bf16, softmax, the layer's path, its fixed 8 warps x 2 stages), a bound a change must not exceed.
PREPASS_LOOP_SPILL_BYTES = {"3.6": 72, "3.9": 64}


@pytest.mark.skipif(not os.path.exists(nvidia_tool("ptxas")), reason="this Triton has no NVIDIA assembler")
def test_prepass_loop_fits_one_program_per_sm_and_copies_ahead():
    """The pre-pass as a loop over query blocks (the prepass_loop entry, its fixed launch setting) exists so that the
    pipeliner copies the next block's tiles while this block's products run: its PTX has per-thread asynchronous
    copies where the per-block launch has none, with the same tensor-core products, and its buffers leave room for
    one program per SM at D 128 for bf16 and float16 inputs (float16: float32 H_i, 225 KiB under Triton 3.6 and
    3.9; 3 stages take 304 KiB). W is loaded once per program, before the loop: inside it the pipeliner gave each
    column half two buffers (240 KiB)."""
    variants = [Variant("prepass"), Variant("prepass_loop"), Variant("prepass_loop", has_proj=False),
                Variant("prepass_loop", dtype="float16"), Variant("prepass_loop", D=64)]
    block, *loops = run_in_clean_process(variants, arch=90)
    assert block["async_copies"] == 0, block
    for r in loops:
        assert r["async_copies"] > 0 and r["registers"] <= 255, r
        assert r["shared_bytes"] + 1024 <= HOPPER_SM_SHARED_BYTES, r
    assert loops[0]["wgmma"] == block["wgmma"], (block, loops[0])
    bound = PREPASS_LOOP_SPILL_BYTES.get(".".join(triton.__version__.split(".")[:2]))
    if bound is not None:
        assert loops[0]["spill_bytes"] <= bound, (triton.__version__, loops[0])
    assert loops[3]["spill_bytes"] == 0, loops[3]  # D 64


@pytest.mark.skipif(not os.path.exists(nvidia_tool("ptxas")), reason="this Triton has no NVIDIA assembler")
def test_ordered_dkdv_compiles_like_the_natural_order():
    """dK/dV taking its key block from the launcher's order (SLA_DIST_DKDV_ORDER=lpt: one load and a divmod before
    the loop) spills no more, takes the same shared memory and wgmma, and fits as many programs per SM by registers
    as the natural order, at D 128 and 64, in both orientations of its accumulators (bf16, fixed launch setting).
    Registers move by a few (Triton 3.9: 226 -> 230 at D 128, 167 -> 165 at D 64; 3.6: 250 -> 252, 194 -> 192)."""
    shapes = [dict(), dict(D=64), dict(choices={"KEYS_AS_COLUMNS": 0})]
    variants = [Variant("dkdv", dkdv_order=order, **shape) for shape in shapes for order in ("natural", "lpt")]
    results = run_in_clean_process(variants, arch=90)
    warps = _KERNELS["dkdv"].fixed[0]
    for natural, ordered in zip(results[::2], results[1::2]):
        keys = ("shared_bytes", "wgmma")
        assert [natural[k] for k in keys] == [ordered[k] for k in keys], (natural, ordered)
        # The 4-warp programs at D 128 (two per SM, 64-row steps) take all 255 registers and spill under both
        # orders; the ordered loop's load and divmod may add a few (Triton 3.6: 464 -> 512 B, 3.9: 448 -> 416 B;
        # measured faster than the 8-warp program that spilled none, PERF_NOTES 2026-12-02): at most 64 B more.
        assert ordered["spill_bytes"] <= natural["spill_bytes"] + 64, (natural, ordered)
        assert ordered["registers"] <= natural["registers"] + 8, (natural, ordered)
        assert (_programs_per_sm(natural["registers"], warps) == _programs_per_sm(ordered["registers"], warps)
                ), (natural, ordered)


@pytest.mark.skipif(not os.path.exists(nvidia_tool("ptxas")), reason="this Triton has no NVIDIA assembler")
def test_split_dkdv_compiles_like_the_whole_list_kernel():
    """dK/dV taking its work from the split plan (SLA_DIST_DKDV_SPLIT=long: four loads, an early return for an
    unused program, the linear term only in a list's first part, a float32 store for a part of a split list) spills
    no more, takes the same shared memory and wgmma, and fits as many programs per SM as the whole-list kernel, at
    D 128 and 64 (bf16, keys as columns, the fixed launch setting; Triton 3.9: 229 -> 228 and 170 -> 182
    registers). The plan and combine kernels spill nothing. (Keys as rows, an autotune candidate that loses, spills
    472 B with the split against 96 B: not held here.)"""
    shapes = [dict(), dict(D=64), dict(dtype="float16")]
    variants = [Variant("dkdv", dkdv_split=split, **shape) for shape in shapes for split in (False, True)]
    # The plan kernel's BLOCK (Variant.block_k): one head's 512 key blocks at L 32768.
    variants += [Variant("dkdv_split_plan", block_k=512), Variant("dkdv_combine"), Variant("dkdv_combine", D=64)]
    results = run_in_clean_process(variants, arch=90)
    warps = _KERNELS["dkdv"].fixed[0]
    for whole, split in zip(results[:6:2], results[1:6:2]):
        keys = ("shared_bytes", "wgmma")
        assert [whole[k] for k in keys] == [split[k] for k in keys], (whole, split)
        assert split["spill_bytes"] <= whole["spill_bytes"], (whole, split)
        per_sm = [_programs_per_sm(r["registers"], warps) for r in (whole, split)]
        assert per_sm[0] == per_sm[1], (whole, split)
    assert all(r["spill_bytes"] == 0 for r in results[6:]), results[6:]


def _programs_per_sm(registers: int, warps: int) -> int:
    """Programs an SM's 64K registers hold (allocated per thread in steps of 8)."""
    return 65536 // (-(-registers // 8) * 8 * 32 * warps)


@pytest.mark.parametrize("bad, match", [
    (dict(kernel="fwdd"), "kernel='fwdd'"),
    (dict(kernel="fwd", dtype="float64"), "dtype='float64'"),
    (dict(kernel="fwd", feature_map="tanh"), "feature_map='tanh'"),
    (dict(kernel="fwd", proj_dtype="int8"), "proj_dtype='int8'"),
    (dict(kernel="fwd", choices={"Q_SPLIT": 2}), "Q_SPLIT"),
    (dict(kernel="fwd", fwd_loop="fast"), "SLA_DIST_FWD_LOOP='fast'"),
    (dict(kernel="fwd", fwd_loop="fma+split"), "fwd_split"),
    (dict(kernel="dq", fwd_loop="fma"), "fwd_loop='fma' applies to the forward"),
    (dict(kernel="fwd_split", block_q=64), "block_q=64"),
    (dict(kernel="dkdv", dkdv_order="longest"), "SLA_DIST_DKDV_ORDER='longest'"),
    (dict(kernel="dq", dkdv_order="lpt"), "dkdv_order='lpt' applies to dkdv"),
])
def test_variant_names_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        Variant(**bad)


@pytest.mark.skipif(not os.path.exists(nvidia_tool("ptxas")), reason="this Triton has no NVIDIA assembler")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_model_kernels_compile_for_hopper_without_spills(dtype):
    """The DiT's own kernels (norm_rope forward / backward, gelu_mlp's backward) as their launchers call them, compiled
    for sm_90 in a process without the interpreter, which runs kernels a real compile rejects (gelu_kernels' first
    version read plain float globals: the GPU refused it, the interpreter did not): every one compiles, no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "sla_dist.kernels.aot", "--model-kernels", dtype], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    assert [r["name"] for r in results] == ["norm_rope_fwd", "norm_rope_bwd", "gelu_tanh_bwd"]
    assert all(r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 for r in results), results
