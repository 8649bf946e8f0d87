"""The H200 measurements the scaling model (scaling_model.py) is fitted to and checked against: SLA layer timings,
Ulysses exchange timings and DiT steps, each naming the results file (or issue) it comes from. bf16, D 128, 95 %
sparsity (topk 0.05) unless given. The measured training steps live beside the model (they carry its parallel
layout); everything else that was measured is here, so that a new measurement is one line in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerTiming:
    """One measured SLA layer call: fwd and fwd+bwd milliseconds at sequence length L, heads and topk."""

    L: int
    heads: int
    topk: float
    fwd_ms: float
    fwd_bwd_ms: float
    source: str = ""
    """The results file (and row) it comes from."""


_SWEEP = "2026-11-27-h200-attention.md (autotuned, dfa268d)"
_DQFUSE = "2026-11-30-h200x2-dqfuse.md, dQ kernel (main 817e785), CUDA graphs"
_OVERLAP = "2026-11-30-h200x2-ulysses-overlap.md"
# The overlap file's P = 1 layers, L 131072 (eager: GPU-bound there), by (run, layout, heads): (fwd ms, fwd+bwd ms).
# Run 2 is main 817e785, run 1 the wip-overlap tree, run 3 the same with TORCH_NCCL_HIGH_PRIORITY=1 (a P = 1 layer
# runs no NCCL): all today's kernels.
OVERLAP_P1 = {
    (run, layout, heads): LayerTiming(131072, heads, 0.05, fwd, fwd_bwd, f"{_OVERLAP}, run {run}, P 1, {layout}")
    for run, layout, heads, fwd, fwd_bwd in (
        (1, "bhld", 12, 21.4, 70.4), (1, "bhld", 24, 41.9, 140.7), (1, "blhd", 12, 21.6, 71.5),
        (1, "blhd", 24, 41.7, 142.0), (2, "bhld", 12, 21.6, 71.0), (2, "bhld", 24, 41.9, 140.0),
        (2, "blhd", 12, 22.0, 72.2), (2, "blhd", 24, 41.8, 141.4), (3, "blhd", 12, 21.7, 71.5),
        (3, "blhd", 24, 41.9, 141.6))
}
_FIT_131072 = (2, "blhd", 12)
# The current kernels (main 817e785; sla_dist/kernels is unchanged from 106aee1 to today's main) at the three lengths
# they were timed at, H 12: the per-length fit (SLALayerFit) solves t = heads (a topk L^2 + b L) + c through these,
# forward and forward+backward alike. L 8192 and 32768 in CUDA graphs (the GPU's time without the host's launches),
# L 131072 in the layout training feeds the layer (blhd).
LAYER_FIT = (
    LayerTiming(8192, 12, 0.05, 0.275, 0.847, _DQFUSE),
    LayerTiming(32768, 12, 0.05, 1.607, 5.387, _DQFUSE),
    OVERLAP_P1[_FIT_131072],
)
# The 2026-11-27 sweep's code (dfa268d): the first fit, now 'history' (older kernels), each point at that code's
# level. L 131072 from the P = 1 rows of 2026-11-27-h200x4-sequence-parallel.md (same code).
LAYER_SWEEP = (
    LayerTiming(16384, 12, 0.05, 1.551, 4.485, _SWEEP),
    LayerTiming(32768, 12, 0.05, 2.147, 7.953, _SWEEP),
    LayerTiming(75600, 12, 0.05, 7.846, 34.358, _SWEEP),
    LayerTiming(131072, 12, 0.05, 18.9, 85.8, "2026-11-27-h200x4-sequence-parallel.md, P 1"),
    LayerTiming(131072, 24, 0.05, 36.6, 168.7, "2026-11-27-h200x4-sequence-parallel.md, P 1"),
    LayerTiming(32768, 12, 0.20, 4.717, 20.963, _SWEEP),
    LayerTiming(32768, 12, 0.10, 3.624, 12.899, _SWEEP),
    LayerTiming(32768, 12, 0.03, 2.569, 6.703, _SWEEP),
)
# Code levels: the layer at L 32768, H 12, topk 0.05 as each code ran it. A measurement is predicted at the level of
# the code it ran: the per-length fit times this over the fit's own time at that point.
LAYER_NOW = LAYER_FIT[1]
LAYER_DFA268D = LAYER_SWEEP[1]
LAYER_1129 = LayerTiming(32768, 12, 0.05, 1.879, 7.534,
                         "2026-11-29-h200-attention.md, SLA full layer, BQ128 (the code of issue #12's runs)")
LAYER_9C25E82 = LayerTiming(32768, 12, 0.05, 1.577, 5.610,
                            "2026-11-30-h200x2-bias-grad-compiled-sp.md, 9c25e82, CUDA graphs (the kernels of "
                            "e0fe62c: the memory branch merged and reverted between them, 240f411)")
LAYER_MEMORY_BRANCH = LayerTiming(32768, 12, 0.05, 1.608, 5.927,
                                  "2026-11-30-h200x2-memory-exchange-compile.md, merge with summaries in chunks of "
                                  "0.25, call 2 (the tree of the compiled DiT step and of the exchange timings)")
LAYER_BEEC4B4 = LayerTiming(32768, 12, 0.05, 1.579, 5.444,
                            "2026-11-30-h200x2-bias-grad-compiled-sp.md, beec4b4, CUDA graphs (before the backward "
                            "pre-pass of 106aee1)")
_PREPASS = "2026-11-30-h200x2-prepass.md, call 4, the branch merged as 106aee1 (today's kernels), CUDA graphs"
_EXCHANGE_P1 = "2026-11-30-h200x2-ulysses-exchange.md, P 1, blhd"
_ONE_12, _ONE_24 = (LayerTiming(131072, heads, 0.05, fwd, fwd_bwd, _EXCHANGE_P1)
                    for heads, fwd, fwd_bwd in ((12, 21.4, 72.4), (24, 41.7, 140.7)))
# Layer timings no fit uses, with the code level each ran: checks of the per-length fit times the level.
LAYER_CHECKS = (
    (LayerTiming(8192, 12, 0.05, 0.276, 0.841, _PREPASS), LAYER_NOW),
    (LayerTiming(32768, 12, 0.05, 1.580, 5.383, _PREPASS), LAYER_NOW),
    (LayerTiming(8192, 12, 0.05, 0.275, 0.872, "2026-11-30-h200x2-bias-grad-compiled-sp.md, beec4b4, CUDA graphs"),
     LAYER_BEEC4B4),
    (_ONE_12, LAYER_MEMORY_BRANCH),
    (_ONE_24, LAYER_MEMORY_BRANCH),
    *((t, LAYER_NOW) for key, t in OVERLAP_P1.items() if key != _FIT_131072),
)


@dataclass(frozen=True)
class ExchangeTiming:
    """One measured Ulysses exchange: fwd+bwd milliseconds of the Ulysses layer with SLA replaced by a pass-through
    (packing copies and collectives, both directions), and the SLA layer's fwd and fwd+bwd at P and at P = 1."""

    exchange: str
    P: int
    L: int
    heads: int
    exchange_ms: float
    fwd_ms: float
    fwd_bwd_ms: float
    one: LayerTiming
    source: str = "2026-11-30-h200x2-ulysses-exchange.md, blhd"
    """The file and layout: blhd is what training feeds the layer."""


