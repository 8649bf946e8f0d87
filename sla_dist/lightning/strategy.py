"""SLAStrategy: Lightning's DeepSpeedStrategy with sequence parallelism, on GPUs (NCCL) and on CPUs (gloo, tests).

What it adds to DeepSpeedStrategy:

* ``sequence_parallel_size`` (and its Ulysses x ring split): the SP and DP process groups are built in
  ``setup_distributed`` (``sla_dist.parallel.SequenceParallelGroups``; rank = dp_rank * sp_size + sp_rank). Unless
  the user fixes ``ulysses_degree``, the split is chosen in ``setup`` from the model's head count and the exchange
  cost model of ``sla_dist.parallel.layout`` (see ``SLAStrategy``).
* A model-parallel unit (``SequenceParallelUnit``) passed to ``deepspeed.initialize`` as ``mpu``; Lightning passes
  none. From it DeepSpeed takes the SP group and the SP x DP group, over which ZeRO partitions states and reduces
  gradients: it *sums* over SP (each SP rank holds a share of the gradient, see ``sequence.py``) and averages over DP.
  ZeRO-3's reduce-scatter averages over SP as well; ``backward`` scales the loss to make up for it
  (``sp_loss_factor``).
* ``distributed_sampler_kwargs`` over DP ranks only: all ranks of an SP group read the same samples.
* In ``setup`` (after callbacks such as SLACallback have converted the attention, before DeepSpeed wraps the model),
  every self-attention core of the module's DiTs becomes its sequence-parallel form; the module then runs each batch
  with its token sequence sharded within the SP group.
* Resuming loads every checkpoint file with ``torch.load(weights_only=True)`` (DeepSpeed's own loads included).
* CPU support: the stock strategy refuses non-CUDA accelerators; here the CUDA-only checks are skipped, gloo is the
  backend, and DeepSpeed's comm layer is pointed at the torch.distributed group without building its shared-memory
  op (a ~60 s JIT compile on first use that gloo never needs).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from lightning_utilities.core.rank_zero import rank_zero_info
from typing_extensions import override

from ..attention import SparseLinearAttention
from ..config import check_int
from ..models import VideoDiT
from ..models.layers import SelfAttention
from ..parallel import SequenceParallelConfig, SequenceParallelGroups
from ..parallel.groups import ensure_deepspeed_comm, subgroup
from ..parallel.layout import (AttentionShape, LayoutChoice, SPCostModel, check_fraction, choose_layout,
                               ulysses_candidates)
from .checkpoint import weights_only_loads
from .sequence import enable_sequence_parallel


class SequenceParallelUnit:
    """The ``mpu`` DeepSpeed queries for its process groups: no tensor / pipeline parallelism (a model-parallel
    group of one rank), sequence parallelism over ``groups.sp_group``, and ZeRO over all SP x DP ranks."""

    def __init__(self, groups: SequenceParallelGroups) -> None:
        self.groups = groups
        world = groups.world_size
        # Every rank must enter every group creation; each rank keeps its own singleton group.
        self._self_group = subgroup([[r] for r in range(world)])

    def get_model_parallel_group(self):
        return self._self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_group(self):
        return dist.group.WORLD

    def get_data_parallel_world_size(self) -> int:
        return self.groups.world_size

    def get_data_parallel_rank(self) -> int:
        return self.groups.rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.groups.world_size))

    def get_sequence_parallel_group(self):
        return self.groups.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.groups.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.groups.sp_rank

    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.groups.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.groups.rank


class SLAStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO (stage 0-3, optional CPU offload) with sequence parallelism for SLA video DiTs.

    Args:
        sequence_parallel_size: ranks that share one sample's token sequence; the world size must divide by it.
        ulysses_degree: ranks of the SP group exchanging heads by all-to-all; the remaining
            ``sequence_parallel_size // ulysses_degree`` split is SLA-aware context parallel (ring). An integer is
            used as given. None (default) chooses it in ``setup``, from the model, by the rule below.
        context_fetch_fraction: fraction of the key blocks context parallel fetches on this data at the training
            topk (measure it with ``benchmarks/bench_sequence_parallel.py --locality``; during SLACallback's anneal
            from topk 1 it is near 1); None: unknown, taken as 1 (the worst case).
        sequence_length: tokens per sample, for the cost model; needed with ``context_fetch_fraction``.
        sp_cost: the cost model's constants (default: H200 NVLink, fitted; see ``sla_dist.parallel.layout``).
        overlap_chunks: chunks of each rank's heads that pipeline the fused Ulysses exchange with the attention
            (``SequenceParallelConfig.overlap_chunks``; 1: no overlap).
        **kwargs: DeepSpeedStrategy's (``stage``, ``offload_optimizer``, ``offload_parameters``, ``config``,
            ``timeout``: the default process group's collective timeout, which the SP / DP groups take, ...).

    The automatic split (``ulysses_degree=None``). Candidates are the Ulysses degrees U dividing both
    ``sequence_parallel_size`` and every DiT's head count (the ring takes the rest); if any self-attention layer
    is not SLA (dense layers run under Ulysses only), U must be the whole SP size, and heads that do not divide over
    it are an error naming both. With one candidate it is taken. Without ``sequence_length`` the largest U is taken
    (pure Ulysses whenever the heads divide: context parallel has only been measured slower on i.i.d. inputs).
    With it, ``layout.choose_layout`` predicts each split's per-rank exchange time (Ulysses: 8 all-to-alls of the
    [B, L/P, H, D] shard; ring: the fetched fraction f of the k|v blocks, its collectives and its per-block-pair
    work) and takes the least, ties to the larger U; f unknown counts as 1, at which Ulysses is never predicted
    slower, so only a measured low f turns the choice to context parallel.
    """

    strategy_name = "sla_deepspeed"

    def __init__(self, sequence_parallel_size: int = 1, ulysses_degree: Optional[int] = None,
                 context_fetch_fraction: Optional[float] = None, sequence_length: Optional[int] = None,
                 sp_cost: Optional[SPCostModel] = None, overlap_chunks: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # None: pure Ulysses until ``setup`` knows the model and settles the split (the SP and DP groups, which
        # setup_distributed builds and DeepSpeed's mpu uses, are the same for every split)
        self.sp_config = SequenceParallelConfig(sequence_parallel_size, ulysses_degree, overlap_chunks)
        self.auto_layout = ulysses_degree is None
        if context_fetch_fraction is not None:
            check_fraction(context_fetch_fraction)
            if sequence_length is None:
                raise ValueError(f"context_fetch_fraction={context_fetch_fraction} needs sequence_length (tokens "
                                 "per sample) for the cost model that weighs it")
        if sequence_length is not None:
            check_int("sequence_length", sequence_length, 1)
        self.context_fetch_fraction = context_fetch_fraction
        self.sequence_length = sequence_length
        self.sp_cost = sp_cost or SPCostModel()
        self.layout_choice: LayoutChoice | None = None
        self.sp_groups: SequenceParallelGroups | None = None
        self.mpu: SequenceParallelUnit | None = None
        self._loss_factor = 1

    @property
    def _on_cuda(self) -> bool:
        return self.root_device.type == "cuda"

    @override
    def setup_environment(self) -> None:
        if self._on_cuda:
            super().setup_environment()
        else:
            # DeepSpeedStrategy.setup_environment only adds a CUDA-accelerator check
            DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        if self._on_cuda:
            devices = [d.index for d in self.parallel_devices or []]
            if devices != list(range(len(devices))):
                raise RuntimeError(f"device indices {devices} must be 0..n-1; select GPUs with CUDA_VISIBLE_DEVICES")
        reset_seed()
        self.set_world_ranks()
        self._set_node_environment_variables()
        self._process_group_backend = self._get_process_group_backend()
        if not dist.is_initialized():
            _init_dist_connection(self.cluster_environment, self._process_group_backend, timeout=self._timeout)
        ensure_deepspeed_comm()
        # the SP / DP groups (and the mpu's) take the default group's timeout: a rank that raises while its peers
        # wait in a collective on them ends the job after the strategy's timeout, not after torch's default
        self.sp_groups = SequenceParallelGroups.build(self.sp_config)
        self.mpu = SequenceParallelUnit(self.sp_groups)
        rank_zero_info(f"SLAStrategy: world {self.world_size} = dp {self.sp_groups.dp_size} x sp "
                       f"{self.sp_groups.sp_size}, backend {self._process_group_backend}")

    @override
    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or ("nccl" if self._on_cuda else "gloo")

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        groups = self.sp_groups
        if groups is None:
            return {"num_replicas": self.world_size // self.sp_config.sp_size,
                    "rank": self.global_rank // self.sp_config.sp_size}
        return {"num_replicas": groups.dp_size, "rank": groups.dp_rank}

    @override
    def setup(self, trainer) -> None:
        if self.sp_groups is not None and self.sp_groups.sp_size > 1:
            self._settle_layout(self.lightning_module)
            enable_module_sequence_parallel(self.lightning_module, self.sp_groups)
        self._init_config_if_needed()
        self._loss_factor = sp_loss_factor(self.config, self.sp_config.sp_size)
        super().setup(trainer)

    def _settle_layout(self, module: torch.nn.Module) -> None:
        """Choose the Ulysses x ring split for ``module`` (automatic mode) and rebuild the groups if it changed.
        Every rank computes the same choice from the same model and settings, so all enter the group creation."""
        sp = self.sp_config.sp_size
        heads, head_dims, ring_allowed = attention_facts(module)
        if self.auto_layout and heads:  # no DiT: enable_module_sequence_parallel names the problem
            self.layout_choice = choose_module_layout(heads, head_dims, ring_allowed, sp,
                                                      self.context_fetch_fraction, self.sequence_length, self.sp_cost)
            if self.layout_choice.ulysses_degree != self.sp_groups.ulysses_degree:
                self.sp_config = dataclasses.replace(self.sp_config,
                                                     ulysses_degree=self.layout_choice.ulysses_degree)
                self.sp_groups = SequenceParallelGroups.build(self.sp_config)
                self.mpu.groups = self.sp_groups
        why = f": {self.layout_choice.reason}" if self.layout_choice is not None else " (given)"
        rank_zero_info(f"SLAStrategy: sp {sp} = ulysses {self.sp_groups.ulysses_degree} x ring "
                       f"{self.sp_groups.ring_degree}{why}")

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        """DeepSpeedStrategy's backward of ``closure_loss`` times ``sp_loss_factor`` (the unscaled loss is returned)."""
        super().backward(closure_loss * self._loss_factor, optimizer, *args, **kwargs)
        return closure_loss

    @override
    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        """DeepSpeedStrategy's, plus the ``mpu`` that tells ZeRO about the sequence-parallel groups."""
        import deepspeed

        if self.zero_stage_3:
            register_parameters_read_outside_forward(model)
        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.root_device.index if self._on_cuda else -1), config=self.config,
            model=model,
            model_parameters=model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
            dist_init_required=False, mpu=self.mpu)
        return engine, ds_optimizer

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """DeepSpeedStrategy's, with every pickle DeepSpeed reads (it asks for ``weights_only=False``) loaded as
        weights only: a checkpoint cannot run code on resume."""
        with weights_only_loads():  # fspath: a RankZeroCheckpoint (shared_resume.py) becomes the path it names
            return super().load_checkpoint(os.fspath(checkpoint_path), weights_only)

    @override
    def teardown(self) -> None:
        super().teardown()
        self.sp_groups = None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="SLA DeepSpeed (ZeRO-2) with sequence "
                                   "parallelism", stage=2)
        for stage in (1, 2, 3):
            strategy_registry.register(f"sla_deepspeed_stage_{stage}", cls,
                                       description=f"SLA DeepSpeed ZeRO-{stage} with sequence parallelism",
                                       stage=stage)
        strategy_registry.register("sla_deepspeed_stage_2_offload", cls, stage=2, offload_optimizer=True,
                                   description="SLA DeepSpeed ZeRO-2 with CPU optimizer offload")
        strategy_registry.register("sla_deepspeed_stage_3_offload", cls, stage=3, offload_optimizer=True,
                                   offload_parameters=True,
                                   description="SLA DeepSpeed ZeRO-3 with CPU optimizer and parameter offload")


