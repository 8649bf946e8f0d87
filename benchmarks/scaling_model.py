"""Analytical step time and per-GPU memory of SLA DiT training over SP x DP x ZeRO, fitted to H200 measurements.

Issue #12, item 6. Nothing here runs a GPU: the model is calibrated on measurements already taken (each constant
below names its source) and predicts wan2.1-14b at 75600 tokens per sample on 8-256 GPUs.

Per optimizer step, per GPU (one sample per SP group, sequence split over SP = P ranks, ZeRO over all P x DP ranks):

    step = layers x [non-attention + attention + Ulysses all-to-all]  +  ZeRO collectives  +  Adam  +  fixed overhead
    non-attention  matmul FLOPs of the sample (bench_dit_step.model_flops, attention excluded) / P, times 3 (fwd +
                   bwd) or 4 (+ recompute under activation checkpointing), at an MFU fitted to the measured
                   "no attention" DiT step
    attention      SLA layer time t(L, heads, topk) = heads x (a x topk x L^2 + b x L), a (sparse blocks) and b
                   (linear branch, block map, glue) fitted to the measured layer sweeps, at H / P heads per rank,
                   times an in-model factor fitted to the measured DiT step (SLA minus no-attention)
    all-to-all     4 per attention forward (q, k, v in, o out), 4 in backward (dq, dk, dv out, do in), 4 more when
                   the forward is recomputed; each moves (L/P) x H x D bf16 x (P-1)/P bytes per rank; per-call
                   latency and bandwidth fitted to the measured Ulysses strong-scaling points
    ZeRO           gradient reduce-scatter + parameter all-gather (ZeRO-2: once after the step; ZeRO-3: before
                   forward, recompute and backward, plus a per-gathered-tensor latency fitted to the measured
                   ZeRO-3 - ZeRO-2 difference); a ring over more than one node runs at the inter-node bandwidth

Memory per GPU: bf16 params (ZeRO-2 full, ZeRO-3 sharded) + fp32 gradient partition + fp32 Adam master, m, v
(sharded) + DeepSpeed's reduce bucket + activations (bytes per token per layer fitted to the measured 112 GiB peak;
with checkpointing, the block inputs plus one block's activations).

    python benchmarks/scaling_model.py            # checks against the measurements, the 14B table, results files
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench_dit_step import PEAKS, Shape, model_flops
from results_io import save_results
from sla_dist.models import VideoDiT, dit_config

GIB = 2**30
RESULTS = Path(__file__).resolve().parent / "results"

# --- measurements (H200, bf16, D 128, 95 % sparsity = topk 0.05 unless given) -------------------------------------


@dataclass(frozen=True)
class LayerTiming:
    """One measured SLA layer call: fwd and fwd+bwd milliseconds at sequence length L, heads and topk."""

    L: int
    heads: int
    topk: float
    fwd_ms: float
    fwd_bwd_ms: float


# results/2026-11-27-h200-attention.md (autotuned, dfa268d) and, for L 131072, the P = 1 rows of
# results/2026-11-27-h200x4-sequence-parallel.md (same code). L 8192 is left out: there the layer is bound by the host
# (3.9 ms of launches per fwd+bwd, results/2026-11-29-h200-attention.md), not by the a L^2 + b L of the GPU.
LAYER_SWEEP = (
    LayerTiming(16384, 12, 0.05, 1.551, 4.485),
    LayerTiming(32768, 12, 0.05, 2.147, 7.953),
    LayerTiming(75600, 12, 0.05, 7.846, 34.358),
    LayerTiming(131072, 12, 0.05, 18.9, 85.8),
    LayerTiming(131072, 24, 0.05, 36.6, 168.7),
    LayerTiming(32768, 12, 0.20, 4.717, 20.963),
    LayerTiming(32768, 12, 0.10, 3.624, 12.899),
    LayerTiming(32768, 12, 0.03, 2.569, 6.703),
)
# results/2026-11-29-h200-attention.md, "SLA full layer, BQ128": today's code, fixed launch settings (as the training
# runs of issue #12). The fitted sweep is scaled by its ratio to the sweep's point of the same shape.
LAYER_NOW = LayerTiming(32768, 12, 0.05, 1.879, 7.534)
# results/2026-11-27-h200x4-sequence-parallel.md, Ulysses rows at L 131072: (P, heads, fwd ms, fwd+bwd ms).
ULYSSES = ((2, 12, 14.1, 53.0), (2, 24, 26.3, 102.2), (4, 12, 8.6, 28.8), (4, 24, 14.5, 53.8))
ULYSSES_L, ULYSSES_HEAD_DIM = 131072, 128
# Issue #12 (bench_dit_step.py, one H200, wan2.1-1.3b, 21 x 60 x 104 latents = 32760 tokens, checkpointing, no
# optimizer): training step of the reference DiT with SLA and with attention replaced by "return v", seconds.
DIT_STEP_SLA_S, DIT_STEP_NO_ATTENTION_S = 1.279, 0.839
# Issue #12 (bench_train.py, wan1.3b recipe, 32760 tokens per sample, one SP group: world = SP). SP = 1 no
# checkpointing: 1.11 s, 112 GiB peak, steady-state topk; SP = 1 with checkpointing 1.43 s; SP = 2 no checkpointing
# 0.72 s; SP = 2 with checkpointing (today, fixed launch settings): ZeRO-2 3.06 s 17.2 GiB, ZeRO-3 3.38 s 18.3 GiB.
TRAIN_1GPU_NO_CKPT = (1.11, 112.0)
TRAIN_1GPU_CKPT_S = 1.43
TRAIN_2GPU_NO_CKPT_S = 0.72
TRAIN_2GPU_CKPT = {2: (3.06, 17.2), 3: (3.38, 18.3)}
# bench_train.py times steps 3..7 of 8 while SLACallback anneals topk from 1 to 0.05 over the recipe's 500 steps
# (recipes/wan1.3b_sla_finetune.yaml): the mean topk of the timed steps, unless the run overrode the schedule.
BENCH_TRAIN_TOPK = 1 - 5 / 500 * (1 - 0.05)

# --- assumptions: hardware and DeepSpeed defaults (not measured here) -----------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """The machines: H200 nodes of ``gpus_per_node`` GPUs."""

    peak_flops: float = PEAKS["H200"]
    """Dense bf16 tensor-core peak, FLOP/s (bench_dit_step.PEAKS)."""
    hbm_bytes_per_s: float = 4.8e12
    """HBM3e bandwidth of the H200 spec sheet (also PERF_NOTES.md); Adam is bound by it."""
    capacity_bytes: float = 141e9
    """Memory per GPU: the spec sheet's 141 GB (torch sees ~140 GiB, so this is a conservative limit)."""
    gpus_per_node: int = 8
    """NVLink domain; a collective over more ranks runs at ``inter_node_bytes_per_s``."""
    inter_node_bytes_per_s: float = 40e9
    """Per-GPU InfiniBand bandwidth: one 400 Gb/s NIC per GPU (DGX H200) = 50 GB/s, 80 % of it reached. Assumed:
    the project has no multi-node measurement."""

    def __post_init__(self) -> None:
        for name in ("peak_flops", "hbm_bytes_per_s", "capacity_bytes", "gpus_per_node", "inter_node_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Cluster.{name}={getattr(self, name)!r} must be positive")


