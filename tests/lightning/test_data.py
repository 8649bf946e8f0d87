"""Synthetic set, resumable sampler and the datamodules (sla_dist/lightning/synthetic.py, data.py)."""

from __future__ import annotations

import collections
import itertools
import random

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from sla_dist.data import LatentShardDataset, collate_latents
from sla_dist.lightning.data import LatentShardDataModule, ResumableSampler, SyntheticVideoDataModule
from sla_dist.lightning.recipe import DataSection
from sla_dist.lightning.synthetic import (
    _PLAIN_VOCAB, VOCAB, CaptionEncoder, LatentCodec, SyntheticVideoDataset, render, scene_texture,
)
from sla_dist.models import dit_config
from tests.data.synthetic import write_dataset


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_replicas_disjoint_and_cover_each_pass():
    n, batch, replicas, seed = 37, 3, 4, random.randrange(1000)
    streams = [_take(ResumableSampler(n, batch, replicas, r, seed), 4 * batch) for r in range(replicas)]
    # global batch g is the concatenation of each replica's g-th batch; one pass covers every sample once
    flat = [i for g in range(4) for r in range(replicas) for i in streams[r][g * batch:(g + 1) * batch]]
    assert sorted(flat[:n]) == list(range(n))
    assert len(set(flat[:n])) == n


def test_sampler_resume_continues_the_stream():
    n, batch, seed, start = 20, 4, random.randrange(1000), random.randrange(1, 30)
    full = _take(ResumableSampler(n, batch, 2, 1, seed), (start + 5) * batch)
    resumed = _take(ResumableSampler(n, batch, 2, 1, seed, start_batch=start), 5 * batch)
    assert resumed == full[start * batch:]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank=2"):
        ResumableSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        ResumableSampler(10, 0)


def test_synthetic_samples_are_deterministic_and_captioned():
    seed = random.randrange(1000)
    data = SyntheticVideoDataset(8, channels=4, frames=4, height=16, width=16, text_dim=32, text_len=16, seed=seed)
    a, b = data[3], data[3]
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
    assert a["latents"].shape == (4, 4, 16, 16) and a["text"].shape == (16, 32)
    video, caption = render(3, seed, 4, 16, 16)
    assert caption == data.caption(3) and caption.startswith("a ")
    # the shape moves: consecutive frames differ; the codec decodes the latents back to the rendered video
    assert not torch.equal(video[:, 0], video[:, 1])
    torch.testing.assert_close(data.codec.decode(a["latents"]), video, atol=1e-5, rtol=0)
    batch = collate_latents([data[i] for i in range(3)])
    assert batch["latents"].shape == (3, 4, 4, 16, 16) and batch["index"].tolist() == [0, 1, 2]
    words = [len(data.caption(i).split()) for i in range(3)]
    assert batch["text_mask"].sum(1).tolist() == words
    with pytest.raises(IndexError):
        data[8]


def test_caption_encoder_and_codec_errors():
    enc = CaptionEncoder(text_dim=8, text_len=4)
    assert not torch.equal(enc("a red disc"), enc("a blue disc"))
    with pytest.raises(ValueError, match="zebra"):
        enc("a zebra")
    with pytest.raises(ValueError, match="channels=2"):
        LatentCodec(2)
    with pytest.raises(ValueError, match="mixes latent shapes"):
        collate_latents([{"latents": torch.zeros(1, 2), "text": torch.zeros(1), "index": 0},
                         {"latents": torch.zeros(1, 3), "text": torch.zeros(1), "index": 1}])


SHARD_BUCKETS = [(1, 2, 2), (2, 2, 3), (3, 4, 2)]


def _shard_loader(root, rank: int, replicas: int, batches_done: int = 0):
    module = LatentShardDataModule(DataSection(kind="shards", shards_dir=str(root), batch_size=2), seed=5)
    strategy = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank})
    module.trainer = SimpleNamespace(strategy=strategy)
    module.load_state_dict({"seed": 5, "batches_done": batches_done})
    return module.train_dataloader()


def _stream(root, rank: int, replicas: int, batches: int, batches_done: int = 0) -> list[dict]:
    """``batches`` batches from ``batches_done`` on, across epochs (as Lightning iterates the loader again)."""
    loader, out = _shard_loader(root, rank, replicas, batches_done), []
    while len(out) < batches:
        out.extend(itertools.islice(iter(loader), batches - len(out)))
    return out


def test_shard_datamodule_buckets_ranks_and_resume(tmp_path):
    write_dataset(tmp_path, SHARD_BUCKETS, num_shards=3, per_shard=7, seed=random.randrange(1000))
    per_epoch = len(_shard_loader(tmp_path, 0, 2))
    steps = 2 * per_epoch + 3
    ranks = [_stream(tmp_path, r, 2, steps) for r in range(2)]
    for step in zip(*ranks):
        # one bucket per step on every data-parallel rank, with the text masks
        assert len({tuple(b["latents"].shape[2:]) for b in step}) == 1
        assert all(b["text_mask"].shape == (2, 12) and b["text_mask"][:, 0].all() for b in step)
    # over one epoch the ranks together read every sample; repeats only fill each bucket's last step (as
    # DistributedSampler pads), so fewer than batch_size x replicas of them per bucket
    reads = collections.Counter(i for rank in ranks for b in rank[:per_epoch] for i in b["index"].tolist())
    assert set(reads) == set(range(len(LatentShardDataset(tmp_path))))
    assert sum(reads.values()) - len(reads) < len(SHARD_BUCKETS) * 2 * 2
    # the second epoch is another order of the same samples
    epoch = [b["index"].tolist() for b in ranks[0]]
    assert epoch[:per_epoch] != epoch[per_epoch:2 * per_epoch]
    # resuming after k global batches (inside the second epoch too) continues the uninterrupted stream
    for done in (3, per_epoch + 1):
        resumed = _stream(tmp_path, 1, 2, steps - done, batches_done=done)
        assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in ranks[1][done:]]