SLAStrategy.register_strategies(StrategyRegistry)


def register_parameters_read_outside_forward(root: torch.nn.Module) -> None:
    """Register, as ZeRO-3 external parameters of ``root`` (the module DeepSpeed wraps, whose forward runs the
    training step), every parameter that a submodule reads outside its own forward
    (``parameters_read_outside_forward``, e.g. ``VideoDiT``'s): DeepSpeed then gathers them in ``root``'s forward in
    every step alike, instead of registering them on the first access that finds them partitioned, which differed
    between a fresh and a resumed run and broke ZeRO-3's recorded parameter trace after a resume."""
    import deepspeed

    for module in root.modules():
        for param in getattr(module, "parameters_read_outside_forward", tuple)():
            deepspeed.zero.register_external_parameter(root, param)


def enable_module_sequence_parallel(module: torch.nn.Module, groups: SequenceParallelGroups) -> None:
    """Make every VideoDiT (its attention cores; DiTModule shards the sequence itself) and every diffusers
    WanTransformer3DModel (its whole forward, by hooks: the user's module runs unchanged) in ``module``
    sequence-parallel over ``groups``."""
    dits = [m for m in module.modules() if isinstance(m, VideoDiT)]
    wans = []
    if "diffusers" in sys.modules:  # only a user who built a diffusers model has imported it
        from diffusers import WanTransformer3DModel

        from .sequence_diffusers import enable_wan_sequence_parallel

        wans = [m for m in module.modules() if isinstance(m, WanTransformer3DModel)]
    if not dits and not wans:
        raise ValueError(f"sequence_parallel_size={groups.sp_size} needs a LightningModule holding a VideoDiT or a "
                         f"diffusers WanTransformer3DModel; {type(module).__name__} holds neither")
    for dit in dits:
        enable_sequence_parallel(dit, groups)
    for wan in wans:
        enable_wan_sequence_parallel(wan, groups)


