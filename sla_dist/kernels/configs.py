"""Launch settings per kernel: autotuned on a GPU, one fixed setting in the interpreter.

``get_kernel(name)`` returns something launched as ``kernel[grid](*args, **constexprs)``. On a GPU it is the Triton
kernel wrapped in ``triton.autotune`` over warps x pipeline stages, keyed on the constexprs that change the code (not
on sequence length, so a training run tunes once per layer shape, on its first real batch, never on zeros). Under
TRITON_INTERPRET=1 autotuning does not run and warps/stages mean nothing, so the kernel gets one fixed setting.
SLA_DIST_AUTOTUNE=0 turns tuning off on a GPU too (the ``fixed`` setting), e.g. for test suites that compile
hundreds of shape variants. Tuning results are cached on disk (Triton's cache directory) where Triton supports it
(3.4 and newer), so later runs and the other ranks of a node skip the search. ``fwd_loop()`` picks the forward's
loop variant: the one measured fastest for the head dim and branch, or what SLA_DIST_FWD_LOOP names;
``dkdv_order()`` the order in which dK/dV's programs take the key blocks (SLA_DIST_DKDV_ORDER); ``prepass_launch()``
how the backward's pre-pass is launched (SLA_DIST_PREPASS); ``dkdv_chunked()`` whether dK/dV may run over chunks of
heads to lower the backward's peak memory (SLA_DIST_DKDV_CHUNKS); ``dkdv_split()`` whether dK/dV splits long
query-block lists over several programs (SLA_DIST_DKDV_SPLIT); ``classify_packed()`` whether the block map's
classify kernel runs its two radix selects in one loop (SLA_DIST_CLASSIFY); ``tma_kernels()``
the kernels whose loop tiles are loaded through tensor descriptors (SLA_DIST_TMA; by default the forward and dQ on
Hopper and newer). ``fixed_settings()`` replaces kernels' fixed settings for a block of code, so one process can time
several (benchmarks/time_layer.py --setting).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import triton

from ..config import DKDV_SPLIT_CHOICES



@dataclass(frozen=True)
class _Tuning:
    module: str
    function: str
    key: tuple[str, ...]
    warps: tuple[int, ...]
    stages: tuple[int, ...]
    fixed: tuple[int, int]
    """(warps, stages) when not autotuning."""
    choices: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Tile-shape constexprs to tune, (name, options); the first option of each when not autotuning."""
    restore: tuple[str, ...] = ()
    """Arguments the kernel reads and writes (accumulates into): restored after every timed candidate run, or the
    first call of each shape would return a gradient summed over all the runs of the search."""
    constants: tuple[tuple[str, int], ...] = ()
    """Constexprs fixed for this entry, (name, value): one kernel function launched as two entries, each tuned on
    its own."""

    def metas(self) -> list[dict]:
        names = [name for name, _ in self.choices]
        return [dict(zip(names, combo)) for combo in itertools.product(*(opts for _, opts in self.choices))]

    def candidates(self) -> list[tuple[dict, int, int]]:
        """Every autotune candidate as (tile-shape constexprs, warps, stages)."""
        return [(m, w, st) for m in self.metas() for w in self.warps for st in self.stages]


