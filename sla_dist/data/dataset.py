"""Training-side reading of latent shards: a map-style dataset, a bucketed batch sampler and its collate function.

Typical use (one data-parallel rank; ranks of one sequence-parallel group pass the same ``rank``)::

    dataset = LatentShardDataset("data/latents")
    sampler = BucketBatchSampler(dataset.buckets, batch_size=2, rank=dp_rank, world_size=dp_size, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_latents, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:        # batch["latents"] [B, C, T, H, W], batch["text"] [B, text_len, D], ...
            ...

Every batch comes from one bucket (one latent (frames, height, width), hence one token count), and in each step
all data-parallel ranks get batches of the same bucket, so no rank waits on a longer sequence. Under Lightning, pass
``use_distributed_sampler=False`` to the Trainer: this sampler already splits the data over ranks.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from sla_dist.data.shards import SampleRecord, load_index
from sla_dist.kernels.block_map import num_blocks

Bucket = tuple[int, int, int]
MAX_OPEN_SHARDS = 32


class LatentShardDataset(torch.utils.data.Dataset):
    """The samples of a preprocessed dataset directory (see :mod:`sla_dist.data.shards`), in index order.

    ``dataset[i]`` is a dict: ``latents`` [C, T, H, W], ``text`` [text_len, D] (the caption embedding zero-padded
    past its real tokens, as Wan feeds umT5 embeddings), ``text_mask`` [text_len] bool (True on real tokens) and
    ``index`` (i). ``text_len`` defaults to the tokenizer length the data was encoded with; a smaller value
    truncates longer captions. Shard files are opened lazily and the ``MAX_OPEN_SHARDS`` most recently used stay
    open per process; the dataset pickles without them into DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike, text_len: int | None = None) -> None:
        self.root = Path(root)
        index = load_index(self.root)
        self.text_len = int(index["text_len"] if text_len is None else text_len)
        if self.text_len <= 0:
            raise ValueError(f"text_len={self.text_len} must be positive")
        self.records: list[SampleRecord] = []
        self._locations: list[tuple[str, int]] = []
        for shard in index["shards"]:
            for j, sample in enumerate(shard["samples"]):
                self.records.append(SampleRecord(**sample))
                self._locations.append((shard["file"], j))
        self.skipped: list[dict] = index["skipped"]
        self.encoders: dict = index["encoders"]
        buckets: dict[Bucket, list[int]] = {}
        for i, record in enumerate(self.records):
            buckets.setdefault(record.bucket, []).append(i)
        self.buckets: dict[Bucket, list[int]] = dict(sorted(buckets.items()))
        """Latent (frames, height, width) -> sample indices, in index order."""
        self._handles: OrderedDict[str, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.records):
            raise IndexError(f"sample {i} is out of range for a dataset of {len(self.records)} samples")
        file, j = self._locations[i]
        handle = self._handles.pop(file, None)
        if handle is None:
            handle = safe_open(str(self.root / file), framework="pt")
            if len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)  # least recently used: bounds open files on huge datasets
        self._handles[file] = handle
        latents = handle.get_tensor(f"latents.{j}")
        tokens = handle.get_tensor(f"text.{j}")[: self.text_len]
        text = tokens.new_zeros(self.text_len, tokens.shape[1])
        text[: tokens.shape[0]] = tokens
        mask = torch.zeros(self.text_len, dtype=torch.bool)
        mask[: tokens.shape[0]] = True
        return {"latents": latents, "text": text, "text_mask": mask, "index": i}

    def __getstate__(self) -> dict:
        # open file handles do not pickle; each worker reopens the shards it touches
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state


