"""SLAStrategy: Lightning's DeepSpeedStrategy with sequence parallelism, on GPUs (NCCL) and on CPUs (gloo, tests).

What it adds to DeepSpeedStrategy:

* ``sequence_parallel_size`` (and its Ulysses x ring split): the SP and DP process groups are built in
  ``setup_distributed`` (``sla_dist.parallel.SequenceParallelGroups``; rank = dp_rank * sp_size + sp_rank).
* A model-parallel unit (``SequenceParallelUnit``) passed to ``deepspeed.initialize`` as ``mpu``; Lightning passes
  none. From it DeepSpeed takes the SP group and the SP x DP group, over which ZeRO partitions states and reduces
  gradients: it *sums* over SP (each SP rank holds a share of the gradient, see ``sequence.py``) and averages over DP.
* ``distributed_sampler_kwargs`` over DP ranks only: all ranks of an SP group read the same samples.
* In ``setup`` (after callbacks such as SLACallback have converted the attention, before DeepSpeed wraps the model),
  every self-attention core of the module's DiTs becomes its sequence-parallel form; the module then runs each batch
  with its token sequence sharded within the SP group.
* CPU support: the stock strategy refuses non-CUDA accelerators; here the CUDA-only checks are skipped, gloo is the
  backend, and DeepSpeed's comm layer is pointed at the torch.distributed group without building its shared-memory
  op (a ~60 s JIT compile on first use that gloo never needs).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from lightning_utilities.core.rank_zero import rank_zero_info
from typing_extensions import override

from ..attention import SparseLinearAttention
from ..models import VideoDiT
from ..parallel import SequenceParallelConfig, SequenceParallelGroups
from ..parallel.groups import ensure_deepspeed_comm
from .sequence import enable_sequence_parallel


class SequenceParallelUnit:
    """The ``mpu`` DeepSpeed queries for its process groups: no tensor / pipeline parallelism (a model-parallel
    group of one rank), sequence parallelism over ``groups.sp_group``, and ZeRO over all SP x DP ranks."""

    def __init__(self, groups: SequenceParallelGroups) -> None:
        self.groups = groups
        world = groups.world_size
        # Every rank must enter every group creation; each rank keeps its own singleton group.
        self._self_group = dist.new_subgroups_by_enumeration([[r] for r in range(world)])[0]

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
        ulysses_degree: ranks of the SP group exchanging heads by all-to-all (None: all); the remaining
            ``sequence_parallel_size // ulysses_degree`` split is SLA-aware context parallel.
        **kwargs: DeepSpeedStrategy's (``stage``, ``offload_optimizer``, ``offload_parameters``, ``config``, ...).
    """

    strategy_name = "sla_deepspeed"

    def __init__(self, sequence_parallel_size: int = 1, ulysses_degree: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sp_config = SequenceParallelConfig(sequence_parallel_size, ulysses_degree)
        self.sp_groups: SequenceParallelGroups | None = None
        self.mpu: SequenceParallelUnit | None = None

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
        self.sp_groups = SequenceParallelGroups.build(self.sp_config)
        self.mpu = SequenceParallelUnit(self.sp_groups)
        rank_zero_info(f"SLAStrategy: world {self.world_size} = dp {self.sp_groups.dp_size} x sp "
                       f"{self.sp_groups.sp_size} (ulysses {self.sp_groups.ulysses_degree} x ring "
                       f"{self.sp_groups.ring_degree}), backend {self._process_group_backend}")

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
            dits = [m for m in self.lightning_module.modules() if isinstance(m, VideoDiT)]
            if not dits:
                raise ValueError(f"sequence_parallel_size={self.sp_groups.sp_size} needs a LightningModule holding a "
                                 "VideoDiT")
            for dit in dits:
                enable_sequence_parallel(dit, self.sp_groups)
        self._init_config_if_needed()
        if self.zero_stage_3:
            _register_proj_l(self.lightning_module)
        super().setup(trainer)

    @override
    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        """DeepSpeedStrategy's, plus the ``mpu`` that tells ZeRO about the sequence-parallel groups."""
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.root_device.index if self._on_cuda else -1), config=self.config,
            model=model,
            model_parameters=model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
            dist_init_required=False, mpu=self.mpu)
        return engine, ds_optimizer

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


def _register_proj_l(module: torch.nn.Module) -> None:
    """SLA applies ``proj_l`` through its weight (``F.linear``), not by calling the ``proj_l`` module, and context
    parallel does so from the wrapper; ZeRO-3 only gathers the parameters of modules whose forward runs, so without
    this a partitioned (or stale) ``proj_l`` is used as soon as the linear branch has marginal blocks."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for owner in module.modules():
        sla = owner if isinstance(owner, SparseLinearAttention) else getattr(owner, "attention", None)
        if isinstance(sla, SparseLinearAttention):
            for param in sla.proj_l.parameters():
                register_external_parameter(owner, param)


def zero_config(stage: int, offload_optimizer: bool, offload_parameters: bool, grad_clip: float,
                micro_batch: int) -> dict:
    """A DeepSpeed config for ``stage`` (0 disables ZeRO); the client optimizer (AdamW) is used as is."""
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True, "gradient_clipping": grad_clip,
            "train_micro_batch_size_per_gpu": micro_batch}