def attention_facts(module: torch.nn.Module) -> tuple[list[int], list[int], bool]:
    """(head counts, head dims, whether every self-attention layer is SLA) of the DiTs in ``module``: what the
    sequence-parallel split depends on."""
    heads, dims, all_sla = [], [], True
    for m in module.modules():
        if isinstance(m, VideoDiT):
            heads.append(m.config.num_heads)
            dims.append(m.config.head_dim)
            all_sla &= all(isinstance(s.core, SparseLinearAttention) for s in m.modules()
                           if isinstance(s, SelfAttention))
    if "diffusers" in sys.modules:
        from diffusers import WanTransformer3DModel

        for m in module.modules():
            if isinstance(m, WanTransformer3DModel):
                heads.append(m.config.num_attention_heads)
                dims.append(m.config.attention_head_dim)
                all_sla &= all(getattr(b.attn1, "sla", None) is not None for b in m.blocks)
    return heads, dims, all_sla


def choose_module_layout(heads: list[int], head_dims: list[int], ring_allowed: bool, sp_size: int,
                         fetch_fraction: float | None, sequence_length: int | None,
                         cost: SPCostModel) -> LayoutChoice:
    """SLAStrategy's automatic Ulysses x ring split for DiTs of these head counts and dims (the rule is in its
    docstring)."""
    shape = AttentionShape(math.gcd(*heads), sequence_length or 1, max(head_dims))
    if sequence_length is None:
        largest = ulysses_candidates(sp_size, shape.heads, ring_allowed)[0]
        return LayoutChoice(largest, sp_size // largest, {}, f"the largest ulysses_degree dividing {shape.heads} "
                            "heads (no sequence_length for the cost model)")
    return choose_layout(sp_size, shape, fetch_fraction, ring_allowed, cost)