def collate_latents(samples: Sequence[dict]) -> dict:
    """Stack samples of one bucket: latents [B, C, T, H, W], text [B, text_len, D], text_mask [B, text_len] and
    index [B]."""
    shapes = {tuple(s["latents"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch mixes latent shapes {sorted(shapes)}; batch with BucketBatchSampler")
    return {
        "latents": torch.stack([s["latents"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "text_mask": torch.stack([s["text_mask"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
    }


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Deterministic, resumable batches of one bucket each, split over data-parallel ranks.

    For epoch ``e`` the order is a pure function of ``(seed, e, buckets, batch_size, world_size)``: each bucket's
    indices are shuffled, cut into global batches of ``batch_size * world_size``, the global batches of all buckets
    are shuffled together, and rank ``r`` takes slice ``r`` of each. A bucket's last, partial global batch is dropped
    with ``drop_last``; otherwise it is filled by cycling through that bucket again (as DistributedSampler pads), so
    every rank has the same number of batches and each step is one bucket on every rank.

    ``rank`` / ``world_size`` are those of the *data-parallel* group: the ranks of one sequence-parallel group pass
    the same ``rank`` and so read the same samples.

    Resuming: ``state_dict()`` records the epoch and how many batches of it were used; a sampler built with the same
    arguments and given that state continues with exactly the batches an uninterrupted run would have yielded.
    Because a DataLoader prefetches, the batches the *sampler* has handed out run ahead of those the training loop
    has consumed; a training loop that knows its own position passes it as ``state_dict(epoch, batches_consumed)``,
    or restores it with ``seek(total_batches_done)``.
    Iterating again after an epoch's last batch starts the next epoch; ``set_epoch`` to the current epoch is a
    no-op, so a restored position survives Lightning calling ``set_epoch`` at the start of the resumed epoch.
    """

    def __init__(self, buckets: Mapping[Bucket, Sequence[int]], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world_size={world_size!r} must be a positive integer")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must lie in [0, world_size={world_size})")
        self.buckets = {tuple(k): list(v) for k, v in sorted(buckets.items()) if len(v)}
        if not self.buckets:
            raise ValueError("buckets hold no samples")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self._next = 0
        self._num_samples = sum(len(v) for v in self.buckets.values())
        if len(self) == 0:
            sizes = {k: len(v) for k, v in self.buckets.items()}
            raise ValueError(f"drop_last with batch_size={batch_size} x world_size={world_size} leaves no batch: "
                             f"bucket sizes {sizes}")

    def _global_batches(self, epoch: int) -> list[list[int]]:
        """All global batches (``batch_size * world_size`` indices, one bucket each) of ``epoch``, in order."""
        rng = random.Random(f"{self.seed}/{epoch}")
        size = self.batch_size * self.world_size
        batches = []
        for indices in self.buckets.values():
            order = list(indices)
            if self.shuffle:
                rng.shuffle(order)
            full, rest = divmod(len(order), size)
            count = full if self.drop_last or rest == 0 else full + 1
            batches.extend([order[(b * size + k) % len(order)] for k in range(size)] for b in range(count))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, from its start."""
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [b[lo:hi] for b in self._global_batches(epoch)]

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        if self.drop_last:
            return sum(len(v) // size for v in self.buckets.values())
        return sum(num_blocks(len(v), size) for v in self.buckets.values())

    def __iter__(self) -> Iterator[list[int]]:
        if self._next >= len(self):
            # the current epoch was used up: a new iteration is the next epoch (state "epoch e, all batches used"
            # and "epoch e + 1, none used" therefore resume alike)
            self.epoch, self._next = self.epoch + 1, 0
        for batch in self.batches(self.epoch)[self._next:]:
            self._next += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch, unless the sampler is already positioned in ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be non-negative")
        if epoch != self.epoch:
            self.epoch, self._next = epoch, 0

    def seek(self, batches_done: int) -> None:
        """Continue after ``batches_done`` batches counted from the start of epoch 0 (e.g. the trainer's global
        count of batches run), across epoch boundaries."""
        if not isinstance(batches_done, int) or batches_done < 0:
            raise ValueError(f"batches_done={batches_done!r} must be a non-negative integer")
        self.epoch, self._next = divmod(batches_done, len(self))

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "num_samples": self._num_samples,
                "num_batches": len(self)}

    def state_dict(self, epoch: int | None = None, batches_consumed: int | None = None) -> dict:
        """Position to resume from: the sampler's own (batches handed out) unless the caller passes its own."""
        if (epoch is None) != (batches_consumed is None):
            raise ValueError(f"pass both epoch={epoch} and batches_consumed={batches_consumed}, or neither")
        if epoch is None:
            epoch, batches_consumed = self.epoch, self._next
        if not 0 <= batches_consumed <= len(self):
            raise ValueError(f"batches_consumed={batches_consumed} must lie in [0, {len(self)}]")
        return {"epoch": epoch, "next_batch": batches_consumed, **self._fingerprint()}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state``; ValueError if it was saved by a sampler with other arguments or data."""
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatched:
            raise ValueError("sampler state was saved with other settings (saved, current): "
                             + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in mismatched.items()))
        self.epoch, self._next = int(state["epoch"]), int(state["next_batch"])
