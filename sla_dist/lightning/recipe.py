"""The training recipe: a typed, validated schema for the omegaconf YAML files in ``recipes/``.

A recipe is loaded as ``OmegaConf.structured(Recipe)`` merged with the YAML file and then with ``key=value``
command-line overrides, so a misspelt key fails at load time with the key's full path, and every value is checked by
the ``__post_init__`` of its section (values named in the message) when the merged tree becomes dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import SLAConfig, is_int
from ..data.preprocess import PreprocessSection
from ..models import DiTConfig, dit_config
from ..models.compile import check_compile_mode
from ..safe_yaml import load_yaml, refuse_resolvers

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
STRATEGIES = ("sla_deepspeed", "auto")
DATA_KINDS = ("synthetic", "shards")
DEFAULT_TIMEOUT_S = 1800
"""Collective timeout of a run (torch's and Lightning's default: 30 minutes)."""


def _positive(section: object, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        if not is_int(value) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{type(section).__name__}.{name}={value!r} must be an integer {bound}")


def _choice(section: object, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in choices:
        raise ValueError(f"{type(section).__name__}.{name}={value!r} is not one of {choices}")


@dataclass
class ModelSection:
    """Which DiT to train: a named shape from ``sla_dist.models.DIT_CONFIGS`` with a few common overrides."""

    name: str = "tiny"
    """Named DiT shape: 'tiny', 'small', 'wan2.1-1.3b' or 'wan2.1-14b'."""

    num_layers: Optional[int] = None
    """Override the shape's number of blocks (None keeps it); handy for short benchmarks of a big shape."""

    tile_size: Optional[List[int]] = None
    """3D token tiling (t, h, w) so that one SLA block is a compact video cube; None keeps raster order."""

    checkpoint_blocks: bool = False
    """Recompute block activations in backward (activation checkpointing)."""

    init_from: Optional[str] = None
    """A safetensors file of weights (e.g. from ``sla-dist export``) loaded before SLA is applied; None: random."""

    compile: bool = False
    """torch.compile each DiT block (torchtitan's per-block compile), in training and in the samples drawn from the
    trained model: fuses the modulation, norms, RoPE and residual adds around attention. The first steps pay the
    compilation. It leaves checkpoints unchanged, so a resumed run may turn it on or off."""

    compile_mode: str = "default"
    """torch.compile mode of ``compile``: 'default' or 'max-autotune-no-cudagraphs' (autotuned kernels, a longer
    compile). 'reduce-overhead' and 'max-autotune' are refused: their CUDA graphs reuse gradient buffers that
    DeepSpeed accumulates into across micro-batches."""

    def __post_init__(self) -> None:
        check_compile_mode(self.compile_mode, "model.compile_mode")
        self.build()

    def build(self) -> DiTConfig:
        overrides: dict = {"checkpoint_blocks": self.checkpoint_blocks}
        if self.num_layers is not None:
            overrides["num_layers"] = self.num_layers
        if self.tile_size is not None:
            overrides["tile_size"] = tuple(self.tile_size)
        return dit_config(self.name, **overrides)


@dataclass
class SparsitySection:
    """SLACallback: which layers become SLA and how the sparsity is scheduled and logged."""

    enabled: bool = True
    """Convert self-attention to SLA at all (False trains the dense model, e.g. as a baseline)."""

    skip_first: int = 0
    """Leave the first n self-attention layers dense."""

    dense_steps: int = 0
    """Optimizer steps of full attention first (topk 1, negligible 0: exactly dense) so proj_l and the rest adapt."""

    anneal_steps: int = 0
    """Steps over which topk goes linearly from 1 to ``sla.topk`` after the dense warm-up (0: jump at once)."""

    error_every: int = 0
    """Every this many steps log each SLA layer's relative L1 error vs dense attention on the live batch, measured on
    the first logged step at or after each multiple (0: off)."""

    calibrate: bool = False
    """Start the linear branch from its least-squares fit: on step ``dense_steps + anneal_steps`` (the first at the
    target topk) each SLA layer also computes dense attention on that step's own inputs, and at the step's end proj_l
    is set to the fit of the sparse + linear output to it, over all ranks' rows (``sla/calibration/error_before`` /
    ``error_after`` are logged). Once per run; not with ZeRO-3 or ring context parallel."""

    def __post_init__(self) -> None:
        _positive(self, "skip_first", "dense_steps", "anneal_steps", "error_every", allow_zero=True)


