"""Process groups for sequence parallelism: one object holding the SP / DP split and the Ulysses x ring split of SP.

Rank layout (world = dp_size * sp_size, sp_size = ring_degree * ulysses_degree):

    rank    = dp_rank * sp_size + sp_rank
    sp_rank = ring_rank * ulysses_degree + ulysses_rank

The ranks of one SP group are consecutive, so on a multi-GPU node they share NVLink; within it the Ulysses ranks are
innermost because the all-to-all moves the most bytes. Sequence shards are ordered by sp_rank, so the Ulysses group
of one ring rank holds one contiguous chunk of the sequence, which is what the ring (context-parallel) level splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import check_int, is_int


@dataclass
class SequenceParallelConfig:
    """How the sequence dimension is split across ranks."""

    sp_size: int = 1
    """Ranks that share one sample's token sequence (the SP group). The world size must be a multiple of it; the
    quotient is the data-parallel size."""

    ulysses_degree: int | None = None
    """Ranks of the SP group that exchange heads by all-to-all (Ulysses). None means all of them (pure Ulysses).
    The rest of the SP split, ``ring_degree = sp_size // ulysses_degree``, is context parallel."""

    overlap_chunks: int = 1
    """Chunks each rank's heads (H / ulysses_degree of them) are cut into to pipeline the fused Ulysses exchange
    with the attention (parallel/exchange.py): chunk c + 1's q, k, v travel while chunk c attends, chunk c's output
    while chunk c + 1 attends, and likewise in backward. Smaller chunks also make slower collectives and kernels: on
    2x H200 (L 131072, P 2) 2 chunks of >= 6 heads gained 1-3 %, 3 and 6 chunks took up to 25 % longer
    (benchmarks/results/2026-11-30-h200x2-ulysses-overlap.md). 1: one exchange each way, nothing overlapped. It must
    divide the heads per rank (checked at the first forward, which knows the head count). Eager execution only:
    under torch.compile the exchange is traced unchunked."""

    def __post_init__(self) -> None:
        check_int("sp_size", self.sp_size, 1)
        check_int("overlap_chunks", self.overlap_chunks, 1)
        if self.ulysses_degree is None:
            self.ulysses_degree = self.sp_size
        if not is_int(self.ulysses_degree) or self.ulysses_degree < 1 or self.sp_size % self.ulysses_degree:
            raise ValueError(f"ulysses_degree={self.ulysses_degree} must be a positive divisor of "
                             f"sp_size={self.sp_size}")

    @property
    def ring_degree(self) -> int:
        return self.sp_size // int(self.ulysses_degree)


@dataclass(frozen=True)
class SequenceParallelGroups:
    """Sizes, ranks and process groups of one rank in the DP x ring x Ulysses layout.

    Groups are None when there is no process group to talk to (torch.distributed not initialised, world size 1);
    collectives in this package treat a None group of size 1 as "nothing to exchange".
    """

    config: SequenceParallelConfig
    world_size: int
    rank: int
    device: torch.device
    """Where collectives run: the current CUDA device for NCCL, CPU for gloo."""
    sp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ulysses_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ring_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def sp_size(self) -> int:
        return self.config.sp_size

    @property
    def ulysses_degree(self) -> int:
        return int(self.config.ulysses_degree)

    @property
    def ring_degree(self) -> int:
        return self.config.ring_degree

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses_degree

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses_degree

    @classmethod
    def build(cls, config: SequenceParallelConfig, timeout: timedelta | None = None) -> "SequenceParallelGroups":
        """Create the groups from the initialised default process group (every rank must call this, in the same
        order relative to other group creation). Without torch.distributed only ``sp_size=1`` is possible.

        ``timeout`` bounds every collective on the new groups; None takes the default group's (what the strategy or
        ``init_process_group`` was given), where torch would give new groups its own default of 10-30 minutes."""
        if not (dist.is_available() and dist.is_initialized()):
            if config.sp_size != 1:
                raise ValueError(f"sp_size={config.sp_size} needs torch.distributed to be initialised first")
            return cls(config, world_size=1, rank=0, device=_default_device(None))
        world, rank = dist.get_world_size(), dist.get_rank()
        sp, ul = config.sp_size, int(config.ulysses_degree)
        if world % sp:
            raise ValueError(f"world size {world} is not a multiple of sp_size={sp}")
        dp, ring = world // sp, config.ring_degree

        def ranks(d: int, r: int, u: int) -> int:
            return d * sp + r * ul + u

        layouts = {
            "sp": [[ranks(d, r, u) for r in range(ring) for u in range(ul)] for d in range(dp)],
            "dp": [[ranks(d, r, u) for d in range(dp)] for r in range(ring) for u in range(ul)],
            "ulysses": [[ranks(d, r, u) for u in range(ul)] for d in range(dp) for r in range(ring)],
            "ring": [[ranks(d, r, u) for r in range(ring)] for d in range(dp) for u in range(ul)],
        }
        mine = {name: subgroup(lists, timeout) for name, lists in layouts.items()}
        return cls(config, world, rank, _default_device(dist.get_backend()), mine["sp"], mine["dp"],
                   mine["ulysses"], mine["ring"])