_CODE_KEY = ("D", "BLOCK_Q", "BLOCK_K", "FEATURE_MAP", "HAS_LINEAR")
FWD_SPLIT_Q = 2
"""Programs per query block in the ``fwd_split`` entry (SLA_DIST_FWD_LOOP=split)."""
DQ_SPLIT_Q = 2
"""Programs per query block in the ``dq_split`` entry (SLA_DIST_DQ_SPLIT=halves)."""
SPLIT_MIN_ROWS = 64
"""Fewest rows per split program: one warp group's wgmma tile."""
_FWD_KEY = _CODE_KEY + ("HAS_PROJ", "HAS_BIAS", "EVEN_K", "SCALE_IN_EXP", "USE_TMA")
_PREPASS_KEY = ("D", "BLOCK_Q", "FEATURE_MAP", "HAS_LINEAR", "HAS_PROJ", "HAS_DOL")
# The candidates are what won or came close in `benchmarks/sweep_kernels.py` on an H200 (bf16, D = 128, BQ 128,
# results/2026-11-29-h200-sweep.md); the fixed setting is each kernel's winner there. Two key blocks per step in the
# forward and dQ lost everywhere (by 10-25 %), so those loops take one block per step; every candidate compiles on a
# layer shape's first call, so the list is kept short (the full search of 60 took 164 s).
_KERNELS = {
    "fwd": _Tuning("forward", "_sla_fwd_kernel", _FWD_KEY, (4, 8), (2, 3, 4), fixed=(8, 3),
                   constants=(("SPLIT_Q", 1),)),
    # The forward with each query block taken by two 64-row programs of one warp group (FwdLoop.split): 2 programs
    # per SM (255 registers, <= 112 KiB of shared memory each under Triton 3.6) where one 8-warp program fits. Fixed
    # at 3 stages: its loop waits for K / V copies (ncu: 24 % of stall samples at the TMA barrier with 2 stages);
    # on an H200 at D 128, 95 %, the kernel took 1021 -> 858 us at L 32768 and 4780 -> 3887 us at 75600.
    "fwd_split": _Tuning("forward", "_sla_fwd_kernel", _FWD_KEY, (4,), (2, 3), fixed=(4, 3),
                         constants=(("SPLIT_Q", FWD_SPLIT_Q),)),
    "summaries": _Tuning("forward", "_linear_summaries_kernel", ("D", "BLOCK_K", "FEATURE_MAP"), (4,), (1,),
                         fixed=(4, 1)),
    # One block a program on one warp: the row sums stay in one warp's registers (no cross-warp reduction through
    # shared memory); on an H200 q + k took 94.6 -> 70.1 us at L 32768 against 4 warps (2026-12-02-h200-block-sums).
    "block_sums": _Tuning("block_select", "_block_sums_kernel", ("D", "BLOCK"), (1, 2, 4), (1,), fixed=(1, 1)),
    "block_scores": _Tuning("block_select", "_block_scores_kernel", ("D_POW2",), (8,), (1,), fixed=(8, 1)),
    "classify": _Tuning("block_select", "_classify_kernel", ("NK_POW2", "PACKED"), (4,), (1,), fixed=(4, 1)),
    "critical_columns": _Tuning("block_select", "_critical_columns_kernel", ("NQ_POW2",), (4,), (1,), fixed=(4, 1)),
    "prepass": _Tuning("backward", "_bwd_prepass_kernel", _PREPASS_KEY, (8,), (1,), fixed=(8, 1),
                       constants=(("PERSISTENT", 0),)),
    # The pre-pass as a loop over query blocks (SLA_DIST_PREPASS=loop): one program per SM, its software pipeline
    # copying the next block's dOut, q, Z_i and H_i while this block's products run; 2 stages take 208 KiB of shared
    # memory at D 128 (bf16; float16 225 KiB), so 3 do not fit there. The default on Hopper (prepass_launch).
    "prepass_loop": _Tuning("backward", "_bwd_prepass_kernel", _PREPASS_KEY, (8,), (2,), fixed=(8, 2),
                            constants=(("PERSISTENT", 1),)),
    # dQ adds to the linear branch's dQ that the pre-pass wrote.
    "dq": _Tuning("backward", "_bwd_dq_kernel", ("D", "BLOCK_Q", "BLOCK_K", "HAS_LINEAR", "USE_TMA"), (4, 8), (1, 2, 3),
                  fixed=(8, 3), restore=("DQ",)),
    # dQ with each query block taken by DQ_SPLIT_Q programs of 4 warps (SLA_DIST_DQ_SPLIT=halves; not measured on a
    # GPU yet, so opt-in): at D 128, 2 stages, ~96 KiB of shared memory each, two per SM, as the stepped dK/dV.
    "dq_split": _Tuning("backward", "_bwd_dq_kernel", ("D", "BLOCK_Q", "BLOCK_K", "HAS_LINEAR", "USE_TMA"), (4,),
                        (2, 3), fixed=(4, 2), restore=("DQ",), constants=(("SPLIT_Q", DQ_SPLIT_Q),)),
    # dK/dV takes each 128-row query block in two 64-row loop steps (Q_STEPS 2): a pipeline stage then holds 32 KiB
    # of q and dO, and two 4-warp programs fit per SM (99 KiB of shared memory each), each with its copy in flight
    # (one 8-warp program held one 64 KiB copy). H200, bf16, 95 %, with tensor descriptors
    # (results/2026-12-02-h200-dkdv-steps.md): L 32768 D 128 1846 -> 1720 us, 75600 9513 -> 8911, D 64 1312 -> ~1000.
    # Q_SPLIT (row slices within one step) is a kernel option left out of the tuning: it lost in every sweep.
    "dkdv": _Tuning("backward", "_bwd_dkdv_kernel", _CODE_KEY + ("ORDERED", "SPLIT", "USE_TMA"), (4, 8), (1, 2),
                    fixed=(4, 2), choices=(("Q_STEPS", (2, 1)), ("KEYS_AS_COLUMNS", (1, 0)))),
    # dK/dV's default program order (dkdv_plan.dkdv_program_order: one program per ORDER_ROWS lists).
    "long_first_order": _Tuning("dkdv_split_kernels", "_long_first_order_kernel", ("BLOCK",), (4,), (1,),
                                fixed=(4, 1)),
    # The split dK/dV launch (SLA_DIST_DKDV_SPLIT): its plan (one program per 128 lists of a head, integer prefix
    # counts), and the sum of the split lists' float32 parts (loads and adds, no products).
    "dkdv_split_plan": _Tuning("dkdv_split_kernels", "_dkdv_split_plan_kernel", ("MODE", "BLOCK"), (8,), (1,),
                               fixed=(8, 1)),
    "dkdv_combine": _Tuning("dkdv_split_kernels", "_dkdv_combine_kernel", ("D", "BLOCK_K"), (4,), (1,),
                            fixed=(4, 1)),
}