BF16 = 2  # bytes per element of parameters, gradients on the wire and activations (bf16-mixed)
REDUCE_BUCKET_ELEMENTS = 5e8  # deepspeed/runtime/zero/config.py reduce_bucket_size default (bf16 buffer)
PERSISTENCE_THRESHOLD = 1e5  # deepspeed/runtime/zero/config.py stage3_param_persistence_threshold: smaller stay whole
ADAM_BYTES_PER_PARAM = 30  # read fp32 master, m, v, grad (16 B); write master, m, v (12 B) and the bf16 copy (2 B)
# What a layer keeps for backward that grows with the MLP width: the up projection's output (GELU's input) and GELU's
# output (the down projection's input), bf16. The rest is proportional to dim and fitted (Calibration).
MLP_ACTIVATION_BYTES_PER_FFN = 4

# --- the model ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One sample per SP group: a named DiT shape at a latent grid (tokens = T x H/2 x W/2), SLA at ``topk``."""

    model: str
    latents: tuple[int, int, int]
    topk: float = 0.05
    text_len: int = 512

    def __post_init__(self) -> None:
        dit_config(self.model)  # a ValueError naming an unknown model
        if not 0 < self.topk <= 1:
            raise ValueError(f"topk={self.topk} must be in (0, 1]")
        _, h, w = self.latents
        if not all(isinstance(v, int) and v > 0 for v in self.latents) or h % 2 or w % 2:
            raise ValueError(f"latents={self.latents!r} must be three positive integers with even H and W "
                             "(1 x 2 x 2 patches)")

    @property
    def shape(self) -> Shape:
        c = dit_config(self.model)
        return Shape(c.dim, c.num_heads, c.num_layers, c.ffn_dim, c.text_dim, c.in_channels, c.freq_dim,
                     self.latents, self.text_len)


