"""SLA quality study at small scale: does SLA keep the quality of dense attention after fine-tuning?

Reproduces the paper's central claim (arXiv 2509.24006, Table 1) on the built-in synthetic text-to-video set:

1. pretrain a DiT with dense attention;
2. fine-tune copies for the same number of steps with (a) dense attention, twice with different seeds (data order
   and noise: the noise floor), (b) SLA at 95% sparsity, (c) sparse-only at 95% (``linear_scope='none'``: no linear
   branch), (d) linear-only (pure normalised linear attention, the feature map of SLA's linear branch, with a
   learnable output projection starting at identity);
3. report each fine-tune's validation flow-matching loss (held-out clips, fixed noise levels) over the fine-tune,
   FVD of sampled videos against held-out videos (the seeded random 3D-conv extractor for every variant and, given
   ``--i3d``, the I3D detector, which needs >= 10 frames), and the per-layer attention error: each layer's output
   against full attention on the same q, k, v, for fresh SLA / sparse-only / linear-only layers on the pretrained
   model and for each fine-tuned model on its own.

Expected ordering (paper): SLA ~ dense > sparse-only > linear-only. The verdict (study_report.py) checks SLA's final
loss within 1 % of dense, its FVD inside the dense seeds' spread, and the other two worse by more than that spread.

The loop is deliberately plain (one process, AdamW, bf16 autocast on GPU: SLA runs its Triton kernels, dense runs
SDPA) and uses DiTModule's objective (``DiTModule.losses``) without a Trainer, so every variant sees identical
batches and noise for one seed.

    PYTHONPATH=$PWD python3 benchmarks/quality/quality_study.py --preset gpu --out $OUT/quality   # one H200, ~7.5 min
    python benchmarks/quality/quality_study.py --preset cpu --cpu               # 2 CPU cores, ~1 hour
    python benchmarks/quality/quality_study.py --preset tiny --cpu --out /tmp/q # smoke test, seconds

The ``gpu`` preset (issue #15) and its time on one H200
--------------------------------------------------------
A VideoDiT of 8 layers, dim 384, 6 heads of 64, FFN 1536 (20.4 M parameters, 39 MiB in bf16) on clips of 16 x 48 x
48 latents = 9216 tokens per clip, 144 key blocks of 64: topk 0.05 keeps 7 critical blocks per query block (95.1 %
block sparsity). Batch 8, so a step trains on 73,728 tokens.

Estimate from first principles per clip and layer, forward + backward (a calibration run on the device replaces it;
the ``--time-budget`` plan below uses measured times, not these):

* dense attention: 3.5 x 4 L^2 d = 457 GFLOP at ~400 TFLOP/s (cuDNN at head dim 64; the 2026-11-29 H200 table has
  ~560 TFLOP/s at head dim 128): 1.14 ms;
* projections and MLP: 6 x 14 d^2 per token = 114 GFLOP at ~400 TFLOP/s: 0.29 ms;
* norms, RoPE, adaLN, GELU (memory-bound, ~180 kB per token at 4 TB/s): ~0.5 ms;

so ~2.0 ms x 64 clip-layers = 125 ms, plus ~25 ms per step of noise drawn on the CPU (DiTModule draws 4.7 M normals
on the host and copies them, a synchronising copy) and the optimizer: **dense ~0.15 s/step**. SLA replaces the 9.1
ms of dense attention per layer and step with ~4.3 ms (the scaling model's per-head fit, 0.134 ms at head dim 128,
taken as ~0.09 ms at 64, x 48 heads; its ~3.9 ms of host time per layer overlaps the GPU work of the rest): **SLA
~0.11 s/step, sparse-only ~0.10, linear-only ~0.085** (its float32 reference feature map, ~0.8 ms per layer). One
fine-tune step of each of the five runs: ~0.60 s. A no-grad forward of a batch ~0.05 s, so a validation pass (32
clips x 4 noise levels: 16 forwards, plus ~0.4 s of noise drawn on the host) ~1.2 s and the FVD sampling (64 clips x
12 Euler steps = 96 forwards) ~4.5 s per variant.

Phases of one call (``--phase all``), estimated: imports and CUDA start ~10 s; rendering 1344 clips on 8 worker
processes ~3 s (0.01 s a clip); the probe ~60 s (Triton compiles the SLA and sparse-only kernels with fixed launch settings, ~50 s;
then 3 timed steps, 3 forwards and a validation pass per variant); the plan then has ~370 s left, keeps 8 % as
margin and 66 s for evaluations (pretrain 6, fine-tunes 28), FVD sampling (22) and a 10 s reserve, and fills the rest
with training at 4 pretrain steps per fine-tune step: **~920 pretrain steps (~140 s) and ~230 fine-tune steps per
variant (~140 s)**; about 420 s in all. The preset caps the steps at 1600 / 400; ``time_budget = 450`` s (from
process start) lets ``plan_steps`` size them from the probe's measured times, so a faster or slower GPU than
estimated changes the step counts, not the wall time. Explicit ``--pretrain-steps`` / ``--finetune-steps`` are kept
as given (the other count is planned); ``--time-budget 0`` runs the caps.

Between calls: ``--phase pretrain`` writes the pretrained weights as bf16 shards of <= 15 MiB
(``pretrained-<i>-of-<n>.pt``, 3 files for the gpu preset; ``--phase all`` writes them too) and ``--phase finetune
--resume-from DIR`` fine-tunes from them (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # before the heavy imports below: the time budget counts from process start

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from datetime import date  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from sla_dist import SLAConfig, SparseLinearAttention  # noqa: E402
from sla_dist.eval.flow_loss import validation_loss  # noqa: E402
from sla_dist.eval.fvd import I3D_MIN_FRAMES, I3DFeatures, RandomVideoFeatures, VideoFVD  # noqa: E402
from sla_dist.eval.sampling import SamplerConfig, sample  # noqa: E402
from sla_dist.kernels.reference import feature_map_ref  # noqa: E402
from sla_dist.lightning.module import DiTModule  # noqa: E402
from sla_dist.lightning.recipe import OptimSection  # noqa: E402
from sla_dist.lightning.synthetic import SyntheticVideoDataset  # noqa: E402
from sla_dist.models import DiTConfig, PatchConfig, VideoDiT, apply_sla, dit_config  # noqa: E402
from study_attention import candidate_errors, own_errors  # noqa: E402
from study_budget import Clock, Schedule, StepTimes, Workload, default_schedule, plan_steps  # noqa: E402
from study_checkpoint import load_pretrained, rounded, save_pretrained, widened  # noqa: E402
from study_report import FVD_PREFIX, markdown_report, plot, verdict  # noqa: E402

VARIANTS = ("dense", "sla", "sparse_only", "linear_only")
PHASES = ("all", "pretrain", "finetune")
BLOCK = 64
"""Tokens per key block of the SLA layers (SLAConfig's default block_k)."""


@dataclass
class StudyConfig:
    """Sizes and schedule of the study."""

    model: str = "small"
    model_overrides: dict[str, int] = field(default_factory=dict)
    """DiTConfig fields changed from the named config (e.g. a narrower model for CPU runs)."""
    frames: int = 8
    size: int = 32
    text_len: int = 16
    train_samples: int = 1024
    val_samples: int = 64
    fvd_videos: int = 64
    reference_videos: int = 256
    batch_size: int = 8
    pretrain_steps: int = 2000
    finetune_steps: int = 500
    pretrain_lr: float = 3e-4
    finetune_lr: float = 1e-4
    warmup_steps: int = 0
    """Linear learning-rate warm-up of pretraining."""
    eval_every: int = 100
    pretrain_evals: int = 4
    """Validation passes over pretraining (after its start)."""
    draws: int = 4
    """Noise levels per validation clip (validation_loss's draws)."""
    sample_steps: int = 25
    sparsity: float = 0.95
    feature_map: str = "softmax"
    """phi of SLA's linear branch and of linear-only attention."""
    teacher_weight: float = 0.0
    """Distillation from the frozen dense pretrained model in the SLA, sparse-only and linear-only fine-tunes."""
    attention_samples: int = 4
    """Held-out clips of the per-layer attention-error pass."""
    dense_seeds: list[int] = field(default_factory=lambda: [0, 1])
    render_workers: int = 0
    """Processes rendering the synthetic clips (0: in this process)."""
    time_budget: float | None = None
    """Seconds from process start the whole run should fit in: the steps are planned from measured step times
    (at most the ones above); None runs the steps above."""

    def __post_init__(self) -> None:
        for name in ("frames", "size", "text_len", "train_samples", "val_samples", "batch_size", "pretrain_steps",
                     "finetune_steps", "eval_every", "pretrain_evals", "draws", "sample_steps", "attention_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.fvd_videos < 2 or self.reference_videos < 2:
            raise ValueError(f"fvd_videos={self.fvd_videos} and reference_videos={self.reference_videos} must be "
                             ">= 2")
        if self.warmup_steps < 0 or self.render_workers < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} and render_workers={self.render_workers} must be "
                             ">= 0")
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity} must lie in (0, 1)")
        if not self.dense_seeds:
            raise ValueError("dense_seeds=[] needs at least one seed")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget={self.time_budget} must be positive seconds (or None)")
        if self.attention_samples > max(self.val_samples, self.fvd_videos):
            raise ValueError(f"attention_samples={self.attention_samples} exceeds the held-out clips "
                             f"({max(self.val_samples, self.fvd_videos)})")
        SLAConfig(topk=1 - self.sparsity, negligible=0.0, feature_map=self.feature_map)
        OptimSection(lr=self.finetune_lr, teacher_weight=self.teacher_weight)

    def workload(self) -> Workload:
        return Workload(self.pretrain_steps, self.finetune_steps, self.pretrain_evals, self.eval_every,
                        self.fvd_videos, self.sample_steps, self.batch_size)