def test_single_device_strategy_is_one_replica(tmp_path):
    # Lightning's SingleDeviceStrategy (parallel.strategy=auto) has no distributed_sampler_kwargs
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="auto", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert not hasattr(trainer.strategy, "distributed_sampler_kwargs")
    data = DataSection(num_samples=6, frames=1, height=8, width=8, batch_size=3)
    module = SyntheticVideoDataModule(data, dit_config("tiny"), seed=1)
    module.trainer = trainer
    indices = [b["index"].tolist() for b in itertools.islice(iter(module.train_dataloader()), 2)]
    assert sorted(sum(indices, [])) == list(range(6))


def test_held_out_validation_shares_are_equal_length_and_cover_the_split():
    from sla_dist.lightning.data import held_out_indices

    shares = [held_out_indices(100, 5, rank, 2) for rank in range(2)]
    assert shares == [[100, 102, 104], [101, 103, 100]]
    assert set(shares[0]) | set(shares[1]) == set(range(100, 105))


def test_validation_needs_held_out_data(tmp_path):
    import pytest

    from sla_dist.lightning.recipe import load_recipe

    with pytest.raises(ValueError, match="trainer.val_every=5 needs held-out data"):
        load_recipe(None, ["data.kind=shards", f"data.shards_dir={tmp_path}", "trainer.val_every=5"])


def _shift_error(a: torch.Tensor, b: torch.Tensor, reach: int) -> torch.Tensor:
    """[2 reach + 1, 2 reach + 1]: mean squared difference of b(y, x) and a(y + dy, x + dx) over b's interior."""
    h, w = a.shape[-2:]
    inner = b[..., reach:h - reach, reach:w - reach]
    return torch.stack([torch.stack([(inner - a[..., reach + dy:h - reach + dy, reach + dx:w - reach + dx]).square()
                                     .mean() for dx in range(-reach, reach + 1)]) for dy in range(-reach, reach + 1)])


def test_textured_scene_is_deterministic_captioned_and_keeps_the_plain_clip():
    seed = random.randrange(1000)
    data = SyntheticVideoDataset(8, channels=4, frames=4, height=16, width=16, text_dim=32, text_len=16, seed=seed,
                                 scene="textured")
    a, b = data[5], data[5]
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])
    assert not torch.equal(a["latents"], data[6]["latents"])
    video, caption = render(5, seed, 4, 16, 16, "textured")
    torch.testing.assert_close(data.codec.decode(a["latents"]), video, atol=1e-5, rtol=0)
    # the same shape, colour and motion as the plain clip, then the pan's direction
    plain = render(5, seed, 4, 16, 16)[1]
    assert caption == f"{plain} panning {scene_texture(5, seed, 16, 16).pan_words()}" == data.caption(5)
    assert a["text_mask"].sum() == len(caption.split())
    # a textured background: far more distinct colours than the plain scene's one plus a shape
    assert len(torch.unique(video[:, 0].reshape(3, -1), dim=1).T) > 100
    pans = {" ".join(data.caption(i).split()[6:]) for i in range(8)}
    assert len(pans) > 2 and all(p.startswith("panning ") for p in pans)


def test_plain_caption_words_keep_their_embeddings():
    enc = CaptionEncoder(text_dim=8, text_len=4, seed=3)
    plain = torch.randn(len(_PLAIN_VOCAB), 8, generator=torch.Generator().manual_seed(4))
    plain[0] = 0
    assert torch.equal(enc.table[:len(_PLAIN_VOCAB)], plain) and len(enc.table) == len(VOCAB)


def test_textured_background_pans_by_its_velocity():
    """Frame t + k shows the texture of frame t moved by k x pan: the best-matching integer shift is next to it and
    the sub-pixel estimate on it; the rendered clip is that texture wherever the shape is not."""
    steps, size, reach = 4, 32, 7
    for index in range(4):
        texture = scene_texture(index, 0, size, size)
        frames = texture.render(steps + 1, size, size)
        expected = torch.tensor(texture.pan) * steps
        error = _shift_error(frames[:, 0], frames[:, steps], reach)
        peak = divmod(int(error.argmin()), 2 * reach + 1)
        # an anisotropic texture can favour the farther of the two integer shifts around the pan
        assert ((torch.tensor(peak) - reach - expected).abs() < 1).all(), (index, peak, expected)
        # parabolic interpolation around the minimum, per axis
        y, x = peak
        sub = [y - reach + 0.5 * float((error[y - 1, x] - error[y + 1, x])
                                       / (error[y - 1, x] - 2 * error[y, x] + error[y + 1, x])),
               x - reach + 0.5 * float((error[y, x - 1] - error[y, x + 1])
                                       / (error[y, x - 1] - 2 * error[y, x] + error[y, x + 1]))]
        assert torch.allclose(torch.tensor(sub), expected.float(), atol=0.35), (index, sub, expected)
        assert error.min() < 0.2 * error[reach, reach]  # a shift the texture shows, not noise around 0
        video, _ = render(index, 0, steps + 1, size, size, "textured")
        assert (video == frames).all(0).float().mean() > 0.5


def test_scene_is_checked():
    with pytest.raises(ValueError, match="scene='foggy' is not one of"):
        SyntheticVideoDataset(2, 4, 1, 8, 8, 8, 4, scene="foggy")
    with pytest.raises(ValueError, match="scene='foggy'"):
        render(0, 0, 1, 8, 8, "foggy")
