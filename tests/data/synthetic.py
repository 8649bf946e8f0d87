"""Random latent shards written straight through the shard writer (no encoders), for dataset and sampler tests."""

from __future__ import annotations

import random

import torch

from sla_dist.data.shards import PLAN_NAME, EncodedSample, SampleRecord, build_index, write_json, write_shard

CHANNELS, TEXT_DIM, TEXT_LEN = 4, 8, 12


def random_sample(rng: random.Random, bucket: tuple[int, int, int], name: str) -> EncodedSample:
    tokens = rng.randint(1, TEXT_LEN)
    shape = [CHANNELS, *bucket]
    record = SampleRecord(video=name, caption=f"caption of {name}", clip_start=0.0, fps=8.0, frames=4 * bucket[0] - 3,
                          height=8 * bucket[1], width=8 * bucket[2], latent_shape=shape, text_tokens=tokens)
    return EncodedSample(torch.randn(shape), torch.randn(tokens, TEXT_DIM), record)


def write_dataset(root, buckets: list[tuple[int, int, int]], num_shards: int, per_shard: int,
                  seed: int) -> list[list[EncodedSample]]:
    """Write ``num_shards`` shards of ``per_shard`` samples with buckets drawn from ``buckets``; build the index."""
    rng = random.Random(seed)
    write_json(root / PLAN_NAME, {"num_shards": num_shards, "text_len": TEXT_LEN, "encoders": {"vae": "random"}})
    shards = []
    for i in range(num_shards):
        samples = [random_sample(rng, rng.choice(buckets), f"v{i}_{j}.mp4") for j in range(per_shard)]
        write_shard(root, i, samples, skipped=[{"video": f"bad{i}.mp4", "reason": "corrupt"}])
        shards.append(samples)
    assert build_index(root) is not None
    return shards