@dataclass(frozen=True)
class Parallel:
    """SP x DP ranks, ZeRO stage, activation checkpointing, and the fraction of ZeRO traffic hidden behind compute
    (0: the strategy's ``overlap_comm: False``, sla_dist/lightning/strategy.py)."""

    sp: int
    dp: int
    zero_stage: int = 2
    checkpoint: bool = True
    overlap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("sp", "dp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage={self.zero_stage!r} must be 2 or 3")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"overlap={self.overlap} must be in [0, 1]")

    @property
    def world(self) -> int:
        return self.sp * self.dp


@dataclass(frozen=True)
class SLALayerFit:
    """t(L, heads, topk) = level x heads x (a x topk x L^2 + b x L) ms, for the forward and for forward+backward:
    (a, b) fitted to a sweep, ``level`` the ratio of today's code to the sweep's at one measured point."""

    fwd: tuple[float, float, float]
    fwd_bwd: tuple[float, float, float]

    @staticmethod
    def fit(points: tuple[LayerTiming, ...], level: LayerTiming) -> SLALayerFit:
        """Least squares in relative error over ``points``; the level is ``level`` (today's code) over the point of
        ``points`` with its L, heads and topk (the sweep's code)."""
        same = [p for p in points if (p.L, p.heads, p.topk) == (level.L, level.heads, level.topk)]
        if not same:
            raise ValueError(f"no point of the sweep has L={level.L}, heads={level.heads}, topk={level.topk}")

        def one(attr: str) -> tuple[float, float, float]:
            y = np.array([getattr(p, attr) for p in points])
            x = np.array([[p.heads * p.topk * p.L**2, p.heads * p.L] for p in points]) / y[:, None]
            a, b = np.linalg.lstsq(x, np.ones(len(points)), rcond=None)[0]
            return float(a), float(b), getattr(level, attr) / getattr(same[0], attr)
        return SLALayerFit(one("fwd_ms"), one("fwd_bwd_ms"))

    def ms(self, L: int, heads: float, topk: float, backward: bool, sweep: bool = False) -> float:
        """Milliseconds of one layer call; ``sweep``: at the sweep's code level instead of today's."""
        a, b, level = self.fwd_bwd if backward else self.fwd
        return (1.0 if sweep else level) * heads * (a * topk * L**2 + b * L)


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of a named DiT, from the model itself on the meta device."""

    params: int
    block_params: int
    gathered_tensors: int
    """Tensors ZeRO-3 all-gathers (the others are below the persistence threshold and stay on every rank)."""

    @staticmethod
    @functools.cache
    def of(name: str) -> ModelCounts:
        layers = dit_config(name).num_layers
        with torch.device("meta"):
            one = VideoDiT(dit_config(name, num_layers=1))
        block = list(one.blocks[0].parameters())
        outer = [p for p in one.parameters() if all(p is not q for q in block)]
        big = lambda ps: sum(p.numel() > PERSISTENCE_THRESHOLD for p in ps)  # noqa: E731
        n_block = sum(p.numel() for p in block)
        return ModelCounts(sum(p.numel() for p in outer) + layers * n_block, n_block, big(outer) + layers * big(block))


@dataclass
class Calibration:
    """The fitted parameters; ``calibrate()`` says which measurement fixes each."""

    sla: SLALayerFit
    attention_in_model: float
    """DiT-step attention time over the isolated layer's (layout, RoPE'd copies, the SP wrapper's glue)."""
    mfu: float
    """Model-FLOPs utilisation of the non-attention matmuls (recomputation counted)."""
    a2a_latency_s: float
    a2a_bytes_per_s: float
    """Ulysses all-to-all per call and per byte; also used for every collective inside one node."""
    step_overhead_s: float
    """Per-step time beyond the DiT step and Adam (loss, Lightning / DeepSpeed bookkeeping, gradient clipping)."""
    zero3_gather_latency_s: float
    """Per all-gathered parameter tensor per pass, ZeRO-3 only (hooks, small collectives)."""
    activation_bytes_per_dim: float
    """Bytes kept per token per layer per model channel, beside MLP_ACTIVATION_BYTES_PER_FFN x ffn."""
    cluster: Cluster = field(default_factory=Cluster)