FWD_LOOP_ENV = "SLA_DIST_FWD_LOOP"
DKDV_ORDER_ENV = "SLA_DIST_DKDV_ORDER"
TMA_ENV = "SLA_DIST_TMA"
PREPASS_ENV = "SLA_DIST_PREPASS"
DKDV_CHUNKS_ENV = "SLA_DIST_DKDV_CHUNKS"
CLASSIFY_ENV = "SLA_DIST_CLASSIFY"
DKDV_SPLIT_ENV = "SLA_DIST_DKDV_SPLIT"
DQ_SPLIT_ENV = "SLA_DIST_DQ_SPLIT"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on the CPU interpreter (no autotuning, no GPU features)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class Switches(NamedTuple):
    """The environment switches the launches read (None where unset), read once per op call by
    :func:`read_switches`: reading ``os.environ`` costs host time (a key encoded, a value decoded) and each launch
    read several, so they are read at the op's start and handed to every launch decision. Nothing is cached across
    calls, so a process may change them between calls (benchmarks time several values in one run)."""

    fwd_loop: str | None
    dkdv_order: str | None
    tma: str | None
    interpreting: bool
    """TRITON_INTERPRET=1: the kernels run in Triton's interpreter."""
    prepass: str | None = None
    """SLA_DIST_PREPASS (configs.PREPASS_LAUNCHES)."""
    dkdv_chunks: str | None = None
    """SLA_DIST_DKDV_CHUNKS (configs.DKDV_CHUNKINGS)."""
    classify: str | None = None
    """SLA_DIST_CLASSIFY (configs.CLASSIFY_SELECTS)."""
    dkdv_split: str | None = None
    """SLA_DIST_DKDV_SPLIT (configs.DKDV_SPLITS)."""
    dq_split: str | None = None
    """SLA_DIST_DQ_SPLIT (configs.DQ_SPLITS)."""


def read_switches() -> Switches:
    """The switches as set now; one op call reads them once and decides all its launches with them."""
    env = os.environ
    # interpreting()'s test written out: this runs on every op call, whose Python calls test_host_budget counts.
    return Switches(env.get(FWD_LOOP_ENV), env.get(DKDV_ORDER_ENV), env.get(TMA_ENV),
                    env.get("TRITON_INTERPRET") == "1", env.get(PREPASS_ENV), env.get(DKDV_CHUNKS_ENV),
                    env.get(CLASSIFY_ENV), env.get(DKDV_SPLIT_ENV), env.get(DQ_SPLIT_ENV))


@dataclass(frozen=True)
class FwdLoop:
    """Variant of the forward kernel's loop over key blocks, as options joined by '+' (e.g. ``split+even+fma``;
    ``baseline`` is none of them), the form SLA_DIST_FWD_LOOP takes."""

    even: bool = False
    """No key masks when the key length is a multiple of the key block (EVEN_K); other lengths keep them."""
    fma: bool = False
    """The score scale folded into the exponent: 2^(c qk - m) as one FMA (SCALE_IN_EXP)."""
    split: bool = False
    """Each query block taken by FWD_SPLIT_Q programs of 4 warps (the ``fwd_split`` launch entry), where query
    blocks have at least FWD_SPLIT_Q x 64 rows."""

    @classmethod
    def parse(cls, text: str) -> FwdLoop:
        names = [f.name for f in fields(cls)]
        options = [] if text == "baseline" else text.split("+")
        unknown = [o for o in options if o not in names]
        if unknown or len(set(options)) != len(options):
            raise ValueError(f"{FWD_LOOP_ENV}={text!r}; give 'baseline' or options from {names} joined by '+', each "
                             f"once (e.g. 'split+even+fma')")
        return cls(**{name: True for name in options})

    def launch(self, block_q: int) -> tuple[str, int]:
        """(name of the launch entry in the tuning table, programs per query block). The split needs query blocks
        of FWD_SPLIT_Q x 64 rows (a warp group's wgmma takes 64); smaller ones run the whole-block forward."""
        if self.split and block_q >= FWD_SPLIT_Q * SPLIT_MIN_ROWS:
            return "fwd_split", FWD_SPLIT_Q
        return "fwd", 1

    def constexprs(self, even_keys: bool) -> dict[str, bool]:
        """The kernel's loop constexprs; ``even_keys``: the key length is a multiple of the key block."""
        return dict(EVEN_K=self.even and even_keys, SCALE_IN_EXP=self.fma)


