"""The quality study's variants, data, training loop, step-time probe and FVD sampling."""

from __future__ import annotations

import math
import multiprocessing
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from sla_dist import SLAConfig, SparseLinearAttention, calibrate_projections
from sla_dist.eval.flow_loss import validation_loss
from sla_dist.eval.fvd import VideoFVD
from sla_dist.eval.sampling import SamplerConfig, sample
from sla_dist.kernels.reference import feature_map_ref
from sla_dist.lightning.module import DiTModule
from sla_dist.lightning.recipe import OptimSection
from sla_dist.lightning.synthetic import SyntheticVideoDataset
from sla_dist.models import DiTConfig, PatchConfig, VideoDiT, apply_sla
from study_attention import visit_attention
from study_budget import Clock, StepTimes
from study_checkpoint import Checkpoint, Moments, load_pretrained
from study_config import StudyConfig, checkpoint_scene, saved_config
from study_report import FVD_PREFIX

VARIANTS = ("dense", "sla", "sparse_only", "linear_only")


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


def synthetic_set(config: StudyConfig, channels: int, text_dim: int) -> SyntheticVideoDataset:
    """The study's clip generator: its train, held-out and reference clips are disjoint index ranges of it."""
    c = config
    total = c.train_samples + max(c.val_samples, c.fvd_videos) + c.reference_videos
    return SyntheticVideoDataset(total, channels, c.frames, c.size, c.size, text_dim, c.text_len, scene=c.scene)