@dataclass
class Prediction:
    """Step time (s) and per-GPU peak memory (bytes), with their parts."""

    step_s: float
    time_parts: dict[str, float]
    memory_bytes: float
    memory_parts: dict[str, float]
    fits: bool


def a2a_bytes(tokens: int, P: int, channels: int) -> float:
    """Bytes one rank sends in one Ulysses all-to-all of a bf16 [tokens / P, channels] shard (q, k, v or o): all but
    its own 1/P."""
    return tokens // P * channels * BF16 * (P - 1) / P


def _ring_s(nbytes: float, ranks: int, cal: Calibration) -> float:
    """Seconds for a reduce-scatter or all-gather of ``nbytes`` over ``ranks`` (ring: (n-1)/n of it per rank)."""
    bw = cal.a2a_bytes_per_s if ranks <= cal.cluster.gpus_per_node else cal.cluster.inter_node_bytes_per_s
    return nbytes * (ranks - 1) / ranks / bw


def predict(work: Workload, par: Parallel, cal: Calibration, counts: ModelCounts | None = None) -> Prediction:
    """Step time and memory of one GPU for ``work`` under ``par``; raises ValueError on a split that cannot run."""
    s, counts = work.shape, counts or ModelCounts.of(work.model)
    P, L, ckpt = par.sp, s.tokens, int(par.checkpoint)
    if s.heads % P or L % P:
        raise ValueError(f"sp={P} must divide the heads ({s.heads}) and the tokens ({L})")
    passes = 3 + ckpt  # fwd + bwd (2 x fwd) [+ recompute]
    nonattn = passes * model_flops(s, 0.0, False) / P / (cal.mfu * cal.cluster.peak_flops)
    attn_ms = cal.sla.ms(L, s.heads / P, work.topk, True) + ckpt * cal.sla.ms(L, s.heads / P, work.topk, False)
    attention = s.layers * cal.attention_in_model * attn_ms / 1e3
    a2a = 0.0
    if P > 1:
        bw = cal.a2a_bytes_per_s if P <= cal.cluster.gpus_per_node else cal.cluster.inter_node_bytes_per_s
        a2a = s.layers * 4 * (2 + ckpt) * (cal.a2a_latency_s + a2a_bytes(L, P, s.dim) / bw)
    N, grads = par.world, BF16 * counts.params  # gradients and parameters on the wire
    zero = 0.0
    if N > 1:
        gathers = 1 if par.zero_stage == 2 else 2 + ckpt
        zero = _ring_s(grads, N, cal) + gathers * _ring_s(grads, N, cal)
        if par.zero_stage == 3:
            zero += gathers * counts.gathered_tensors * cal.zero3_gather_latency_s
        zero *= 1 - par.overlap
    adam = ADAM_BYTES_PER_PARAM * counts.params / N / cal.cluster.hbm_bytes_per_s
    times = dict(non_attention=nonattn, attention=attention, all_to_all=a2a, zero=zero, adam=adam,
                 overhead=cal.step_overhead_s)

    # fp32 gradient partition (DeepSpeed's gradient accumulation dtype under bf16, deepspeed/runtime/zero/stage3.py
    # grad_partitions_flat_buffer) and fp32 master, m, v: 4 + 12 bytes per parameter, over all SP x DP ranks.
    states = 16 * counts.params / N
    if par.zero_stage == 2:
        states += BF16 * counts.params  # every rank keeps the whole bf16 model
    else:
        states += BF16 * (counts.params / N + 2 * counts.block_params)  # its shard + a gathered and a prefetched block
    per_token_layer = cal.activation_bytes_per_dim * s.dim + MLP_ACTIVATION_BYTES_PER_FFN * s.ffn
    local = L // P
    # Checkpointing keeps each block's input and rebuilds one block's activations at a time.
    acts = (s.layers * local * BF16 * s.dim + local * per_token_layer) if ckpt else s.layers * local * per_token_layer
    memory = dict(states=states, reduce_bucket=BF16 * REDUCE_BUCKET_ELEMENTS, activations=acts)
    total = sum(memory.values())
    return Prediction(sum(times.values()), times, total, memory, total <= cal.cluster.capacity_bytes)


