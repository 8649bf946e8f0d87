"""Sizes and schedule of the quality study (StudyConfig) and its presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sla_dist import SLAConfig
from sla_dist.lightning.recipe import OptimSection
from sla_dist.lightning.synthetic import SCENES
from study_budget import Workload
from study_checkpoint import ENCODINGS

BASELINES = ("sparse_only", "linear_only")
"""The fine-tunes at SLA's sparsity that SLA must beat."""

@dataclass
class StudyConfig:
    """Sizes and schedule of the study."""

    model: str = "small"
    model_overrides: dict[str, int] = field(default_factory=dict)
    """DiTConfig fields changed from the named config (e.g. a narrower model for CPU runs)."""
    scene: str = "plain"
    """Background of the synthetic clips (``sla_dist.lightning.synthetic.SCENES``): 'plain' (flat, the results up to
    2026-11-30) or 'textured' (a panning procedural texture: attention to neighbours and correspondences, as in real
    video). A pretrained checkpoint records it; later phases use the checkpoint's."""
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
    proj_lr_scale: float = 1.0
    """The fine-tune lr of SLA's proj_l and linear-only's output projection, as a multiple of ``finetune_lr``:
    proj_l starts at zero and at 1e-4 learned nothing measurable in 700 steps (2026-11-30 H200 run)."""
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
    calibrate_clips: int = 0
    """Training clips SLA's proj_l is fitted on before its fine-tune: the least-squares fit of each layer's
    O_s + O_l W^T + b to the dense model's attention (``sla_dist.calibrate_projections``). 0: proj_l starts at zero,
    as conversion leaves it."""
    attention_samples: int = 4
    """Held-out clips of the per-layer attention-error pass."""
    dense_seeds: list[int] = field(default_factory=lambda: [0, 1])
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    """Which of the sparse-only and linear-only fine-tunes run besides dense and SLA (a follow-up run with more
    steps per fine-tune may drop one)."""
    render_workers: int = 0
    """Processes rendering the synthetic clips (0: in this process)."""
    checkpoint: str = "exact"
    """Encoding of the pretrained checkpoint (study_checkpoint.py): 'exact' (float32 weights and AdamW moments: a
    resumed pretrain continues bit for bit) or 'compact' (bf16 weights, float8 second moment: what fits a device
    transfer at the gpu preset's size)."""
    time_budget: float | None = None
    """Seconds from process start the whole run should fit in: the steps are planned from measured step times
    (at most the ones above); None runs the steps above."""

    def __post_init__(self) -> None:
        if self.scene not in SCENES:
            raise ValueError(f"scene={self.scene!r} is not one of {SCENES}")
        for name in ("frames", "size", "text_len", "train_samples", "val_samples", "batch_size", "pretrain_steps",
                     "finetune_steps", "eval_every", "pretrain_evals", "draws", "sample_steps", "attention_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.fvd_videos < 2 or self.reference_videos < 2:
            raise ValueError(f"fvd_videos={self.fvd_videos} and reference_videos={self.reference_videos} must be "
                             ">= 2")
        if not 0 <= self.calibrate_clips <= self.train_samples:
            raise ValueError(f"calibrate_clips={self.calibrate_clips} must lie in [0, train_samples="
                             f"{self.train_samples}]")
        if self.warmup_steps < 0 or self.render_workers < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} and render_workers={self.render_workers} must be "
                             ">= 0")
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity} must lie in (0, 1)")
        if not self.dense_seeds:
            raise ValueError("dense_seeds=[] needs at least one seed")
        if set(self.baselines) - set(BASELINES) or len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines={self.baselines}: choose distinct entries of {list(BASELINES)}")
        if not (math.isfinite(self.proj_lr_scale) and self.proj_lr_scale > 0):
            raise ValueError(f"proj_lr_scale={self.proj_lr_scale} must be a positive finite number")
        if self.checkpoint not in ENCODINGS:
            raise ValueError(f"checkpoint={self.checkpoint!r} is not one of {ENCODINGS}")
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
                       render_workers=8, checkpoint="compact", time_budget=450.0),
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


def saved_config(meta: dict) -> dict:
    """The study config a checkpoint's ``meta`` records, with the fields added since at the value its run had."""
    return {"scene": "plain", **meta["config"]}  # written before scenes existed: the plain set


def checkpoint_scene(meta: dict, asked: str | None) -> str:
    """The scene a later phase (or analysis) of a checkpoint runs on: the checkpoint's; ``asked`` (the --scene
    given, None if none) must be that one."""
    saved = saved_config(meta)["scene"]
    if asked is not None and asked != saved:
        raise ValueError(f"--scene {asked}: the checkpoint was pretrained on scene {saved!r}, and later phases run on "
                         f"the checkpoint's scene (leave --scene out or pass --scene {saved})")
    return saved