_subgroups: dict[tuple, dist.ProcessGroup] = {}
"""This process's subgroups by rank enumeration and timeout, for the default group in ``_subgroups_world``."""
_subgroups_world: list = [None]


def subgroup(lists: list[list[int]], timeout: timedelta | None = None) -> dist.ProcessGroup:
    """This rank's group of the partition ``lists`` of all ranks, created once per process and default group, with
    collectives bounded by ``timeout`` (None: the default group's timeout, see ``group_timeout``).

    ``build()`` is called again and again (each model wrap, tests) and one build asks for the same partition more
    than once (pure Ulysses: ulysses == sp); process groups live as long as the default group, so new ones each time
    would pile up communicators. Every rank makes the same calls in the same order, so all of them hit or miss the
    cache together, and new_subgroups_by_enumeration, which every rank must enter, is entered by all or none. A new
    default group (destroyed and initialised again) starts a new cache."""
    world = dist.group.WORLD
    if _subgroups_world[0] is not world:
        _subgroups.clear()
        _subgroups_world[0] = world
    timeout = group_timeout(world) if timeout is None else timeout
    key = (tuple(tuple(ranks) for ranks in lists), timeout)
    if key not in _subgroups:
        _subgroups[key] = dist.new_subgroups_by_enumeration(lists, timeout=timeout)[0]
    return _subgroups[key]


def group_timeout(group: dist.ProcessGroup | None = None) -> timedelta:
    """The collective timeout of ``group`` (None: the default group). A rank that fails while its peers wait in a
    collective ends the job after this long at the latest (NCCL's watchdog aborts; gloo raises)."""
    pg = dist.group.WORLD if group is None else group
    # torch keeps a group's timeout only in its backends' options; every backend of one group shares it
    return pg._get_backend(pg._device_types[0]).options._timeout


def _default_device(backend: str | None) -> torch.device:
    if backend == "nccl" or (backend is None and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def ensure_deepspeed_comm() -> None:
    """Point ``deepspeed.comm`` (which DeepSpeed's DistributedAttention talks through) at the already initialised
    torch.distributed default group.

    On CPU, DeepSpeed's first comm init JIT-compiles a shared-memory reduction op (about 80 s on two cores) that
    sequence parallelism never uses: the all-to-all goes through torch.distributed. Marking that op incompatible
    before the init skips the build; ``deepspeed.ops.__compatible_ops__`` is one cached dict precisely so that such
    edits stick. On GPU machines the CUDA accelerator has no such op and nothing is changed.
    """
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    if not dist.is_initialized():
        raise RuntimeError("initialise torch.distributed before building sequence-parallel attention")
    if dist.get_backend() == "gloo":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_comm.init_distributed(dist.get_backend(), auto_mpi_discovery=False, verbose=False)


def broadcast_text(text: str | None, device: torch.device | str, src: int = 0) -> str:
    """Rank ``src``'s ``text`` on every rank of the default group (the other ranks pass None).

    It travels as a length and then UTF-8 bytes, in two tensor broadcasts: unlike ``broadcast_object_list``, which
    unpickles, nothing a peer sends can run code here. ``device``: where the default backend's collectives run (the
    current CUDA device for NCCL, CPU for gloo)."""
    sender = dist.get_rank() == src
    payload = (text or "").encode() if sender else b""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(length, src)
    if not length.item():
        return ""
    data = (torch.tensor(list(payload), dtype=torch.uint8, device=device) if sender
            else torch.empty(int(length.item()), dtype=torch.uint8, device=device))
    dist.broadcast(data, src)
    return data.cpu().numpy().tobytes().decode()