# The forward kernel's CUDA time per loop variant on an H200 (Triton 3.6, bf16, H 12, BQ 128 / BK 64, 95 % sparse,
# fixed launch settings; benchmarks/time_fwd_kernel.py, results/2026-11-30-h200x2-fwd-loop.md), at L 32768:
# fma is level or faster everywhere (-0.5 to -2.5 %); the split wins only where the whole-block program is starved
# (D 128 with the linear epilogue: 1122 -> 1048 us; D 64 without it: 483 -> 434 us) and loses elsewhere (D 128
# without the epilogue +9 %, D 64 with it +0.5 % against plain fma). Unmeasured head dims take fma alone.
_MEASURED_FWD_LOOPS = {
    (128, True): "split+even+fma",
    (128, False): "fma",
    (64, True): "fma",
    (64, False): "split+even+fma",
}


def fwd_loop(head_dim: int, has_linear: bool, block_q: int, switches: Switches | None = None) -> FwdLoop:
    """The forward's loop variant: SLA_DIST_FWD_LOOP when set (read at every launch, so one process can time
    several; ``switches``: as read for this launch), else the measured fastest for this head dim and branch. The
    split's measured wins are at 128-row query blocks; where a block is too small to split, fma alone (even without
    the split was slower)."""
    return _fwd_loop((switches or read_switches()).fwd_loop, head_dim, has_linear, block_q)


@functools.lru_cache(maxsize=64)
def _fwd_loop(text: str | None, head_dim: int, has_linear: bool, block_q: int) -> FwdLoop:
    """:func:`fwd_loop` for the switch's value ``text`` (None: unset); cached, parsing costs host time every call.
    A bad value raises each time (lru_cache keeps no exceptions)."""
    if text is not None:
        return FwdLoop.parse(text)
    loop = FwdLoop.parse(_MEASURED_FWD_LOOPS.get((head_dim, has_linear), "fma"))
    if loop.split and loop.launch(block_q)[1] == 1:  # the block is too small to split
        return FwdLoop(fma=True)
    return loop


DKDV_ORDERS = ("natural", "lpt", "lpt-head", "long-first")
"""Orders of dK/dV's programs over the key blocks. natural: program (j, bh) takes key block j of head bh, as the
grid lists them. The others sort the programs by the length of their query-block list, longest first (LPT, longest
processing time first), so that few long programs are left running alone at the end: lpt over all heads' key blocks
at once (the GPU issues a grid's programs in linear order, key block fastest, so only a sort over the whole grid
starts every head's longest programs in the first waves); lpt-head within each head (the heads keep their turn: the
programs running at once share one head's queries in L2, but the last head's long programs start in the last
1 / BH of the launch); long-first only the programs longer than LONG_FIRST_FACTOR x the mean, the others after them
in the natural order (the bulk keeps lpt-head's L2 locality, the long ones start first as in lpt)."""
LONG_FIRST_FACTOR = 2.0
DEFAULT_DKDV_ORDER = "long-first"
"""Measured on an H200 (bf16, L 32768, H 12, D 128, 95 %; results/2026-11-30-h200x2-dkdv-order.md): on a skewed map
like a DiT's (one key block critical for ~20x the mean number of query blocks) dK/dV takes 2335 us natural, 1983 lpt,
2015 long-first; on i.i.d. inputs 1873 natural, 2003 lpt (the whole-grid sort loses L2 locality), 1889 long-first."""


def dkdv_order(switches: Switches | None = None, split: bool | None = None) -> str:
    """dK/dV's program order: SLA_DIST_DKDV_ORDER when set (read at every launch, so one process can time several;
    ``switches``: as read for this launch), else DEFAULT_SPLIT_DKDV_ORDER where the split is on, DEFAULT_DKDV_ORDER
    where it is off. ``split``: :func:`dkdv_split` as the launch already decided it (None: decided here)."""
    switches = switches or read_switches()
    if switches.dkdv_order is not None:
        return check_choice(DKDV_ORDER_ENV, switches.dkdv_order, DKDV_ORDERS)
    if split is None:
        split = dkdv_split(switches)
    return DEFAULT_SPLIT_DKDV_ORDER if split else DEFAULT_DKDV_ORDER


def check_choice(env: str, value: str, choices: tuple[str, ...]) -> str:
    """A switch's value (``env``'s, or a setting standing for it), if it is one of its ``choices``; else a
    ValueError naming the variable and the value."""
    if value not in choices:
        raise ValueError(f"{env}={value!r}; choose one of {choices}")
    return value