WAN13 = Workload("wan2.1-1.3b", (21, 60, 104))  # bench_dit_step.py / bench_train.py: 32760 tokens
WAN14 = Workload("wan2.1-14b", (21, 90, 160))  # recipes/wan14b_sla_sp8.yaml: 75600 tokens


def calibrate(cluster: Cluster | None = None) -> Calibration:
    """Fit each free parameter to one measurement (in this order, each using those before it)."""
    cluster = cluster or Cluster()
    s, counts = WAN13.shape, ModelCounts.of(WAN13.model)
    sla = SLALayerFit.fit(LAYER_SWEEP, LAYER_NOW)
    # Non-attention MFU and the in-model attention factor: the two DiT steps (checkpointing: 4 passes, 1 recompute).
    mfu = 4 * model_flops(s, 0.0, False) / DIT_STEP_NO_ATTENTION_S / cluster.peak_flops
    layer_ms = sla.ms(s.tokens, s.heads, WAN13.topk, True) + sla.ms(s.tokens, s.heads, WAN13.topk, False)
    in_model = (DIT_STEP_SLA_S - DIT_STEP_NO_ATTENTION_S) / s.layers / (layer_ms / 1e3)
    # All-to-all: measured P-rank time minus the 1-rank time over P, against 4 (fwd) or 8 (fwd+bwd) calls of bytes.
    one = {p.heads: p for p in LAYER_SWEEP if p.L == ULYSSES_L}
    rows, comm = [], []
    for P, H, fwd, fwd_bwd in ULYSSES:
        nbytes = a2a_bytes(ULYSSES_L, P, H * ULYSSES_HEAD_DIM)
        for calls, ms, base in ((4, fwd, one[H].fwd_ms), (8, fwd_bwd, one[H].fwd_bwd_ms)):
            rows.append([calls, calls * nbytes])
            comm.append((ms - base / P) / 1e3)
    lat, inv_bw = np.linalg.lstsq(np.array(rows), np.array(comm), rcond=None)[0]
    cal = Calibration(sla, in_model, mfu, float(lat), float(1 / inv_bw), 0.0, 0.0, 0.0, cluster)
    # Fixed per-step overhead: the 1-GPU checkpointed training step minus the same DiT step and Adam.
    cal.step_overhead_s = TRAIN_1GPU_CKPT_S - predict(WAN13, Parallel(1, 1), cal, counts).step_s
    # ZeRO-3 latency per gathered tensor: the measured ZeRO-3 - ZeRO-2 step difference at SP = 2 beyond the bytes.
    z2, z3 = (predict(WAN13, Parallel(2, 1, stage), cal, counts).step_s for stage in (2, 3))
    measured = TRAIN_2GPU_CKPT[3][0] - TRAIN_2GPU_CKPT[2][0]
    cal.zero3_gather_latency_s = (measured - (z3 - z2)) / (3 * counts.gathered_tensors)
    # Activation bytes: the 1-GPU peak without checkpointing, less states and bucket, over layers x tokens.
    base = predict(WAN13, Parallel(1, 1, checkpoint=False), cal, counts).memory_parts
    per_token_layer = ((TRAIN_1GPU_NO_CKPT[1] * GIB - base["states"] - base["reduce_bucket"])
                       / (s.layers * s.tokens))
    cal.activation_bytes_per_dim = (per_token_layer - MLP_ACTIVATION_BYTES_PER_FFN * s.ffn) / s.dim
    return cal


