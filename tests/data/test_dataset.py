"""LatentShardDataset, collate_latents and BucketBatchSampler: contents, one bucket per batch, rank splits, resume."""

import itertools
from pathlib import Path

import pytest
import torch

from sla_dist.data.dataset import BucketBatchSampler, LatentShardDataset, collate_latents
from tests.data.synthetic import CHANNELS, TEXT_DIM, TEXT_LEN, write_dataset

BUCKETS = [(1, 2, 2), (2, 2, 3), (3, 4, 2)]


@pytest.fixture
def dataset_dir(tmp_path):
    shards = write_dataset(tmp_path, BUCKETS, num_shards=3, per_shard=7, seed=torch.seed())
    return tmp_path, [s for samples in shards for s in samples]


def test_items_are_the_stored_tensors_padded(dataset_dir):
    root, samples = dataset_dir
    dataset = LatentShardDataset(root)
    assert len(dataset) == len(samples) == 21
    for i, s in enumerate(samples):
        item = dataset[i]
        n = s.record.text_tokens
        torch.testing.assert_close(item["latents"], s.latents, rtol=0, atol=0)
        assert item["text"].shape == (TEXT_LEN, TEXT_DIM)
        torch.testing.assert_close(item["text"][:n], s.text, rtol=0, atol=0)
        assert not item["text"][n:].any()
        assert item["text_mask"].tolist() == [True] * n + [False] * (TEXT_LEN - n)
    assert sorted(i for v in dataset.buckets.values() for i in v) == list(range(21))
    for bucket, indices in dataset.buckets.items():
        assert all(tuple(samples[i].latents.shape[1:]) == bucket for i in indices)
    with pytest.raises(IndexError, match="sample 21"):
        dataset[21]


def test_shorter_text_len_truncates(dataset_dir):
    root, samples = dataset_dir
    item = LatentShardDataset(root, text_len=1)[0]
    torch.testing.assert_close(item["text"], samples[0].text[:1], rtol=0, atol=0)
    assert item["text_mask"].tolist() == [True]