PREPASS_LAUNCHES = ("block", "loop")
"""How the backward's pre-pass is launched (SLA_DIST_PREPASS): block, one 8-warp program per query block; loop, the
``prepass_loop`` entry, PREPASS_LOOP_PROGRAMS_PER_SM programs per SM, each taking every programs-th query block (the
tuning table says why). Each block's values come from the same operations either way (the interpreter's are
bit-identical: tests/kernels/test_prepass_launch.py)."""
PREPASS_LOOP_PROGRAMS_PER_SM = 1
"""An 8-warp pre-pass program at D 128 takes 238-255 registers per thread and up to 225 KiB of shared memory: one
fits per SM."""


def prepass_launch(device: torch.device | None = None, switches: Switches | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> str:
    """The pre-pass launch (PREPASS_LAUNCHES): SLA_DIST_PREPASS when set (``switches``: as read for this launch);
    unset, loop for 16-bit inputs (``dtype``) on a ``device`` of compute capability 9.0 or newer, else block.
    Measured on an H200 (2026-12-01, results/2026-12-01-h200-prepass-release.md), bf16 H 12 D 128: pre-pass 466 ->
    366 us at L 32768, 1065 -> 847 us at 75600. Older GPUs and float32 inputs keep the block launch: the loop's two
    stages take up to 225 KiB of shared memory with 16-bit tiles, more than an A100 has, and float32 tiles double
    that."""
    switches = switches or read_switches()
    launch = switches.prepass
    if launch is None:
        fits = dtype != torch.float32 and device is not None and _hopper(device, switches.interpreting)
        return "loop" if fits else "block"
    return check_choice(PREPASS_ENV, launch, PREPASS_LAUNCHES)


DKDV_CHUNKINGS = ("off", "auto")
"""SLA_DIST_DKDV_CHUNKS: off (the default), dK/dV in one launch over all heads; auto, over chunks of heads where
that lowers the backward's peak memory (dkdv_head_chunks: bfloat16 at D 128, 3 launches). Measured on an H200
(2026-12-01, results/2026-12-01-h200-dkdv-chunks.md), bf16 H 12 D 128 L 32768: peak extra memory 589 -> 560 MiB
(dense cuDNN 579.5), dK/dV 1827 -> 1930 us (each launch ends in a partly filled wave), so it is opt-in. Read at
every backward in eager mode; a compiled graph reads it when its backward is traced (which tensors the dK/dV op
takes depends on it, backward_ops.compiled_backward), so set it before compiling. Moot where dK/dV writes dk and dv
over the key rows it reads (summary_rows.gradients_over_key_rows: bfloat16 / float32 with D a multiple of
BLOCK_K), which holds less than any chunking: it applies to float16's float32 summaries and other head dims."""


def dkdv_chunked(switches: Switches | None = None) -> bool:
    """SLA_DIST_DKDV_CHUNKS is 'auto' (``switches``: as read for this launch)."""
    chunks = (switches or read_switches()).dkdv_chunks
    return chunks is not None and check_choice(DKDV_CHUNKS_ENV, chunks, DKDV_CHUNKINGS) == "auto"


CLASSIFY_SELECTS = ("separate", "packed")
"""How the block map's classify kernel (block_select.py) finds each row's two class boundaries (SLA_DIST_CLASSIFY):
packed (the default), both selects in one loop on 32-bit keys, the two counts of a round summed in one reduction
(the PACKED constexpr); separate, one 32-round radix select per boundary on 64-bit keys. Same classes and lists bit
for bit; packed has half the rounds, each a chain of a warp reduction and three barriers. Measured on an H200
(bf16, H 12, D 128, BQ 128, BK 64, i.i.d. inputs; results/2026-12-01-h200-classify-dkdv-split.md): classify 57 ->
31 us at L 32768 (forward 1.312 -> 1.291 ms), 486 -> 290 us at 75600 (5.564 -> 5.363 ms), 10 -> 7 us at 8192."""
DEFAULT_CLASSIFY = "packed"
CLASSIFY_PACKED_MAX_BLOCKS = 2**15 - 1
"""The widest row the packed select takes: its counts (up to Nk each) share one int32, the second shifted by 16
bits. Wider rows (2M tokens in 64-key blocks) take the separate selects."""


def classify_packed(nk: int, switches: Switches | None = None) -> bool:
    """Whether the classify launch for rows of ``nk`` key blocks runs the packed select: SLA_DIST_CLASSIFY, or
    DEFAULT_CLASSIFY where unset, is 'packed' (read at every launch, so one process can time both; ``switches``: as
    read for this launch) and the row fits it (CLASSIFY_PACKED_MAX_BLOCKS)."""
    select = os.environ.get(CLASSIFY_ENV) if switches is None else switches.classify
    if select is not None:
        check_choice(CLASSIFY_ENV, select, CLASSIFY_SELECTS)
    return (select or DEFAULT_CLASSIFY) == "packed" and nk <= CLASSIFY_PACKED_MAX_BLOCKS


DKDV_SPLITS = tuple(choice for choice in DKDV_SPLIT_CHOICES if choice != "env")
"""SLA_DIST_DKDV_SPLIT: off (the default), one dK/dV program per (key block, head), walking its whole list; long,
lists longer than a part length T are split over several programs (dkdv_plan.dkdv_split_plan), each writing its
float32 partial dK, dV to a scratch buffer that the dkdv_combine kernel then sums into dk, dv. The launch grows by
a fixed number of programs (DKDV_SPLIT_SLOT_FRACTION of the grid), so its shape does not depend on the block map
(no host synchronisation: CUDA graphs and torch.compile keep working). The parts then take the order
SLA_DIST_DKDV_ORDER names, as whole lists do without the split: natural, lpt-head or long-first (lpt has no split
form: dkdv_plan.SPLIT_ORDERS)."""
DKDV_SPLIT_SLOT_FRACTION = 6
"""The split launch's extra programs, and its scratch slots (2 x BLOCK_K x D float32 each), are 1 / this of the
grid's BH x Nk programs (at least DKDV_SPLIT_MIN_SLOTS): 1024 slots, 64 MiB at L 32768, H 12, D 128, BK 64, on
top of the backward's peak (589 MiB there; the scratch is live beside dq, dk, dv and dh_j). In the wave model of
PERF_NOTES (2026-12-01, wip-skew) a random-init DiT's map at that shape takes 457 extra programs in lpt-head order;
1 / 8 of the grid would make the parts longer (T 57 -> 72 query blocks) and leave more tail (1.013 -> 1.028)."""
DKDV_SPLIT_MIN_SLOTS = 64
DEFAULT_SPLIT_DKDV_ORDER = "lpt-head"
"""The split parts' order where SLA_DIST_DKDV_ORDER is unset. Measured on an H200 (bf16, L 32760, H 12, D 128, a
random-init DiT's block map; results/2026-12-01-h200-classify-dkdv-split.md), dK/dV + plan + combine: split lpt-head
1939 us, split long-first 2012, split natural 2068; whole lists long-first (the default without the split) 2084."""
DKDV_SPLIT_PARTS_PER_SM = 8
"""The split's part length T starts at the launch's balanced work per SM ((listed pairs + DKDV_PROGRAM_COST x
programs) / SMs) over this many, or over the heads where more and the order takes the heads in turn (natural,
lpt-head: each head's programs start within its 1 / heads of the launch, and a part started at the end of the last
head's turn outlasts the others by up to its length); then at least DKDV_SPLIT_MIN_PART, and grown by a quarter
until the split lists' parts fit the slots. Orders that sort over all heads (lpt, long-first) start the long parts
first, which then only have to be short enough to spread the long work over several programs per SM."""
DKDV_SPLIT_MIN_PART = 8
"""Fewest query blocks in a part: below that a part's fixed cost (K_j, V_j, the partial's store and its combine)
outweighs its loop."""
DKDV_PROGRAM_COST = 2
"""A dK/dV program's cost besides its loop, in listed query blocks (loading K_j, V_j and the linear epilogue; the
wave model of benchmarks/time_bwd_kernel.py, PERF_NOTES 2026-11-30)."""


def with_layer_split(switches: Switches, dkdv_split: str) -> Switches:
    """``switches`` with a layer's own dK/dV split choice (SLAConfig.dkdv_split) in SLA_DIST_DKDV_SPLIT's place;
    'env' keeps the switch as read."""
    return switches if dkdv_split == "env" else switches._replace(dkdv_split=dkdv_split)


def dkdv_split(switches: Switches | None = None) -> bool:
    """SLA_DIST_DKDV_SPLIT is 'long' (``switches``: as read for this launch)."""
    split = (switches or read_switches()).dkdv_split
    return split is not None and check_choice(DKDV_SPLIT_ENV, split, DKDV_SPLITS) == "long"


DQ_SPLITS = ("off", "halves")
"""SLA_DIST_DQ_SPLIT: off (the default), one dQ program per query block (the ``dq`` launch entry); halves, DQ_SPLIT_Q
programs per query block, each over its half of the rows and the block's whole key list (the ``dq_split`` entry),
where query blocks have at least DQ_SPLIT_Q x SPLIT_MIN_ROWS rows. Each row's dQ comes from the same operations
either way; the halves re-read the list's K / V tiles."""


def dq_launch(block_q: int, switches: Switches) -> tuple[str, int]:
    """(launch entry, programs per query block) of dQ: the split when SLA_DIST_DQ_SPLIT is 'halves' and the query
    block has rows for DQ_SPLIT_Q warp groups' tiles, else the whole-block launch. The op calls this only when the
    switch is set (the unset default costs no call)."""
    if check_choice(DQ_SPLIT_ENV, switches.dq_split, DQ_SPLITS) == "halves" and block_q >= DQ_SPLIT_Q * SPLIT_MIN_ROWS:
        return "dq_split", DQ_SPLIT_Q
    return "dq", 1


TMA_KERNELS = ("fwd", "dq", "dkdv")
"""Kernels whose loop tiles may be loaded through tensor descriptors (Hopper's TMA engine copies them to shared
memory; no [rows, D] offset tile in registers): the forward's k and v (both launch entries, fwd and fwd_split), dQ's
k and v (both entries, dq and dq_split), dK/dV's q and dO."""


DEFAULT_TMA_KERNELS = frozenset({"fwd", "dq", "dkdv"})
"""The kernels that take descriptors when SLA_DIST_TMA is unset, on GPUs of compute capability 9.0 or newer (the
bulk tensor copy engine; older GPUs and the interpreter keep the pointer loads). Measured on an H200 (2026-11-30,
results/2026-11-30-h200x2-tma-linsums.md), kernel time with descriptors against pointers: forward -3.5 % (L 32768)
to -13 % (75600, the DiT's fused layout), dQ -2 % to -7.5 %; dK/dV +1.6 / +2.3 % at 32768 and -1.2 / -1.6 % at
75600 then (one 8-warp program per SM, 128-row steps). With 64-row steps on two 4-warp programs per SM (Q_STEPS 2,
2026-12-02, results/2026-12-02-h200-dkdv-steps.md) descriptors took dK/dV 1794 -> 1720 us at L 32768 and 9295 ->
8911 at 75600 (D 128), so dK/dV takes them too."""


def tma_kernels(device: torch.device | None = None, switches: Switches | None = None) -> frozenset[str]:
    """The kernels of TMA_KERNELS that SLA_DIST_TMA names: 'off' none, 'all' every one, else kernels joined by '+'
    (e.g. 'fwd+dq'); unset, DEFAULT_TMA_KERNELS on a ``device`` of compute capability 9.0 or newer, else none. Read
    at every launch, so one process can time several (``switches``: as read for this launch). A launch whose
    tensors a descriptor cannot address still takes the pointer loads (op.py decides per launch)."""
    switches = switches or read_switches()
    if switches.tma is None:
        return DEFAULT_TMA_KERNELS if device is not None and _hopper(device, switches.interpreting) else frozenset()
    return _parse_tma(switches.tma)


@functools.lru_cache(maxsize=16)
def _parse_tma(text: str) -> frozenset[str]:
    """The kernels a set SLA_DIST_TMA names; cached (a bad value raises each time)."""
    if text == "off":
        return frozenset()
    if text == "all":
        return frozenset(TMA_KERNELS)
    names = text.split("+")
    if any(n not in TMA_KERNELS for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{TMA_ENV}={text!r}; give 'off', 'all' or kernels from {TMA_KERNELS} joined by '+', each "
                         f"once (e.g. 'fwd+dq')")
    return frozenset(names)


def _hopper(device: torch.device, interpreting: bool) -> bool:
    """A CUDA device of compute capability 9.0 or newer, outside the interpreter: the bulk tensor copy engine
    (descriptors) and the shared memory the looping pre-pass takes."""
    if device.type != "cuda" or interpreting:
        return False
    return _capability(_cuda_index(device))[0] >= 9


def _cuda_index(device: torch.device) -> int:
    """The index of a CUDA ``device`` ('cuda' alone: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


INTERPRETER_SMS = 3
"""SMs assumed in the interpreter (which has none): few, so that each looping program takes several blocks."""


def multiprocessors(device: torch.device, interpreting: bool) -> int:
    """The streaming multiprocessors of a CUDA ``device``; INTERPRETER_SMS in the interpreter or on the CPU."""
    if device.type != "cuda" or interpreting:
        return INTERPRETER_SMS
    return _multiprocessors(_cuda_index(device))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Fixed:
    """A kernel launched with one setting."""

    def __init__(self, fn, num_warps: int, num_stages: int, meta: dict) -> None:
        self.fn, self.num_warps, self.num_stages, self.meta = fn, num_warps, num_stages, meta

    def __getitem__(self, grid):
        return functools.partial(self.fn[grid], num_warps=self.num_warps, num_stages=self.num_stages, **self.meta)


def jit_function(name: str):
    """The bare ``triton.jit`` function of kernel ``name``, launched as ``fn[grid](..., num_warps=, num_stages=)``."""
    t = _KERNELS[name]
    return getattr(__import__(f"{__package__}.{t.module}", fromlist=[t.function]), t.function)


@functools.cache
def get_kernel(name: str):
    t = _KERNELS[name]
    fn = jit_function(name)
    if interpreting() or os.environ.get("SLA_DIST_AUTOTUNE") == "0":
        return _Fixed(fn, *t.fixed, meta=t.metas()[0] | dict(t.constants))
    configs = [triton.Config(m | dict(t.constants), num_warps=w, num_stages=st) for m, w, st in t.candidates()]
    cache = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=list(t.key), restore_value=list(t.restore), **cache)(fn)


def parse_settings(text: str) -> dict[str, tuple]:
    """'fwd_split=4x3+dq=8x4' -> {'fwd_split': (4, 3), 'dq': (8, 4)}: kernels of the tuning table and their
    (warps, stages); 'dkdv=4x3/Q_STEPS=2' adds the kernel's constexprs to set, {'dkdv': (4, 3, {'Q_STEPS': 2})}
    (see :func:`fixed_settings` for which)."""
    settings = {}
    for item in text.split("+"):
        name, _, value = item.partition("=")
        launch, *assignments = value.split("/")
        warps, _, stages = launch.partition("x")
        if name not in _KERNELS:
            raise ValueError(f"launch setting {item!r}: {name!r} is not one of {sorted(_KERNELS)}")
        if not (warps.isdigit() and stages.isdigit()) or int(warps) not in (1, 2, 4, 8, 16) or int(stages) < 1:
            raise ValueError(f"launch setting {item!r}: write KERNEL=WARPSxSTAGES[/CONSTEXPR=INT...] with warps 1, 2, "
                             "4, 8 or 16 and stages >= 1, e.g. dq=8x4 or dkdv=4x3/Q_STEPS=2")
        meta = {}
        for assignment in assignments:
            key, _, number = assignment.partition("=")
            if not key or not number.lstrip("-").isdigit():
                raise ValueError(f"launch setting {item!r}: {assignment!r} is not CONSTEXPR=INT")
            meta[key] = int(number)
        settings[name] = (int(warps), int(stages), meta) if meta else (int(warps), int(stages))
    return settings


def _with_constexprs(t: _Tuning, name: str, meta: dict[str, int]) -> _Tuning:
    """``t`` launched with the constexprs ``meta`` when untuned: a tuned choice takes the given option (one of its
    options), any other constexpr of the kernel that has a default value is passed as a constant."""
    choices, constants = dict(t.choices), dict(t.constants)
    params = inspect.signature(jit_function(name).fn).parameters
    for key, value in meta.items():
        if key in choices:
            if value not in choices[key]:
                raise ValueError(f"kernel {name!r}: {key}={value} is not one of its options {choices[key]}")
            choices[key] = (value,)
        elif key in constants:
            raise ValueError(f"kernel {name!r}: {key} is fixed at {constants[key]} for this launch entry")
        elif key in params and params[key].default is not inspect.Parameter.empty:
            constants[key] = value
        else:
            raise ValueError(f"kernel {name!r}: {key!r} is neither a tuned choice ({sorted(choices)}) nor a "
                             "constexpr with a default value of its kernel")
    return replace(t, choices=tuple(choices.items()), constants=tuple(constants.items()))


@contextlib.contextmanager
def fixed_settings(settings: dict[str, tuple]):
    """Launch the named kernels with these (warps, stages) inside the block, untuned (SLA_DIST_AUTOTUNE=0 is set
    for the block: a tuner would pick its own), then restore the table, the environment and the kernel cache. A
    third item, {constexpr: value}, sets tuned choices (to one of their options) or constexprs the kernel gives a
    default (e.g. dK/dV's Q_STEPS)."""
    unknown = sorted(set(settings) - set(_KERNELS))
    if unknown:
        raise ValueError(f"no kernels named {unknown} (kernels: {sorted(_KERNELS)})")
    saved, autotune = dict(_KERNELS), os.environ.get("SLA_DIST_AUTOTUNE")
    try:
        for name, (warps, stages, *meta) in settings.items():
            tuning = replace(_KERNELS[name], fixed=(warps, stages))
            _KERNELS[name] = _with_constexprs(tuning, name, meta[0]) if meta else tuning
        os.environ["SLA_DIST_AUTOTUNE"] = "0"
        get_kernel.cache_clear()
        yield
    finally:
        _KERNELS.clear()
        _KERNELS.update(saved)
        if autotune is None:
            os.environ.pop("SLA_DIST_AUTOTUNE", None)
        else:
            os.environ["SLA_DIST_AUTOTUNE"] = autotune
        get_kernel.cache_clear()