PRESETS = {
    # Issue #15: one H200, one device call; see the module docstring for the time estimate.
    "gpu": StudyConfig(model_overrides=dict(dim=384, num_heads=6, num_layers=8, ffn_dim=1536), frames=16, size=48,
                       train_samples=1024, val_samples=32, fvd_videos=64, reference_videos=256, batch_size=8,
                       pretrain_steps=1600, finetune_steps=400, warmup_steps=50, eval_every=100, sample_steps=12,
                       render_workers=8, time_budget=450.0),
    # 2 CPU cores in about an hour: a 4-layer, 128-wide DiT on 1024-token clips (16 key blocks of 64, so 95% asks
    # for one critical block per query block: 93.75% realised sparsity).
    "cpu": StudyConfig(model_overrides=dict(dim=128, num_heads=2, num_layers=4, ffn_dim=512, text_dim=128),
                       frames=4, size=32, train_samples=1024, val_samples=32, fvd_videos=32, reference_videos=128,
                       batch_size=4, pretrain_steps=1500, finetune_steps=300, eval_every=50, sample_steps=10),
    # Smoke test (seconds): every part of the study at the smallest sizes that still run it.
    "tiny": StudyConfig(model="tiny", frames=4, size=16, train_samples=16, val_samples=2, fvd_videos=2,
                        reference_videos=4, batch_size=2, pretrain_steps=2, finetune_steps=2, eval_every=1,
                        pretrain_evals=1, draws=2, sample_steps=1, attention_samples=2),
}