EXCHANGE_TIMINGS = (
    ExchangeTiming("fused", 2, 131072, 12, 5.66, 12.9, 41.5, _ONE_12),
    ExchangeTiming("fused", 2, 131072, 24, 9.86, 25.5, 80.3, _ONE_24),
    ExchangeTiming("deepspeed", 2, 131072, 12, 6.14, 13.2, 41.9, _ONE_12),
    ExchangeTiming("deepspeed", 2, 131072, 24, 10.66, 25.7, 81.1, _ONE_24),
)
# Same file, "a2a GB/s": one bare all_to_all_single of the q, k, v volume at P = 2, every row (GB/s).
BARE_ALL_TO_ALL_GBPS = (281, 270, 279, 285, 244, 260, 294, 302)
# The overlap file's fused exchanges at one chunk (no pipelining), P 2: checks of the fit above, each Ulysses layer
# beside its own run's P = 1 layer. Run 1 ran the pipelined code path with overlap_chunks 1, run 2 main's single
# exchange (817e785), run 3 run 1 with TORCH_NCCL_HIGH_PRIORITY=1. (run, layout, heads, exchange, fwd, fwd+bwd ms)
EXCHANGE_CHECKS = tuple(
    ExchangeTiming("fused", 2, 131072, heads, exchange_ms, fwd, fwd_bwd, OVERLAP_P1[run, layout, heads],
                   f"{_OVERLAP}, run {run}, {layout}, chunks 1")
    for run, layout, heads, exchange_ms, fwd, fwd_bwd in (
        (1, "bhld", 12, 5.48, 12.9, 39.8), (1, "bhld", 24, 9.60, 26.0, 80.4), (1, "blhd", 12, 5.37, 13.0, 39.9),
        (1, "blhd", 24, 10.13, 26.1, 80.2), (2, "bhld", 12, 5.59, 13.2, 40.6), (2, "bhld", 24, 9.95, 26.2, 80.2),
        (2, "blhd", 12, 5.42, 13.2, 40.5), (2, "blhd", 24, 9.86, 26.1, 80.0), (3, "blhd", 12, 5.03, 13.0, 40.1),
        (3, "blhd", 24, 9.22, 25.9, 79.8))
)
# All-to-all calls per attention pass (forward, backward or recompute): the fused exchange sends q, k, v in one and
# the output in another (sla_dist/parallel/exchange.py); DeepSpeed's sends each of the four alone.
EXCHANGE_CALLS = {"fused": 2, "deepspeed": 4}
# 2026-11-27-h200x4-sequence-parallel.md, Ulysses rows at L 131072 (DeepSpeed's exchange of then, 11-27 code):
# (P, heads, fwd ms, fwd+bwd ms).
ULYSSES_1127 = ((2, 12, 14.1, 53.0), (2, 24, 26.3, 102.2), (4, 12, 8.6, 28.8), (4, 24, 14.5, 53.8))
ULYSSES_L, ULYSSES_HEAD_DIM = 131072, 128


@dataclass(frozen=True)
class DiTStep:
    """bench_dit_step.py on one H200: the training step (no optimizer) of the reference wan2.1-1.3b DiT at 21 x 60 x
    104 latents = 32760 tokens, with SLA and with attention replaced by "return v", seconds; the code level of its
    SLA layer."""

    sla_s: float
    none_s: float
    checkpoint: bool
    compiled: bool
    code: LayerTiming
    source: str


DIT_STEPS = {
    "eager": DiTStep(1.279, 0.839, True, False, LAYER_1129, "issue #12, bench_dit_step.py"),
    # Blocks compiled, no checkpointing; its tree held the memory branch (summaries in chunks of 0.25).
    "compiled": DiTStep(0.7785, 0.5136, False, True, LAYER_MEMORY_BRANCH, "2026-11-30-h200-dit-step-compiled.md"),
}
# bench_train.py times steps 3..7 of 8 while SLACallback anneals topk from 1 to 0.05 over the recipe's 500 steps
# (recipes/wan1.3b_sla_finetune.yaml): the mean topk of the timed steps, unless the run overrode the schedule.
BENCH_TRAIN_TOPK = 1 - 5 / 500 * (1 - 0.05)
