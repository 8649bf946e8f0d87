"""Shard files and the index: round trip, atomic naming, completeness, format checks."""

import json
import os
import random

import pytest
import torch
from safetensors import safe_open

from sla_dist.data.shards import (INDEX_NAME, PLAN_NAME, build_index, load_index, read_shard_header, shard_path,
                                  write_json, write_shard)
from tests.data.synthetic import TEXT_LEN, random_sample, write_dataset


def test_shard_round_trip(tmp_path):
    rng = random.Random(torch.seed())
    samples = [random_sample(rng, (2, 3, 4), "a.mp4"), random_sample(rng, (1, 2, 2), "b.webm")]
    path = write_shard(tmp_path, 3, samples, skipped=[{"video": "c.mp4", "reason": "no video stream"}])
    assert path == shard_path(tmp_path, 3) and path.name == "shard-000003.safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was renamed away
    header = read_shard_header(path)
    assert header.shard == 3
    assert header.samples == [s.record for s in samples]
    assert header.skipped == [{"video": "c.mp4", "reason": "no video stream"}]
    with safe_open(str(path), framework="pt") as f:
        for j, s in enumerate(samples):
            torch.testing.assert_close(f.get_tensor(f"latents.{j}"), s.latents, rtol=0, atol=0)
            torch.testing.assert_close(f.get_tensor(f"text.{j}"), s.text, rtol=0, atol=0)


def test_temporary_files_of_other_writers_are_left_alone(tmp_path):
    # another node's process with this pid writing the same files at the same time: its temporary files are its own
    foreign = {name: tmp_path / name for name in (f".{PLAN_NAME}.{os.getpid()}.tmp", f".{INDEX_NAME}.{os.getpid()}.tmp",
                                                   f"shards/.shard-000000.safetensors.{os.getpid()}.tmp")}
    (tmp_path / "shards").mkdir()
    for path in foreign.values():
        path.write_text("another writer's")
    assert write_json(tmp_path / PLAN_NAME, {"a": 1}, exclusive=True)
    assert not write_json(tmp_path / PLAN_NAME, {"a": 2}, exclusive=True)
    assert write_json(tmp_path / INDEX_NAME, {"b": 2})
    write_shard(tmp_path, 0, [random_sample(random.Random(0), (1, 2, 2), "a.mp4")], skipped=[])
    assert all(path.read_text() == "another writer's" for path in foreign.values())
    assert json.loads((tmp_path / PLAN_NAME).read_text()) == {"a": 1}
    assert json.loads((tmp_path / INDEX_NAME).read_text()) == {"b": 2}
    assert read_shard_header(shard_path(tmp_path, 0)).shard == 0
    leftovers = {p.name for p in tmp_path.rglob("*.tmp")} - {p.name for p in foreign.values()}
    assert not leftovers


def test_write_shard_rejects_inconsistent_records(tmp_path):
    sample = random_sample(random.Random(0), (2, 2, 2), "a.mp4")
    sample.record.latent_shape = [4, 2, 2, 3]
    with pytest.raises(ValueError, match=r"latent_shape \[4, 2, 2, 3\]"):
        write_shard(tmp_path, 0, [sample], skipped=[])


def test_index_lists_every_sample_and_bucket(tmp_path):
    shards = write_dataset(tmp_path, [(1, 2, 2), (2, 2, 3)], num_shards=3, per_shard=4, seed=torch.seed())
    index = load_index(tmp_path)
    assert index["num_samples"] == 12 and index["text_len"] == TEXT_LEN
    assert [s["file"] for s in index["shards"]] == [f"shards/shard-00000{i}.safetensors" for i in range(3)]
    expected = {}
    for samples in shards:
        for s in samples:
            key = "x".join(map(str, s.record.latent_shape[1:]))
            expected[key] = expected.get(key, 0) + 1
    assert index["buckets"] == expected
    assert [s["video"] for shard in index["shards"] for s in shard["samples"]] == \
        [s.record.video for samples in shards for s in samples]
    assert [s["video"] for s in index["skipped"]] == ["bad0.mp4", "bad1.mp4", "bad2.mp4"]


def test_index_waits_for_missing_shards(tmp_path):
    write_dataset(tmp_path, [(1, 2, 2)], num_shards=2, per_shard=1, seed=1)
    (tmp_path / INDEX_NAME).unlink()
    shard_path(tmp_path, 1).unlink()
    assert build_index(tmp_path) is None
    assert not (tmp_path / INDEX_NAME).exists()
    with pytest.raises(FileNotFoundError, match="not a finished preprocessed dataset"):
        load_index(tmp_path)


def test_foreign_files_are_rejected(tmp_path):
    from safetensors.torch import save_file

    path = shard_path(tmp_path, 0)
    path.parent.mkdir()
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "other"})
    with pytest.raises(ValueError, match="format='other'"):
        read_shard_header(path)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a readable safetensors shard"):
        read_shard_header(path)
    write_json(tmp_path / PLAN_NAME, {"num_shards": 1, "text_len": 4, "encoders": {}})
    write_json(tmp_path / INDEX_NAME, {"format": "sla-dist-latents", "version": 99})
    with pytest.raises(ValueError, match="version=99"):
        load_index(tmp_path)
