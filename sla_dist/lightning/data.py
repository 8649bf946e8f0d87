"""Datamodules: the synthetic text-to-video set (the default) and precomputed latent shards, with a resumable order.

Replicas (rank, count) are the data-parallel ones from the strategy's ``distributed_sampler_kwargs``, so all ranks of
one sequence-parallel group read the same samples; a strategy without them (Lightning's single-device one) is one
replica. The datamodule's state in the checkpoint is the number of global batches the trainer has run, so a resumed
run continues with the very next batch no matter how far the loader had prefetched.

* Synthetic: one global stream of samples (all of one shape): pass p over the dataset is the permutation seeded by
  (seed, p), and global batch g is stream positions [g * B * R, (g + 1) * B * R) for R replicas of batch size B,
  replica r taking its r-th run of B. The stream is infinite (training is step-based).
* Shards: ``sla_dist.data.BucketBatchSampler``: every step is one bucket (one latent shape, one token count) on every
  replica; epochs follow each other, and a resume ``seek``s to the global batch count across them.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..data import BucketBatchSampler, LatentShardDataset, collate_latents
from ..models import DiTConfig
from .recipe import DataSection
from .synthetic import SyntheticVideoDataset


class ResumableSampler(Sampler[int]):
    """Infinite, deterministic index stream of one data-parallel replica, starting at global batch ``start_batch``."""

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 start_batch: int = 0) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be positive")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is not in [0, num_replicas={num_replicas})")
        if start_batch < 0:
            raise ValueError(f"start_batch={start_batch} must be >= 0")
        self.num_samples, self.batch_size, self.num_replicas, self.rank = num_samples, batch_size, num_replicas, rank
        self.seed, self.start_batch = seed, start_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        seed = zlib.crc32(f"{self.seed},{epoch}".encode())
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[int]:
        global_batch = self.batch_size * self.num_replicas
        position = self.start_batch * global_batch + self.rank * self.batch_size
        epoch, perm = -1, None
        while True:
            for offset in range(self.batch_size):
                p = position + offset
                if p // self.num_samples != epoch:
                    epoch = p // self.num_samples
                    perm = self._permutation(epoch)
                yield int(perm[p % self.num_samples])
            position += global_batch


class _ResumableDataModule(pl.LightningDataModule):
    """Shared by the datamodules: the train loader over this replica's share and its checkpointed position."""

    def __init__(self, data: DataSection, seed: int) -> None:
        super().__init__()
        self.data, self.seed = data, seed
        self._start_batch = 0

    def replica(self) -> tuple[int, int]:
        """(rank, count) of this data-parallel replica."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("rank", 0), kwargs.get("num_replicas", 1)

    def train_dataloader(self) -> DataLoader:
        raise NotImplementedError

    def _loader(self, dataset: Dataset, **order) -> DataLoader:
        return DataLoader(dataset, collate_fn=collate_latents, num_workers=self.data.num_workers,
                          persistent_workers=self.data.num_workers > 0, **order)

    def state_dict(self) -> dict:
        # Batches the trainer has run (``processed`` counts the batch whose end-of-step checkpoint is being written);
        # the loader itself may have prefetched further.
        done = self._start_batch
        if self.trainer is not None:
            done = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return {"seed": self.seed, "batches_done": int(done)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint's data order has seed={state['seed']}, this run has seed={self.seed}")
        self._start_batch = int(state["batches_done"])


class SyntheticVideoDataModule(_ResumableDataModule):
    """The built-in synthetic text-to-video set, shaped for ``model`` (latent channels, text dim)."""

    def __init__(self, data: DataSection, model: DiTConfig, seed: int = 0) -> None:
        super().__init__(data, seed)
        self.model = model

    def build_dataset(self) -> SyntheticVideoDataset:
        d, m = self.data, self.model
        return SyntheticVideoDataset(d.num_samples, m.in_channels, d.frames, d.height, d.width, m.text_dim,
                                     d.text_len, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        dataset = self.build_dataset()
        rank, replicas = self.replica()
        sampler = ResumableSampler(len(dataset), self.data.batch_size, replicas, rank, seed=self.seed,
                                   start_batch=self._start_batch)
        return self._loader(dataset, batch_size=self.data.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """``data.val_samples`` samples past the training set (never trained on), this replica's share in order."""
        d, m = self.data, self.model
        dataset = SyntheticVideoDataset(d.num_samples + d.val_samples, m.in_channels, d.frames, d.height, d.width,
                                        m.text_dim, d.text_len, seed=self.seed)
        rank, replicas = self.replica()
        return self._loader(Subset(dataset, held_out_indices(d.num_samples, d.val_samples, rank, replicas)),
                            batch_size=d.batch_size, shuffle=False)


def held_out_indices(start: int, count: int, rank: int, replicas: int) -> list[int]:
    """Replica ``rank``'s share of the ``count`` held-out indices from ``start``, strided; the shares are padded to one
    length by wrapping around, since every replica must run as many validation batches (ZeRO-3 gathers weights
    collectively in each forward)."""
    per_replica = -(-count // replicas)
    return [start + (rank + i * replicas) % count for i in range(per_replica)]


class LatentShardDataModule(_ResumableDataModule):
    """Precomputed latent shards (``sla-dist preprocess``): ``LatentShardDataset`` batched by ``BucketBatchSampler``
    (one bucket per step), collated with their text masks."""

    def build_dataset(self) -> LatentShardDataset:
        return LatentShardDataset(self.data.shards_dir)

    def train_dataloader(self) -> DataLoader:
        dataset = self.build_dataset()
        rank, replicas = self.replica()
        sampler = BucketBatchSampler(dataset.buckets, self.data.batch_size, rank=rank, world_size=replicas,
                                     seed=self.seed)
        sampler.seek(self._start_batch)
        return self._loader(dataset, batch_sampler=sampler)


def build_datamodule(data: DataSection, model: DiTConfig, seed: int) -> _ResumableDataModule:
    if data.kind == "synthetic":
        return SyntheticVideoDataModule(data, model, seed)
    return LatentShardDataModule(data, seed)