class LinearOnlyAttention(nn.Module):
    """phi(q) (phi(K)^T V) / (phi(q) . sum phi(K)) over all keys, then a learnable D x D projection (identity at
    start): the linear-only baseline, no softmax attention at all. O(L D^2), q, k, v [B, H, L, D]."""

    def __init__(self, head_dim: int, feature_map: str = "softmax") -> None:
        super().__init__()
        self.feature_map = feature_map
        self.proj = nn.Linear(head_dim, head_dim)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pq, pk = feature_map_ref(q.float(), self.feature_map), feature_map_ref(k.float(), self.feature_map)
        out = (pq @ (pk.transpose(-1, -2) @ v.float())) / (pq @ pk.sum(-2, keepdim=True).transpose(-1, -2))
        return self.proj(out.to(q.dtype))


def sla_config(variant: str, config: StudyConfig) -> SLAConfig:
    """The SLA layer settings of 'sla' or 'sparse_only' (the same without the linear branch)."""
    return SLAConfig(topk=1.0 - config.sparsity, negligible=0.0, feature_map=config.feature_map,
                     linear_scope="none" if variant == "sparse_only" else "marginal")


def fresh_core(variant: str, head_dim: int, config: StudyConfig, device: torch.device) -> nn.Module:
    """A new attention layer of ``variant`` as conversion installs it (SLA's proj_l at zero, linear-only's
    projection at identity)."""
    if variant in ("sla", "sparse_only"):
        return SparseLinearAttention.from_config(head_dim, sla_config(variant, config)).to(device)
    if variant == "linear_only":
        return LinearOnlyAttention(head_dim, config.feature_map).to(device)
    raise ValueError(f"unknown non-dense variant {variant!r}; choose one of {VARIANTS[1:]}")