# --- checks against the measurements --------------------------------------------------------------------------------

TOLERANCE = 0.15
"""Stated accuracy: a step time or peak memory the model was not fitted to is predicted within 15 %."""


@dataclass(frozen=True)
class Check:
    """A measured number beside the model's. ``role``: 'fit' (a calibration input; the error is the fit's
    residual), 'check' (not used by any fit: must be within TOLERANCE) or 'hypothesis' (an input the measurement
    did not record, assumed as said in ``name``)."""

    name: str
    measured: float
    predicted: float
    unit: str
    role: str

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1

    @property
    def within(self) -> bool:
        return abs(self.error) <= TOLERANCE


def checks(cal: Calibration) -> list[Check]:
    """Every measurement the model can be held against, fitted or not."""
    out = []
    for p in LAYER_SWEEP:
        for attr, backward in (("fwd_ms", False), ("fwd_bwd_ms", True)):
            name = f"SLA layer {'fwd+bwd' if backward else 'fwd'}, L {p.L}, H {p.heads}, topk {p.topk} (11-27 code)"
            model = cal.sla.ms(p.L, p.heads, p.topk, backward, sweep=True)
            out.append(Check(name, getattr(p, attr), model, "ms", "fit"))
    for P, H, fwd, fwd_bwd in ULYSSES:
        nbytes = a2a_bytes(ULYSSES_L, P, H * ULYSSES_HEAD_DIM)
        for calls, ms, backward in ((4, fwd, False), (8, fwd_bwd, True)):
            model = (cal.sla.ms(ULYSSES_L, H / P, 0.05, backward, sweep=True)
                     + 1e3 * calls * (cal.a2a_latency_s + nbytes / cal.a2a_bytes_per_s))
            out.append(Check(f"Ulysses layer {'fwd+bwd' if backward else 'fwd'}, P {P}, H {H}, L {ULYSSES_L}", ms,
                             model, "ms", "fit"))
    counts = ModelCounts.of(WAN13.model)
    step = lambda par, work=WAN13: predict(work, par, cal, counts)  # noqa: E731
    out += [
        Check("1.3B DiT step, 1 GPU, SLA, checkpointing, no optimizer", DIT_STEP_SLA_S,
              step(Parallel(1, 1)).step_s - step(Parallel(1, 1)).time_parts["adam"] - cal.step_overhead_s, "s", "fit"),
        Check("1.3B train step, 1 GPU, checkpointing", TRAIN_1GPU_CKPT_S, step(Parallel(1, 1)).step_s, "s", "fit"),
        Check("1.3B train peak, 1 GPU, no checkpointing", TRAIN_1GPU_NO_CKPT[1],
              step(Parallel(1, 1, checkpoint=False)).memory_bytes / GIB, "GiB", "fit"),
        Check("1.3B train step, 1 GPU, no checkpointing", TRAIN_1GPU_NO_CKPT[0],
              step(Parallel(1, 1, checkpoint=False)).step_s, "s", "check"),
        Check("1.3B train step, SP 2, no checkpointing, ZeRO-2", TRAIN_2GPU_NO_CKPT_S,
              step(Parallel(2, 1, checkpoint=False)).step_s, "s", "check"),
    ]
    annealing = dataclasses.replace(WAN13, topk=BENCH_TRAIN_TOPK)
    for stage, (seconds, gib) in TRAIN_2GPU_CKPT.items():
        out.append(Check(f"1.3B train peak, SP 2, checkpointing, ZeRO-{stage}", gib,
                         step(Parallel(2, 1, stage)).memory_bytes / GIB, "GiB", "check"))
        out.append(Check(f"1.3B train step, SP 2, checkpointing, ZeRO-{stage}, steady topk 0.05", seconds,
                         step(Parallel(2, 1, stage)).step_s, "s", "check"))
        out.append(Check(f"1.3B train step, SP 2, checkpointing, ZeRO-{stage}, topk {BENCH_TRAIN_TOPK:.3f} "
                         "(bench_train.py's steps inside the anneal)", seconds,
                         step(Parallel(2, 1, stage), annealing).step_s, "s", "hypothesis"))
    return out