def test_loader_batches_hold_one_bucket(dataset_dir):
    root, _ = dataset_dir
    dataset = LatentShardDataset(root)
    sampler = BucketBatchSampler(dataset.buckets, batch_size=2, seed=torch.seed() % 2**31)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_latents, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["latents"].shape[:2] == (2, CHANNELS)
        assert batch["text"].shape == (2, TEXT_LEN, TEXT_DIM) and batch["text_mask"].shape == (2, TEXT_LEN)
        assert {dataset.records[i].bucket for i in batch["index"].tolist()} == {tuple(batch["latents"].shape[2:])}
        seen.extend(batch["index"].tolist())
    assert set(seen) == set(range(len(dataset)))
    with pytest.raises(ValueError, match="mixes latent shapes"):
        collate_latents([dataset[i] for i in (dataset.buckets[BUCKETS[0]][0], dataset.buckets[BUCKETS[1]][0])])


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_each_step_within_one_bucket(dataset_dir, drop_last):
    root, _ = dataset_dir
    buckets = LatentShardDataset(root).buckets
    bucket_of = {i: b for b, idx in buckets.items() for i in idx}
    seed = torch.seed() % 2**31
    ranks = [BucketBatchSampler(buckets, 2, rank=r, world_size=3, seed=seed, drop_last=drop_last) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
    used = []
    for step in zip(*per_rank):
        assert len({bucket_of[i] for batch in step for i in batch}) == 1
        used.extend(i for batch in step for i in batch)
    if drop_last:
        assert len(used) == len(set(used))  # no sample twice
        assert len(set(used)) == sum(len(v) // 6 * 6 for v in buckets.values())
    else:
        assert set(used) == set(bucket_of)  # every sample, padding repeats a few


def test_order_is_deterministic_and_changes_per_epoch(dataset_dir):
    root, _ = dataset_dir
    buckets = LatentShardDataset(root).buckets
    seed = torch.seed() % 2**31
    a, b = BucketBatchSampler(buckets, 2, seed=seed), BucketBatchSampler(buckets, 2, seed=seed)
    first = list(a)
    assert first == list(b) == a.batches(0)
    assert list(a) == a.batches(1) != first  # exhausting an epoch moves to the next
    assert list(BucketBatchSampler(buckets, 2, seed=seed + 1)) != first


@pytest.mark.parametrize("position", [0.0, 0.5, 1.0, 1.5])
def test_resume_continues_the_uninterrupted_order(dataset_dir, position):
    root, _ = dataset_dir
    buckets = LatentShardDataset(root).buckets
    seed = torch.seed() % 2**31
    reference = BucketBatchSampler(buckets, 2, rank=1, world_size=2, seed=seed)
    n = len(reference)
    stop = int(position * n)
    uninterrupted = list(reference) + list(reference)  # two epochs
    run = BucketBatchSampler(buckets, 2, rank=1, world_size=2, seed=seed)
    head = list(itertools.islice(itertools.chain(run, run), stop))
    state = run.state_dict()
    assert state["epoch"] * n + state["next_batch"] == stop
    resumed = BucketBatchSampler(buckets, 2, rank=1, world_size=2, seed=seed)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # Lightning re-announces the current epoch on resume: must not rewind
    tail = list(resumed)
    if stop < n:
        tail += list(resumed)
    assert head + tail == uninterrupted


def test_explicit_position_and_end_of_epoch(dataset_dir):
    root, _ = dataset_dir
    buckets = LatentShardDataset(root).buckets
    sampler = BucketBatchSampler(buckets, 2, seed=5)
    list(itertools.islice(iter(sampler), 6))  # a prefetching loader handed out 6, the loop consumed 4
    resumed = BucketBatchSampler(buckets, 2, seed=5)
    resumed.load_state_dict(sampler.state_dict(epoch=0, batches_consumed=4))
    assert list(resumed) == sampler.batches(0)[4:]
    done = BucketBatchSampler(buckets, 2, seed=5)
    done.load_state_dict(sampler.state_dict(epoch=0, batches_consumed=len(sampler)))
    assert list(done) == sampler.batches(1)


def test_bad_arguments_and_foreign_state(dataset_dir):
    root, _ = dataset_dir
    buckets = LatentShardDataset(root).buckets
    with pytest.raises(ValueError, match="rank=2"):
        BucketBatchSampler(buckets, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        BucketBatchSampler(buckets, 0)
    with pytest.raises(ValueError, match="leaves no batch"):
        BucketBatchSampler(buckets, 100, drop_last=True)
    state = BucketBatchSampler(buckets, 2, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2 vs 1"):
        BucketBatchSampler(buckets, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_consumed=99"):
        BucketBatchSampler(buckets, 2).state_dict(epoch=0, batches_consumed=99)


def test_open_shards_are_bounded_and_not_pickled(dataset_dir, monkeypatch):
    import pickle

    from sla_dist.data import dataset as module

    root, samples = dataset_dir
    monkeypatch.setattr(module, "MAX_OPEN_SHARDS", 2)
    dataset = LatentShardDataset(root)
    for i in (0, 7, 14, 0, 20, 3):  # shards 0, 1, 2, 0, 2, 0 (7 samples each)
        torch.testing.assert_close(dataset[i]["latents"], samples[i].latents, rtol=0, atol=0)
        assert len(dataset._handles) <= 2
    assert list(dataset._handles) == ["shards/shard-000002.safetensors", "shards/shard-000000.safetensors"]
    clone = pickle.loads(pickle.dumps(dataset))
    assert not clone._handles
    torch.testing.assert_close(clone[15]["text"], dataset[15]["text"], rtol=0, atol=0)


def test_seek_to_a_global_batch_count(dataset_dir):
    root, _ = dataset_dir
    buckets = LatentShardDataset(root).buckets
    seed = torch.seed() % 2**31
    reference = BucketBatchSampler(buckets, 2, seed=seed)
    n = len(reference)
    stream = reference.batches(0) + reference.batches(1) + reference.batches(2)
    done = torch.randint(0, 2 * n, ()).item()
    sampler = BucketBatchSampler(buckets, 2, seed=seed)
    sampler.seek(done)
    sampler.set_epoch(done // n)  # Lightning's current epoch after the restore: no rewind
    got = list(itertools.islice(itertools.chain(sampler, sampler, sampler), n))
    assert got == stream[done: done + n]
    with pytest.raises(ValueError, match="batches_done=-1"):
        sampler.seek(-1)


def test_no_private_ceiling_division():
    # ceiling division is sla_dist.kernels.block_map.num_blocks (or math.ceil), not a copy per module
    import sla_dist.data

    for path in Path(sla_dist.data.__file__).parent.glob("*.py"):
        assert "-(-" not in path.read_text(), path.name