def render_clips(dataset: SyntheticVideoDataset, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
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
        self.dataset = synthetic_set(c, channels, text_dim)
        held = c.train_samples + max(c.val_samples, c.fvd_videos)
        latents, text = self._render(range(len(self.dataset)), c.render_workers)
        self.train = latents[:c.train_samples].to(device), text[:c.train_samples].to(device)
        self.held_out = latents[c.train_samples:held].to(device), text[c.train_samples:held].to(device)
        self.reference = self.dataset.codec.decode(latents[held:])

    def _render(self, indices: range, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Render the clips, on ``workers`` forked processes (one thread each) when > 0: rendering is Python-bound,
        ~0.01 s a clip at 16 x 48 x 48 on one core (~16 s for the gpu preset's 1344 serially). Called before this
        process creates a CUDA context, and the workers never touch CUDA, so forking is safe."""
        if workers == 0:
            latents, text = render_clips(self.dataset, list(indices))
            return torch.from_numpy(latents), torch.from_numpy(text)
        size = math.ceil(len(indices) / (4 * workers))
        chunks = [list(indices[i:i + size]) for i in range(0, len(indices), size)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(render_clips, [self.dataset] * len(chunks), chunks))
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


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def module_for(dit: DiTConfig, variant: str, seed: int, state: dict | None, lr: float, config: StudyConfig,
               device: torch.device) -> DiTModule:
    """A DiTModule from ``state`` with the variant's attention (and the dense teacher, if the config asks)."""
    teacher = config.teacher_weight if variant != "dense" else 0.0
    module = DiTModule(dit, OptimSection(lr=lr, teacher_weight=teacher), seed=seed, init_state=state)
    convert(module.model, variant, config)
    return module.to(device)


def calibrate_sla(model: VideoDiT, latents: torch.Tensor, text: torch.Tensor, batch_size: int,
                  sequential: bool = False) -> dict:
    """Fit every SLA layer's proj_l to the model's full attention on ``latents`` / ``text`` (training clips;
    ``calibrate_projections``, one pass or ``sequential``), in batches of ``batch_size`` clips at noise levels
    spread over (0, 1) as the attention-error pass draws them. Returns the mean errors over layers and the
    per-layer report."""

    def run() -> None:
        for start in range(0, latents.shape[0], batch_size):
            batch = slice(start, start + batch_size)
            visit_attention(model, latents[batch], text[batch], lambda *site: None, seed=start)

    layers = calibrate_projections(model, run, sequential=sequential)
    mean = {key: sum(r[key] for r in layers.values()) / len(layers) for key in ("sparse_error", "calibrated_error")}
    return {"clips": latents.shape[0], **mean, "layers": layers}


def load_study_model(folder: Path, scene: str | None = None,
                     **overrides) -> tuple[Checkpoint, StudyConfig, DiTConfig, VideoDiT]:
    """The pretrained checkpoint in ``folder``, its study config (with ``overrides``), model config and the model
    with its weights loaded (on the CPU), for the tools that analyse a pretrained study model. ``scene`` (their
    --scene), if given, must be the checkpoint's."""
    checkpoint = load_pretrained(folder)
    checkpoint_scene(checkpoint.meta, scene)
    config = StudyConfig(**{**saved_config(checkpoint.meta), **overrides})
    dit = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint.meta["model"].items()})
    model = VideoDiT(dit)
    model.load_state_dict(checkpoint.state)
    return checkpoint, config, dit, model


def study_clips(config: StudyConfig, dit: DiTConfig, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``indices`` of the study's synthetic set, rendered in this process (train: from 0, held-out: from
    ``train_samples``), for tools that need a few clips rather than ``Data``'s whole sets."""
    threads = torch.get_num_threads()  # render_clips runs single-threaded (it is a worker's function)
    latents, text = render_clips(synthetic_set(config, dit.in_channels, dit.text_dim), list(indices))
    torch.set_num_threads(threads)
    return torch.from_numpy(latents), torch.from_numpy(text)


def is_projection(name: str) -> bool:
    """Whether parameter ``name`` of a VideoDiT belongs to SLA's proj_l or linear-only's output projection, the
    layers conversion adds (``proj_lr_scale`` applies to them)."""
    return ".self_attn.core.proj_l." in name or ".self_attn.core.proj." in name


class Trainer:
    """AdamW steps of DiTModule's flow-matching loss with optional linear warm-up, and a timestamped progress log.

    ``proj_lr_scale`` multiplies the lr of the projections of ``is_projection`` (a second AdamW param group, present
    only when the model has such parameters). Steps are numbered globally: the data, the noise and the warm-up of
    step ``i`` depend on ``i`` alone, so a run resumed at step ``start`` with ``load_moments`` continues one that
    stopped there."""

    LOG_EVERY_S = 15.0

    def __init__(self, module: DiTModule, data: Data, lr: float, seed: int, config: StudyConfig,
                 warmup: int = 0, proj_lr_scale: float = 1.0) -> None:
        self.module, self.data, self.lr, self.seed, self.config, self.warmup = module, data, lr, seed, config, warmup
        named = [(n, p) for n, p in module.model.named_parameters() if p.requires_grad]
        rest, projections = ([(n, p) for n, p in named if is_projection(n) == proj] for proj in (False, True))
        groups = [{"params": [p for _, p in rest], "lr": lr}]
        if projections:
            groups.append({"params": [p for _, p in projections], "lr": lr * proj_lr_scale})
        # the order of the optimizer's state_dict indices: group by group
        self.names = [n for n, _ in rest + projections]
        self.params = [p for _, p in rest + projections]
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        self.base_lrs = [group["lr"] for group in self.opt.param_groups]
        self.device = self.params[0].device
        module.seed = seed

    def moments(self) -> Moments:
        """AdamW's (exp_avg, exp_avg_sq) per parameter name (parameters that never had a gradient have none)."""
        return {n: (self.opt.state[p]["exp_avg"], self.opt.state[p]["exp_avg_sq"])
                for n, p in zip(self.names, self.params) if p in self.opt.state}

    def load_moments(self, moments: Moments, step: int) -> None:
        """Continue from ``moments`` (``moments()`` of a run that took ``step`` optimizer steps; a first moment the
        checkpoint did not store starts at zero)."""
        shapes = {n: tuple(p.shape) for n, p in zip(self.names, self.params)}
        wrong = [f"{n}: {tuple(m[1].shape)}" + (f" (parameter {shapes[n]})" if n in shapes else " (no such parameter)")
                 for n, m in moments.items() if shapes.get(n) != tuple(m[1].shape)]
        if wrong:
            raise ValueError(f"the optimizer state does not fit this model: {'; '.join(wrong[:4])}")
        index = {n: i for i, n in enumerate(self.names)}
        state = self.opt.state_dict()
        state["state"] = {index[n]: {"step": torch.tensor(float(step)), "exp_avg_sq": avg_sq,
                                     "exp_avg": torch.zeros_like(avg_sq) if avg is None else avg}
                          for n, (avg, avg_sq) in moments.items()}
        self.opt.load_state_dict(state)

    def step(self, step: int) -> torch.Tensor:
        if self.warmup:
            for group, lr in zip(self.opt.param_groups, self.base_lrs):
                group["lr"] = lr * min(1.0, (step + 1) / self.warmup)
        batch = self.data.batch(step, self.seed, self.config.batch_size)
        with _autocast(self.device):
            loss = self.module.losses(batch, self.module.step_generator(step))["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.detach()

    def run(self, steps: int, eval_every: int, clock: Clock, label: str, start: int = 0) -> dict:
        """Steps ``start`` to ``start + steps`` with a validation pass at the start, every ``eval_every`` steps and
        at the end. Returns {'val_curve' (global steps), 'train_s' (without evaluations), 'eval_s', 's_per_step',
        'steps' (of this run), 'start'}."""
        evaluate = lambda: self.data.validation(self.config, self.module.model)  # noqa: E731
        t0 = time.monotonic()
        curve = [(start, evaluate())]
        eval_s = time.monotonic() - t0
        running, count, last_log = torch.zeros((), device=self.device), 0, time.monotonic()
        for done in range(1, steps + 1):
            running += self.step(start + done - 1)
            count += 1
            if done % eval_every == 0 or done == steps:
                t_eval = time.monotonic()
                curve.append((start + done, evaluate()))
                eval_s += time.monotonic() - t_eval
            if time.monotonic() - last_log > self.LOG_EVERY_S or done == steps:
                _sync(self.device)
                spent = time.monotonic() - t0 - eval_s
                clock.log(f"{label}: step {start + done}/{start + steps}, train loss {float(running) / count:.4f}, "
                          f"val {curve[-1][1]:.4f} at step {curve[-1][0]}, {spent / done:.3f} s/step, "
                          f"{(steps - done) * spent / done:.0f} s to go")
                running, count, last_log = torch.zeros((), device=self.device), 0, time.monotonic()
        _sync(self.device)
        train_s = time.monotonic() - t0 - eval_s
        return {"val_curve": curve, "train_s": train_s, "eval_s": eval_s, "s_per_step": train_s / max(1, steps),
                "steps": steps, "start": start}


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
        module = module_for(dit, variant, 0, state, config.finetune_lr, config, device)
        trainer = Trainer(module, data, config.finetune_lr, 0, config, proj_lr_scale=config.proj_lr_scale)
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