@dataclass
class DataSection:
    """Training data: the built-in synthetic text-to-video set or precomputed latent shards."""

    kind: str = "synthetic"
    """'synthetic' (procedural moving shapes, no downloads) or 'shards' (``sla-dist preprocess`` output)."""

    shards_dir: Optional[str] = None
    """Directory of latent shards and their index, for kind 'shards'."""

    num_samples: int = 512
    """Size of the synthetic set (its samples are rendered on the fly from their index)."""

    frames: int = 4
    """Latent frames T of a synthetic sample."""

    height: int = 16
    """Latent height H of a synthetic sample (must divide by the patch size)."""

    width: int = 16
    """Latent width W of a synthetic sample."""

    text_len: int = 16
    """Tokens of a synthetic caption's embedding (padded / cut)."""

    batch_size: int = 4
    """Samples per data-parallel rank per step (all ranks of one SP group read the same samples)."""

    val_samples: int = 16
    """Held-out synthetic samples (indices past ``num_samples``, never trained on) of the validation loss run every
    ``trainer.val_every`` steps."""

    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        _choice(self, "kind", DATA_KINDS)
        _positive(self, "num_samples", "frames", "height", "width", "text_len", "batch_size", "val_samples")
        _positive(self, "num_workers", allow_zero=True)
        if self.kind == "shards" and not self.shards_dir:
            raise ValueError("data.kind='shards' needs data.shards_dir")