# --- the wan2.1-14b table and the results files ---------------------------------------------------------------------

GPU_COUNTS = (8, 16, 32, 64, 128, 256)
SP_SIZES = (1, 2, 4, 8)


def prediction_table(cal: Calibration, work: Workload = WAN14) -> list[dict]:
    """One row per (GPUs, SP, ZeRO stage): step time, tokens/s per GPU and peak GiB with and without checkpointing."""
    counts, rows = ModelCounts.of(work.model), []
    for gpus in GPU_COUNTS:
        for sp in SP_SIZES:
            for stage in (2, 3):
                row = dict(gpus=gpus, sp=sp, dp=gpus // sp, zero_stage=stage)
                for ckpt in (True, False):
                    p = predict(work, Parallel(sp, gpus // sp, stage, ckpt), cal, counts)
                    key = "ckpt" if ckpt else "no_ckpt"
                    row[key] = dict(step_s=p.step_s, tokens_per_s_per_gpu=work.shape.tokens / sp / p.step_s,
                                    memory_gib=p.memory_bytes / GIB, fits=p.fits, time_parts=p.time_parts,
                                    memory_gib_parts={k: v / GIB for k, v in p.memory_parts.items()})
                rows.append(row)
    return rows


def _cell(p: dict) -> str:
    mark = "" if p["fits"] else " ✗"
    return f"{p['step_s']:.2f} | {p['tokens_per_s_per_gpu']:.0f} | {p['memory_gib']:.1f}{mark}"


def markdown(cal: Calibration, found: list[Check], rows: list[dict]) -> tuple[str, str]:
    """The preamble (model, fitted parameters, checks) and the prediction table."""
    cap = cal.cluster.capacity_bytes / GIB
    lines = ["All times and memory below the checks are **predicted** by `benchmarks/scaling_model.py` (no GPU was "
             "used); the *measured* column of the checks is H200 data from `benchmarks/results/2026-11-27-*`, "
             "`2026-11-29-h200-attention` and issue #12. Model: see the script's docstring.", "",
             "## Fitted parameters", "",
             f"- SLA layer (per head, ms): fwd+bwd = {cal.sla.fwd_bwd[2]:.3f} x ({cal.sla.fwd_bwd[0]:.3e} x topk x "
             f"L^2 + {cal.sla.fwd_bwd[1]:.3e} x L); fwd = {cal.sla.fwd[2]:.3f} x ({cal.sla.fwd[0]:.3e} x topk x L^2 "
             f"+ {cal.sla.fwd[1]:.3e} x L) (level: 2026-11-29 code over 2026-11-27 at L 32768)",
             f"- attention in the DiT / isolated layer: {cal.attention_in_model:.2f}; non-attention MFU "
             f"{cal.mfu:.1%} (recompute counted)",
             f"- Ulysses all-to-all: {cal.a2a_latency_s * 1e3:.3f} ms per call + {cal.a2a_bytes_per_s / 1e9:.0f} GB/s "
             f"(also used for ZeRO collectives inside a node); inter-node "
             f"{cal.cluster.inter_node_bytes_per_s / 1e9:.0f} GB/s per GPU (assumed), {cal.cluster.gpus_per_node} "
             "GPUs per node",
             f"- per-step overhead {cal.step_overhead_s:.3f} s; ZeRO-3 {cal.zero3_gather_latency_s * 1e3:.3f} ms per "
             f"gathered tensor per pass; activations {cal.activation_bytes_per_dim:.1f} B x dim + "
             f"{MLP_ACTIVATION_BYTES_PER_FFN} B x ffn per token per layer", "",
             f"## Checks (tolerance ±{TOLERANCE:.0%} on 'check' rows)", "",
             "| measurement | role | measured | predicted | error |", "|---|---|---|---|---|"]
    for c in found:
        flag = "" if c.role != "check" or c.within else " **outside**"
        lines.append(f"| {c.name} | {c.role} | {c.measured:.3g} {c.unit} | {c.predicted:.3g} {c.unit} | "
                     f"{c.error:+.1%}{flag} |")
    table = [f"## Predicted: wan2.1-14b, {WAN14.shape.tokens} tokens per sample, topk {WAN14.topk}, one sample per "
             f"SP group per step", "",
             f"✗: more than {cap:.1f} GiB ({cal.cluster.capacity_bytes / 1e9:.0f} GB) per GPU.", "",
             "| GPUs | SP | DP | ZeRO | ckpt: step s | tok/s/GPU | GiB/GPU | no ckpt: step s | tok/s/GPU | GiB/GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['gpus']} | {r['sp']} | {r['dp']} | {r['zero_stage']} | {_cell(r['ckpt'])} | "
                     f"{_cell(r['no_ckpt'])} |")
    table += ["", "Where the time and memory go (predicted, checkpointing), recipes/wan14b_sla_sp8.yaml's 32 GPUs:", "",
              "| SP x DP | ZeRO | " + " | ".join(f"{k} s" for k in rows[0]["ckpt"]["time_parts"]) + " | "
              + " | ".join(f"{k} GiB" for k in rows[0]["ckpt"]["memory_gib_parts"]) + " |",
              "|---|---|" + "---|" * (len(rows[0]["ckpt"]["time_parts"]) + len(rows[0]["ckpt"]["memory_gib_parts"]))]
    for r in rows:
        if r["gpus"] == 32 and r["sp"] == 8:
            p = r["ckpt"]
            table.append(f"| {r['sp']} x {r['dp']} | {r['zero_stage']} | "
                         + " | ".join(f"{v:.2f}" for v in p["time_parts"].values()) + " | "
                         + " | ".join(f"{v:.1f}" for v in p["memory_gib_parts"].values()) + " |")
    return "\n".join(lines), "\n".join(table + ["", CAVEATS])


CAVEATS = """## Limits of the prediction

- Assumed, not measured: the inter-node bandwidth (no multi-node run yet), ZeRO collectives inside a node at the
  all-to-all's fitted rate, no overlap of ZeRO traffic with compute (the strategy sets `overlap_comm: False`).
- The non-attention MFU is the 1.3B model's (dim 1536); the 14B's larger matmuls probably run at a higher MFU, so its
  non-attention time is probably overestimated.
- ZeRO-3's per-tensor latency comes from one untuned 2-GPU difference (3.38 - 3.06 s); for the 14B it adds
  3 passes x 287 gathered tensors of it to every step.
- The two checkpointed SP 2 training steps (3.06 / 3.38 s) are 2.6-3.1x the model at steady-state topk 0.05 and
  within ~14 % of it at topk 0.99, the mean topk of the steps bench_train.py times inside the recipe's 500-step
  anneal; the issue does not record which. Re-measuring them with `sparsity.anneal_steps=0` would settle it.
- SLA's two-term fit leaves -23 % at L 16384 (a fixed per-call cost it has no term for) and +12 / +25 % (fwd+bwd /
  fwd) at L 32768, topk 0.05; at L >= 75600, where the 14B runs, it is within 5 %."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results path stem (default: dated, in results/)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    cal = calibrate()
    found = checks(cal)
    rows = prediction_table(cal)
    preamble, table = markdown(cal, found, rows)
    print(preamble, "\n", table, sep="\n")
    if not args.no_write:
        out = args.out or RESULTS / f"{time.strftime('%Y-%m-%d')}-scaling-model"
        meta = dict(kind="predicted (analytical model), not measured", calibration=dataclasses.asdict(cal),
                    checks=[dict(dataclasses.asdict(c), error=c.error) for c in found],
                    workload=dataclasses.asdict(WAN14))
        save_results("scaling-model", "H200 model", meta, rows, "Scaling model: wan2.1-14b over SP x DP x ZeRO",
                     preamble, table, out=out)


if __name__ == "__main__":
    main()