def convert(model: VideoDiT, variant: str, config: StudyConfig) -> VideoDiT:
    """The variant's attention in every block: 'dense', 'sla', 'sparse_only' or 'linear_only'."""
    if variant in ("sla", "sparse_only"):
        apply_sla(model, PatchConfig(sla=sla_config(variant, config)))
    elif variant == "linear_only":
        device = next(model.parameters()).device
        for block in model.blocks:
            block.self_attn.core = fresh_core(variant, model.config.head_dim, config, device)
    elif variant != "dense":
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    return model


def _render_chunk(dataset: SyntheticVideoDataset, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Latents and text of ``indices``, as arrays: they travel back through the pool's pipe, not through shared
    memory (which a small /dev/shm would refuse)."""
    torch.set_num_threads(1)
    items = [dataset[i] for i in indices]
    return (torch.stack([it["latents"] for it in items]).numpy(),
            torch.stack([it["text"] for it in items]).numpy())


class Data:
    """Pre-rendered synthetic train / validation / reference sets (disjoint index ranges of one generator)."""

    def __init__(self, config: StudyConfig, channels: int, text_dim: int, device: torch.device) -> None:
        c = config
        total = c.train_samples + max(c.val_samples, c.fvd_videos) + c.reference_videos
        self.dataset = SyntheticVideoDataset(total, channels, c.frames, c.size, c.size, text_dim, c.text_len)
        held = c.train_samples + max(c.val_samples, c.fvd_videos)
        latents, text = self._render(range(total), c.render_workers)
        self.train = latents[:c.train_samples].to(device), text[:c.train_samples].to(device)
        self.held_out = latents[c.train_samples:held].to(device), text[c.train_samples:held].to(device)
        self.reference = self.dataset.codec.decode(latents[held:])

    def _render(self, indices: range, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Render the clips, on ``workers`` forked processes (one thread each) when > 0: rendering is Python-bound,
        ~0.01 s a clip at 16 x 48 x 48 on one core (~16 s for the gpu preset's 1344 serially). Called before CUDA is initialised, so forking is safe."""
        if workers == 0:
            latents, text = _render_chunk(self.dataset, list(indices))
            return torch.from_numpy(latents), torch.from_numpy(text)
        size = math.ceil(len(indices) / (4 * workers))
        chunks = [list(indices[i:i + size]) for i in range(0, len(indices), size)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_render_chunk, [self.dataset] * len(chunks), chunks))
        return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])))

    def batch(self, step: int, seed: int, batch_size: int) -> dict:
        generator = torch.Generator().manual_seed(zlib.crc32(f"data,{seed},{step}".encode()))
        idx = torch.randint(self.train[0].shape[0], (batch_size,), generator=generator).to(self.train[0].device)
        return {"latents": self.train[0][idx], "text": self.train[1][idx], "index": idx}

    def validation(self, config: StudyConfig, model: nn.Module) -> float:
        latents, text = self.held_out
        with _autocast(latents.device):
            return validation_loss(model, latents[:config.val_samples], text[:config.val_samples],
                                   draws=config.draws, batch_size=config.batch_size)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module(dit: DiTConfig, variant: str, seed: int, state: dict | None, lr: float, config: StudyConfig,
            device: torch.device) -> DiTModule:
    teacher = config.teacher_weight if variant != "dense" else 0.0
    module = DiTModule(dit, OptimSection(lr=lr, teacher_weight=teacher), seed=seed, init_state=state)
    convert(module.model, variant, config)
    return module.to(device)


