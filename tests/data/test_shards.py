"""Shard files and the index: round trip, atomic naming, completeness, format checks."""

import json
import os
import random

import pytest
import torch
from safetensors import safe_open

from sla_dist.data import shards
from sla_dist.data.shards import (INDEX_NAME, PLAN_NAME, build_index, load_index, read_shard_header,
                                  remove_stale_temps, shard_path, write_json, write_shard)
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


def test_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace, real_link = [], os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(real):
        def call(src, dst):
            events.append(("rename", os.path.basename(src), os.path.basename(dst)))
            real(src, dst)
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", rename(real_replace))
    monkeypatch.setattr(os, "link", rename(real_link))
    write_shard(tmp_path, 0, [random_sample(random.Random(0), (1, 2, 2), "a.mp4")], skipped=[])
    write_json(tmp_path / PLAN_NAME, {"a": 1}, exclusive=True)
    write_json(tmp_path / INDEX_NAME, {"b": 1})
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 3, events
    for i in renames:
        tmp, final = events[i][1:]
        parent = "shards" if final.startswith("shard-") else tmp_path.name
        assert events[i - 1] == ("fsync", tmp) and events[i + 1] == ("fsync", parent), events


def test_stale_temporary_files_are_removed_by_age_or_owner(tmp_path):
    path = tmp_path / PLAN_NAME
    old, fresh = tmp_path / f".{PLAN_NAME}.1.tmp", tmp_path / f".{PLAN_NAME}.2.tmp"
    other = tmp_path / f".{INDEX_NAME}.3.tmp"
    for p in (old, fresh, other):
        p.write_text("partial")
    os.utime(old, (0, 0))
    assert remove_stale_temps(path, older_than=60) == [old]
    assert fresh.exists() and other.exists()
    assert remove_stale_temps(path) == [fresh] and other.exists()
    assert shards.remove_stale_temps(shard_path(tmp_path, 0)) == []  # no shards/ directory yet
