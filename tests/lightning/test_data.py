"""Synthetic set and resumable sampler (sla_dist/lightning/synthetic.py, data.py)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from sla_dist.lightning.data import ResumableSampler, collate
from sla_dist.lightning.synthetic import CaptionEncoder, LatentCodec, SyntheticVideoDataset, render


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
    batch = collate([data[i] for i in range(3)])
    assert batch["latents"].shape == (3, 4, 4, 16, 16) and batch["index"].tolist() == [0, 1, 2]
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
        collate([{"latents": torch.zeros(1, 2), "text": torch.zeros(1), "index": 0},
                 {"latents": torch.zeros(1, 3), "text": torch.zeros(1), "index": 1}])