class Trainer:
    """AdamW steps of DiTModule's flow-matching loss with optional linear warm-up, and a timestamped progress log."""

    LOG_EVERY_S = 15.0

    def __init__(self, module: DiTModule, data: Data, lr: float, seed: int, config: StudyConfig,
                 warmup: int = 0) -> None:
        self.module, self.data, self.lr, self.seed, self.config, self.warmup = module, data, lr, seed, config, warmup
        self.params = [p for p in module.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.device = self.params[0].device
        module.seed = seed

    def step(self, step: int) -> torch.Tensor:
        if self.warmup:
            for group in self.opt.param_groups:
                group["lr"] = self.lr * min(1.0, (step + 1) / self.warmup)
        batch = self.data.batch(step, self.seed, self.config.batch_size)
        with _autocast(self.device):
            loss = self.module.losses(batch, self.module.step_generator(step))["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.detach()

    def run(self, steps: int, eval_every: int, clock: Clock, label: str) -> dict:
        """``steps`` steps with a validation pass at the start, every ``eval_every`` steps and at the end.
        Returns {'val_curve', 'train_s' (without evaluations), 'eval_s', 's_per_step', 'steps'}."""
        evaluate = lambda: self.data.validation(self.config, self.module.model)  # noqa: E731
        t0 = time.monotonic()
        curve = [(0, evaluate())]
        eval_s = time.monotonic() - t0
        running, count, last_log = torch.zeros((), device=self.device), 0, time.monotonic()
        for step in range(steps):
            running += self.step(step)
            count += 1
            done = step + 1
            if done % eval_every == 0 or done == steps:
                t_eval = time.monotonic()
                curve.append((done, evaluate()))
                eval_s += time.monotonic() - t_eval
            if time.monotonic() - last_log > self.LOG_EVERY_S or done == steps:
                _sync(self.device)
                spent = time.monotonic() - t0 - eval_s
                clock.log(f"{label}: step {done}/{steps}, train loss {float(running) / count:.4f}, "
                          f"val {curve[-1][1]:.4f} at step {curve[-1][0]}, {spent / done:.3f} s/step, "
                          f"{(steps - done) * spent / done:.0f} s to go")
                running, count, last_log = torch.zeros((), device=self.device), 0, time.monotonic()
        _sync(self.device)
        train_s = time.monotonic() - t0 - eval_s
        return {"val_curve": curve, "train_s": train_s, "eval_s": eval_s, "s_per_step": train_s / max(1, steps),
                "steps": steps}


def probe(dit: DiTConfig, state: dict, variants: list[str], data: Data, config: StudyConfig,
          device: torch.device, clock: Clock, steps: int = 3) -> dict[str, StepTimes]:
    """Seconds of one training step, one no-grad forward of a batch and one validation pass, per variant, on
    throwaway copies of ``state``. The first step and forward of each variant are warm-up (Triton compiles the SLA
    kernels there)."""
    times = {}
    latents, text = data.held_out
    n = min(config.batch_size, latents.shape[0])
    for variant in variants:
        t0 = time.monotonic()
        module = _module(dit, variant, 0, state, config.finetune_lr, config, device)
        trainer = Trainer(module, data, config.finetune_lr, 0, config)
        forward = lambda: module.model(latents[:n], torch.full((n,), 500.0, device=device), text[:n])  # noqa: E731
        trainer.step(0)
        with torch.no_grad(), _autocast(device):
            forward()
        _sync(device)
        warm = time.monotonic() - t0
        t1 = time.monotonic()
        for s in range(1, steps + 1):
            trainer.step(s)
        _sync(device)
        t2 = time.monotonic()
        with torch.no_grad(), _autocast(device):
            for _ in range(steps):
                forward()
        _sync(device)
        t3 = time.monotonic()
        data.validation(config, module.model)
        # a forward of n < batch_size clips is scaled to a full batch
        times[variant] = StepTimes((t2 - t1) / steps, (t3 - t2) / steps * config.batch_size / n,
                                   time.monotonic() - t3)
        clock.log(f"probe {variant}: {times[variant].train:.3f} s/step, {times[variant].forward:.3f} s/forward, "
                  f"{times[variant].validation:.2f} s/validation (warm-up and compile {warm:.1f} s)")
        del module, trainer, forward
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return times


def fvd_scores(model: VideoDiT, data: Data, config: StudyConfig, extractors: dict[str, VideoFVD]) -> dict:
    """FVD of ``fvd_videos`` clips sampled in batches of ``batch_size`` (video i's noise does not depend on the
    batching) against the reference clips, per extractor."""
    model.eval()
    latents, text = data.held_out
    chunks = []
    with torch.no_grad(), _autocast(latents.device):
        for start in range(0, config.fvd_videos, config.batch_size):
            end = min(start + config.batch_size, config.fvd_videos)
            chunks.append(sample(model, text[start:end], tuple(latents.shape[1:]),
                                 SamplerConfig(steps=config.sample_steps), first_index=start).cpu())
    model.train()
    videos = data.dataset.codec.decode(torch.cat(chunks))
    return {f"{FVD_PREFIX}{name}": fvd(videos) for name, fvd in extractors.items()}


def fine_tune_runs(config: StudyConfig) -> list[tuple[str, str, int]]:
    """(name, variant, seed) of each fine-tune, most needed first: a run cut by a time limit keeps dense, SLA and
    the dense seed spread before the two baselines."""
    dense = [(f"dense_seed{s}", "dense", s) for s in config.dense_seeds]
    return [dense[0], ("sla", "sla", 0), *dense[1:], ("sparse_only", "sparse_only", 0),
            ("linear_only", "linear_only", 0)]


def _check_resumable(meta: dict, config: StudyConfig, dit: DiTConfig) -> None:
    """The checkpoint's model and data must be this run's: name every field that differs."""
    saved_config, saved_model = meta["config"], meta["model"]
    here = asdict(config)
    fields = ("frames", "size", "text_len", "train_samples", "val_samples", "fvd_videos")
    diffs = [f"{k}: checkpoint {saved_config[k]!r}, this run {here[k]!r}" for k in fields
             if saved_config[k] != here[k]]
    model = json.loads(json.dumps(asdict(dit)))  # tuples as lists, as the checkpoint stores them
    diffs += [f"model.{k}: checkpoint {saved_model[k]!r}, this run {model[k]!r}" for k in model
              if json.loads(json.dumps(saved_model[k])) != model[k]]
    if diffs:
        raise ValueError("the pretrained checkpoint does not match this run: " + "; ".join(diffs))


class Study:
    """One run of the study: phases, timings and the results written after every step that finishes."""

    def __init__(self, config: StudyConfig, device: torch.device, out: Path, phase: str, command: str,
                 started: float, i3d: str | None = None, fixed: frozenset[str] = frozenset()) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} is not one of {PHASES}")
        self.config, self.device, self.out, self.phase, self.fixed = config, device, out, phase, fixed
        self.clock = Clock(started, config.time_budget)
        self.dit = dit_config(config.model, **config.model_overrides)
        if i3d is not None and config.frames < I3D_MIN_FRAMES:
            raise ValueError(f"--i3d needs >= {I3D_MIN_FRAMES} frames; this study renders {config.frames}")
        self.i3d = i3d
        grid = (config.frames // self.dit.patch_size[0], config.size // self.dit.patch_size[1],
                config.size // self.dit.patch_size[2])
        tokens = math.prod(grid)
        self.results: dict = {
            "status": "running", "phase": phase, "command": command, "date": date.today().isoformat(),
            "device": "CPU" if device.type == "cpu" else None,  # named once the clips are rendered
            "torch": torch.__version__, "triton": _version("triton"),
            "sla_backend": ("Triton kernels, bf16 autocast" if device.type == "cuda"
                            else "PyTorch reference (CPU, float32)"),
            "config": asdict(config), "model": asdict(self.dit), "parameters": None, "tokens_per_clip": tokens,
            "key_blocks": math.ceil(tokens / BLOCK), "budget_s": config.time_budget,
            "schedule": default_schedule(config.workload()).as_dict(), "step_times": {}, "pretrain": None,
            "attention_before": None, "variants": {}, "timings": {}, "verdict": {}}

    def log(self, message: str) -> None:
        self.clock.log(message)

    def run(self, resume_from: Path | None = None) -> dict:
        c, timings = self.config, self.results["timings"]
        self.log(f"quality study, phase {self.phase}, on {self.device}: {self.results['tokens_per_clip']} tokens per "
                 f"clip ({self.results['key_blocks']} key blocks of {BLOCK}), sparsity {c.sparsity}")
        state, meta = (None, None) if resume_from is None else load_pretrained(resume_from)
        if meta is not None:
            _check_resumable(meta, c, self.dit)
            self.results["pretrain"] = meta["pretrain"]
            self.log(f"loaded pretrained weights from {resume_from} ({meta['pretrain']['steps']} steps)")
        self.data = Data(c, self.dit.in_channels, self.dit.text_dim, self.device)
        if self.device.type == "cuda":
            # asked only now: the render workers fork before this process touches CUDA
            self.results["device"] = torch.cuda.get_device_name(self.device)
        self.extractors = {"random": VideoFVD(RandomVideoFeatures().to(self.device), self.data.reference)}
        if self.i3d is not None:
            self.extractors["i3d"] = VideoFVD(I3DFeatures(self.i3d).to(self.device), self.data.reference)
        init = state if state is not None else DiTModule(self.dit, seed=0).model.state_dict()
        self.results["parameters"] = sum(v.numel() for v in init.values())
        timings["setup_s"] = self.clock.elapsed()
        self.log(f"data rendered on {self.results['device']}, {self.results['parameters'] / 1e6:.1f} M parameters")

        schedule = self._schedule(init)
        if meta is not None:
            schedule.pretrain_steps = meta["pretrain"]["steps"]
        self.results["schedule"] = schedule.as_dict()
        if self.phase != "finetune":
            state = self._pretrain(schedule)
            if self.phase == "pretrain":
                return self._finish("pretrained")
        t0 = time.monotonic()
        self._attention_before(state)
        self._write()
        for name, variant, seed in fine_tune_runs(c):
            self._fine_tune(name, variant, seed, state, schedule)
            self._write()
        timings["finetune_s"] = time.monotonic() - t0
        return self._finish("complete")

    def _schedule(self, init: dict) -> Schedule:
        c = self.config
        if c.time_budget is None:
            return default_schedule(c.workload())
        t0 = time.monotonic()
        pretrain, finetune = self.phase != "finetune", self.phase != "pretrain"
        runs = [v for _, v, _ in fine_tune_runs(c)] if finetune else []
        variants = [v for v in VARIANTS if v in runs or (v == "dense" and pretrain)]
        times = probe(self.dit, init, variants, self.data, c, self.device, self.clock)
        self.results["step_times"] = {k: asdict(v) for k, v in times.items()}
        self.results["timings"]["probe_s"] = time.monotonic() - t0
        schedule = plan_steps(c.workload(), times, runs, self.clock.remaining(), pretrain=pretrain,
                              finetune=finetune, fixed=self.fixed)
        planned = ([f"pretrain {schedule.pretrain_steps} steps (cap {c.pretrain_steps})"] if pretrain else []) + (
            [f"fine-tune {schedule.finetune_steps} steps per variant (cap {c.finetune_steps})"] if finetune else [])
        total, left = sum(schedule.predicted_s.values()), self.clock.remaining()
        self.log(f"plan: {', '.join(planned)}; predicted seconds {schedule.predicted_s}, total {total:.0f} of the "
                 f"{left:.0f} left" + (" -- OVER BUDGET (steps fixed on the command line)" if total > left else ""))
        return schedule

    def _pretrain(self, schedule: Schedule) -> dict:
        c = self.config
        module = DiTModule(self.dit, OptimSection(lr=c.pretrain_lr), seed=0).to(self.device)
        trainer = Trainer(module, self.data, c.pretrain_lr, 0, c, warmup=c.warmup_steps)
        info = trainer.run(schedule.pretrain_steps, schedule.pretrain_eval_every, self.clock, "pretrain")
        self.results["timings"]["pretrain_s"] = info["train_s"] + info["eval_s"]
        self.results["pretrain"] = info
        meta = {"config": asdict(c), "model": asdict(self.dit), "pretrain": info}
        paths = save_pretrained(self.out, module.model.state_dict(), meta)
        self.log(f"pretrained weights saved: {', '.join(p.name for p in paths)}")
        self._write()
        # every fine-tune starts from the weights as saved, so a split run fine-tunes the same model
        return widened(rounded(module.model.state_dict()))

    def _attention_before(self, state: dict) -> None:
        c, dit = self.config, self.dit
        model = VideoDiT(dit).to(self.device)
        model.load_state_dict(state)
        latents, text = (t[:c.attention_samples] for t in self.data.held_out)
        candidates = {v: (lambda device, v=v: fresh_core(v, dit.head_dim, c, device)) for v in VARIANTS[1:]}
        self.results["attention_before"] = candidate_errors(model, latents, text, candidates)
        summary = {v: round(sum(r["error"]) / len(r["error"]), 4)
                   for v, r in self.results["attention_before"].items()}
        self.log(f"attention error before fine-tuning (mean relative L2 over layers): {summary}")

    def _fine_tune(self, name: str, variant: str, seed: int, state: dict, schedule: Schedule) -> None:
        c = self.config
        t0 = time.monotonic()
        module = _module(self.dit, variant, seed, state, c.finetune_lr, c, self.device)
        trainer = Trainer(module, self.data, c.finetune_lr, seed, c)
        info = trainer.run(schedule.finetune_steps, schedule.finetune_eval_every, self.clock, name)
        t1 = time.monotonic()
        scores = fvd_scores(module.model, self.data, c, self.extractors)
        info["sampling_s"] = time.monotonic() - t1
        if variant != "dense":
            latents, text = (t[:c.attention_samples] for t in self.data.held_out)
            info["attention_after"] = own_errors(module.model, latents, text)
        self.results["variants"][name] = {"variant": variant, "seed": seed, **info, **scores,
                                          "val_loss": info["val_curve"][-1][1], "seconds": time.monotonic() - t0}
        self.log(f"{name} done: val loss {info['val_curve'][-1][1]:.4f}, "
                 + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    def _write(self) -> None:
        self.results["timings"]["total_s"] = self.clock.elapsed()
        self.results["verdict"] = verdict(self.results)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "quality-study.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "quality-study.md").write_text(markdown_report(self.results, "quality-study.png"))

    def _finish(self, status: str) -> dict:
        self.results["status"] = status
        self._write()
        plot(self.results, self.out / "quality-study.png")
        self.log(f"done ({status}): {self.out / 'quality-study.md'}")
        print((self.out / "quality-study.md").read_text(), flush=True)
        return self.results


def run(config: StudyConfig, device: torch.device, out: Path, *, phase: str = "all",
        resume_from: Path | None = None, i3d: str | None = None, fixed: frozenset[str] = frozenset(),
        command: str = "", started: float | None = None) -> dict:
    """Run the study (see the module docstring); returns the results also written to ``out``."""
    study = Study(config, device, out, phase, command, _STARTED if started is None else started, i3d, fixed)
    return study.run(resume_from)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu",
                        help="sizes and schedule: gpu (default, one H200 in ~7.5 min), cpu (about an hour on 2 "
                             "cores), tiny (smoke test)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (SLA uses its PyTorch reference)")
    parser.add_argument("--phase", choices=PHASES, default="all",
                        help="all (default); pretrain: pretrain and save the weights to --out; finetune: fine-tune "
                             "the weights of --resume-from")
    parser.add_argument("--resume-from", type=Path, help="folder holding a pretrain phase's pretrained-*.pt shards")
    parser.add_argument("--i3d", help="I3D TorchScript detector for the standard FVD")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"), help="output directory")
    parser.add_argument("--pretrain-steps", type=int, help="fixed pretrain steps (not planned from the budget)")
    parser.add_argument("--finetune-steps", type=int, help="fixed fine-tune steps (not planned from the budget)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds from process start to fit the run in (plans the steps from measured step "
                             "times); 0 turns the preset's budget off (the gpu preset's caps, 1600 + 5 x 400 "
                             "steps, then take ~11 min by the docstring's estimate: more than one device call)")
    parser.add_argument("--sparsity", type=float, help="block sparsity of the SLA variants (default 0.95)")
    parser.add_argument("--feature-map", choices=("softmax", "elu", "relu"), help="phi of the linear branch")
    parser.add_argument("--teacher-weight", type=float,
                        help="distillation weight towards the dense pretrained model in the non-dense fine-tunes")
    parser.add_argument("--autotune", action="store_true",
                        help="autotune the SLA kernels (compiles every launch setting: minutes; default: fixed)")
    args = parser.parse_args(argv)
    if args.phase == "finetune" and args.resume_from is None:
        parser.error("--phase finetune needs --resume-from (the folder of a pretrain phase's weights)")
    if args.phase != "finetune" and args.resume_from is not None:
        parser.error(f"--resume-from is for --phase finetune, not --phase {args.phase}")
    overrides = {k: v for k, v in (("pretrain_steps", args.pretrain_steps), ("finetune_steps", args.finetune_steps),
                                   ("sparsity", args.sparsity), ("feature_map", args.feature_map),
                                   ("teacher_weight", args.teacher_weight)) if v is not None}
    if args.time_budget is not None:
        overrides["time_budget"] = args.time_budget or None
    try:
        config = dataclasses.replace(PRESETS[args.preset], **overrides)
    except ValueError as err:
        parser.error(str(err))
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu (with --preset cpu or tiny) to run on CPU")
    if not args.autotune:
        os.environ.setdefault("SLA_DIST_AUTOTUNE", "0")
    device = torch.device("cpu" if args.cpu else "cuda")
    command = shlex.join(["python", "benchmarks/quality/quality_study.py", *(sys.argv[1:] if argv is None else argv)])
    fixed = frozenset(k for k in ("pretrain_steps", "finetune_steps") if k in overrides)
    run(config, device, args.out, phase=args.phase, resume_from=args.resume_from, i3d=args.i3d, fixed=fixed,
        command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