@dataclass
class OptimSection:
    """Objective and optimizer of DiTModule."""

    lr: float = 1e-4
    """AdamW learning rate after warm-up."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""

    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""

    ema_decay: float = 0.0
    """Exponential moving average of the weights with this decay (0: no EMA). Each rank keeps a full copy."""

    teacher_weight: float = 0.0
    """Weight of the distillation term: MSE to a frozen dense copy of the initial model (0: no teacher)."""

    flow_shift: float = 1.0
    """Timestep shift of the flow-matching schedule (Wan uses 3-5 at high resolution; 1 is no shift)."""

    caption_dropout: float = 0.0
    """Probability that a sample's caption embedding is replaced by the null (all-zero) embedding, the
    unconditional input of classifier-free guidance (the sampler's ``null_text``); without it guidance > 1 has no
    unconditional prediction to push away from. 0.1 is usual for text-to-video fine-tunes."""

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay", "teacher_weight", "flow_shift", "caption_dropout"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"optim.{name}={getattr(self, name)} must be a finite number")
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay={self.ema_decay} must lie in [0, 1)")
        for name in ("weight_decay", "grad_clip", "teacher_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 0")
        if not self.flow_shift > 0:
            raise ValueError(f"optim.flow_shift={self.flow_shift} must be positive")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"optim.caption_dropout={self.caption_dropout} must lie in [0, 1]")
        _positive(self, "warmup_steps", allow_zero=True)


@dataclass
class ParallelSection:
    """Distribution: SLAStrategy (DeepSpeed ZeRO with sequence parallelism) or plain Lightning."""

    strategy: str = "sla_deepspeed"
    """'sla_deepspeed' (SLAStrategy) or 'auto' (Lightning's default for the devices; no SP, no ZeRO)."""

    sp_size: int = 1
    """Ranks sharing one sample's token sequence; the world size must be a multiple of it."""

    ulysses_degree: Optional[int] = None
    """Ranks of an SP group doing Ulysses all-to-all; the rest is SLA-aware context parallel (ring). None: chosen by
    SLAStrategy from the model's heads (the largest degree dividing them, so all of SP whenever it can)."""

    overlap_chunks: int = 1
    """Chunks of each rank's heads that pipeline the fused Ulysses exchange with the attention (eager only; under
    model.compile the exchange is traced whole): chunk c + 1's q, k, v travel while chunk c attends. 1: no
    overlap. It must divide the heads per Ulysses rank; the first forward names the numbers otherwise."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""

    overlap_comm: bool = False
    """Run ZeRO's gradient reduction (stages 1-3) on a side stream during the backward, in buckets, instead of after
    it (DeepSpeed's ``zero_optimization.overlap_comm``): hides the reduce-scatter / all-reduce (40 ms per step of
    the 1.3B recipe at SP 2 on 2 H200s, fully exposed, results/2026-11-30-h200x2-train-step-profile.md) for the
    buckets' extra memory. Off by default until measured on GPUs."""

    reduce_bucket_size: Optional[int] = None
    """Gradient elements per bucket of ZeRO's reduction (DeepSpeed's ``zero_optimization.reduce_bucket_size``);
    None: DeepSpeed's default, 5e8. With ``overlap_comm`` a bucket is reduced once it fills during the backward, so
    smaller buckets start earlier: the 1.3B recipe's ~1.3e9 gradients fill fewer than three default buckets, and the
    last one's reduction waits for the end of the backward. Each bucket is one collective more per step."""

    offload_optimizer: bool = False
    """Keep optimizer states on the CPU (ZeRO-Offload)."""

    offload_parameters: bool = False
    """Keep parameters on the CPU (ZeRO-3 only)."""

    timeout_s: int = DEFAULT_TIMEOUT_S
    """Seconds a collective waits for its peers before the job fails: SLAStrategy's process-group timeout, which
    every SP / DP group takes. A rank that hangs, or dies where the launcher does not stop its peers, ends the job
    after this long at most. Keep it above the slowest step (first-step compilation, a checkpoint save)."""

    def __post_init__(self) -> None:
        _choice(self, "strategy", STRATEGIES)
        _positive(self, "sp_size", "timeout_s", "overlap_chunks")
        if self.ulysses_degree is not None and (self.ulysses_degree < 1 or self.sp_size % self.ulysses_degree):
            raise ValueError(f"parallel.ulysses_degree={self.ulysses_degree} must divide sp_size={self.sp_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.reduce_bucket_size is not None and self.reduce_bucket_size < 1:
            raise ValueError(f"parallel.reduce_bucket_size={self.reduce_bucket_size} must be a positive number of "
                             "gradient elements (or null for DeepSpeed's default)")
        if self.reduce_bucket_size is not None and self.zero_stage == 0:
            raise ValueError("parallel.reduce_bucket_size sizes ZeRO's gradient reduction: it needs zero_stage 1, 2 "
                             "or 3, not 0")
        if self.overlap_comm and self.zero_stage == 0:
            raise ValueError("parallel.overlap_comm overlaps ZeRO's gradient reduction: it needs zero_stage 1, 2 or "
                             "3, not 0")
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError(f"parallel.offload_parameters needs zero_stage=3, not {self.zero_stage}")
        if self.strategy == "auto" and self.sp_size != 1:
            raise ValueError(f"parallel.sp_size={self.sp_size} needs strategy='sla_deepspeed'")
        if self.strategy == "auto" and self.timeout_s != DEFAULT_TIMEOUT_S:
            raise ValueError(f"parallel.timeout_s={self.timeout_s} needs strategy='sla_deepspeed' (Lightning's 'auto' "
                             f"strategies keep their {DEFAULT_TIMEOUT_S} s)")


@dataclass
class TrainerSection:
    """Lightning Trainer settings."""

    max_steps: int = 100
    """Optimizer steps to train."""

    accelerator: str = "auto"
    """'cpu', 'gpu' / 'cuda' or 'auto'."""

    devices: int = 1
    """Processes (GPUs) per node; under torchrun / deepspeed / SLURM the launcher's count must match."""

    num_nodes: int = 1
    """Nodes."""

    precision: str = "32-true"
    """Lightning precision: '32-true', 'bf16-mixed', 'bf16-true' or '16-mixed'."""

    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""

    log_every_n_steps: int = 10
    """Logging interval (TensorBoard when installed, and CSV): rows at steps n-1, 2n-1, ..., each with its own
    step's values (SLA sparsity is measured on those steps)."""

    checkpoint_every: int = 50
    """Save the 'last' checkpoint every this many steps (and at the end)."""

    val_every: int = 0
    """Every this many optimizer steps log ``val/flow``, the flow-matching loss on held-out samples with fixed noise
    (synthetic data only; 0: never)."""

    progress_bar: bool = True
    """Show Lightning's progress bar."""

    def __post_init__(self) -> None:
        _positive(self, "max_steps", "devices", "num_nodes", "accumulate_grad_batches", "log_every_n_steps",
                  "checkpoint_every")
        _positive(self, "val_every", allow_zero=True)
        _choice(self, "accelerator", ACCELERATORS)
        _choice(self, "precision", PRECISIONS)


@dataclass
class SampleSection:
    """Sample videos written at the end of training, and optionally at an interval (flow-matching Euler ODE)."""

    enabled: bool = True
    """Write a sample at the end of fit."""

    steps: int = 20
    """Euler steps of the ODE."""

    num_videos: int = 2
    """Videos in the sample grid (captions of the first validation samples)."""

    every: int = 0
    """Also sample every N optimizer steps during training (synthetic data): ``samples/step{N}.gif`` and a filmstrip
    image in TensorBoard. 0: only at the end. Each costs ``steps`` DiT forwards on every rank."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "num_videos")
        _positive(self, "every", allow_zero=True)


@dataclass
class Recipe:
    """A whole training run. Every artefact goes under ``output_dir``: checkpoints/, logs/, samples/, recipe.yaml."""

    output_dir: str = "runs/default"
    """Where checkpoints, logs and samples of this run go (resuming picks up ``checkpoints/last.ckpt`` here)."""

    seed: int = 0
    """Seed of model init, data order and the per-step noise."""

    model: ModelSection = field(default_factory=ModelSection)
    sla: SLAConfig = field(default_factory=SLAConfig)
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    sample: SampleSection = field(default_factory=SampleSection)
    preprocess: Optional[PreprocessSection] = None
    """Options of ``sla-dist preprocess --recipe`` (PreprocessConfig's fields), unused by training: one file can
    describe both the data preparation and the run."""

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be a non-empty path")
        world = self.trainer.devices * self.trainer.num_nodes
        if self.parallel.strategy == "sla_deepspeed" and world % self.parallel.sp_size:
            raise ValueError(f"devices x num_nodes = {world} is not a multiple of parallel.sp_size="
                             f"{self.parallel.sp_size}")
        if self.trainer.val_every and self.data.kind != "synthetic":
            raise ValueError(f"trainer.val_every={self.trainer.val_every} needs held-out data, which data.kind="
                             f"{self.data.kind!r} does not have: set trainer.val_every=0")
        if self.model.compile and self.parallel.strategy == "sla_deepspeed" and self.parallel.zero_stage == 3:
            raise ValueError("model.compile=true with parallel.zero_stage=3 is not supported: ZeRO-3 gathers each "
                             "parameter in module hooks around every submodule, which a compiled block would "
                             "trace; use zero_stage 0-2 or model.compile=false")
        if self.sparsity.calibrate and self.parallel.strategy == "sla_deepspeed" and self.parallel.zero_stage == 3:
            raise ValueError("sparsity.calibrate=true with parallel.zero_stage=3 is not supported: ZeRO-3 partitions "
                             "proj_l, which calibration sets whole; use zero_stage 0-2 or sparsity.calibrate=false")
        heads = self.model.build().num_heads
        ulysses = self.parallel.ulysses_degree
        if ulysses is not None and heads % ulysses:
            raise ValueError(f"model {self.model.name!r} has {heads} heads, which do not divide over "
                             f"ulysses_degree={ulysses}; set parallel.ulysses_degree to a divisor")
        if self.sparsity.calibrate and ulysses is not None and ulysses < self.parallel.sp_size:
            raise ValueError(f"sparsity.calibrate=true with parallel.ulysses_degree={ulysses} < sp_size="
                             f"{self.parallel.sp_size} is not supported: context parallel (ring) ranks never run an "
                             f"attention layer on a whole sequence; use ulysses_degree=sp_size or "
                             f"sparsity.calibrate=false")

    @property
    def dit(self) -> DiTConfig:
        return self.model.build()


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The schema defaults, merged with the YAML at ``path`` (if any) and ``key=value`` overrides, validated.

    Raises ValueError naming the offending key or value (unknown keys, wrong types, out-of-range or non-finite
    values, YAML syntax, resolvers such as ``${oc.env:...}``); FileNotFoundError for a missing file."""
    schema = OmegaConf.structured(Recipe)
    try:
        layers = [schema]
        if path is not None:
            layers.append(load_yaml(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides {bad} are not key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        refuse_resolvers(layers[-1], "override")
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)  # runs every __post_init__
    except OmegaConfBaseException as exc:
        # omegaconf's message: one line, then the key and its types on more lines
        first, key = str(exc).splitlines()[0], getattr(exc, "full_key", None)
        where = f" (at {key})" if key and key not in first else ""
        raise ValueError(f"bad recipe {str(path) if path else '<defaults>'}: {first}{where}") from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written next to the run's outputs, so a run records what it trained)."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(recipe)))