def sp_loss_factor(config: dict, sp_size: int) -> int:
    """What each rank's loss is multiplied by before backward so that ZeRO ends up summing the SP gradient shares.

    DeepSpeed (0.19) reduces gradients over the SP x DP group and divides by ``world / sp_size`` (sum over SP,
    average over DP) in ZeRO-1/2 and in ZeRO-3's all-reduce path, but ZeRO-3's default reduce-scatter path
    (``reduce_and_partition`` -> ``reduce_scatter_coalesced``) divides by the whole world: it averages over SP too,
    and every gradient would come out ``sp_size`` times too small. Adam hides a constant factor, gradient clipping
    and the norm logging do not (a run clipped where the reference did not, and drifted). With
    ``reduce_scatter: false`` ZeRO-3 picks the path per bucket (all-reduce up to ``reduce_bucket_size``, the
    averaging reduce-scatter beyond), so no single factor is right: that setting is refused under SP.
    """
    zero = config.get("zero_optimization", {})
    if sp_size == 1 or zero.get("stage", 0) != 3:
        return 1
    if not zero.get("reduce_scatter", True):
        raise ValueError("ZeRO-3 with sequence parallelism needs zero_optimization.reduce_scatter=true: with false, "
                         "DeepSpeed sums gradients over the SP group for some buckets and averages for others")
    return sp_size


def zero_config(stage: int, offload_optimizer: bool, offload_parameters: bool, grad_clip: float,
                micro_batch: int, overlap_comm: bool = False, reduce_bucket_size: int | None = None) -> dict:
    """A DeepSpeed config for ``stage`` (0 disables ZeRO); the client optimizer (AdamW) is used as is.
    ``overlap_comm``: the gradient reduction runs during the backward (``ParallelSection.overlap_comm``);
    ``reduce_bucket_size``: its bucket in gradient elements (None: DeepSpeed's default)."""
    zero: dict = {"stage": stage, "overlap_comm": overlap_comm, "contiguous_gradients": True}
    if reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = int(reduce_bucket_size)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True, "gradient_clipping": grad_clip,
            "train_micro_batch_size_per_gpu": micro_batch}
