"""End to end: videos + captions -> shards + index with tiny random encoders loaded by path; restart; 2 processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sla_dist.data.dataset import BucketBatchSampler, LatentShardDataset, collate_latents
from sla_dist.data.preprocess import PreprocessConfig, run
from sla_dist.data.shards import ENCODERS_NAME, INDEX_NAME, PLAN_NAME, load_index, shard_path
from sla_dist.data.video import ClipShape, read_clip
from tests.data.conftest import CLIP_SHAPES, FPS

pytest.importorskip("av", reason="reading videos needs PyAV: pip install av (the 'data' extra)")

# expected bucket (latent frames, height, width) of each usable video; see the video_dir fixture
EXPECTED = {"a.mp4": (3, 4, 6), "b.webm": (2, 4, 4), "e.mp4": (2, 4, 6), "sub/c.mp4": (2, 4, 4),
            "sub/d.mp4": (3, 4, 6)}
SKIPPED = {"broken.mp4": "VideoError", "nocaption.mp4": "no caption", "short.mp4": "shorter than the shortest clip"}


def make_config(pipeline_dir, video_dir, out, **overrides):
    options = dict(videos=str(video_dir), captions=str(video_dir / "captions.json"), out=str(out),
                   vae=str(pipeline_dir), text_encoder=str(pipeline_dir), clip_shapes=CLIP_SHAPES, fps=FPS,
                   clips_per_video=2, shard_size=2, text_len=10)
    return PreprocessConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def preprocessed(pipeline_dir, video_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    summary = run(make_config(pipeline_dir, video_dir, out))
    return out, summary


def test_shards_and_index(preprocessed, video_dir):
    out, summary = preprocessed
    assert summary.shards_written == [0, 1, 2, 3] and summary.index_written
    index = load_index(out)
    assert index["num_samples"] == summary.clips == 2 * len(EXPECTED)
    assert len(index["shards"]) == 4 and index["shards"][2]["samples"] == []  # shard 2: only unusable videos
    assert index["text_len"] == 10 and index["encoders"]["vae"]["class"] == "AutoencoderKLWan"
    samples = [s for shard in index["shards"] for s in shard["samples"]]
    relative = [str(Path(s["video"]).relative_to(video_dir)) for s in samples]
    assert relative == [v for v in sorted(EXPECTED) for _ in range(2)]
    for name, s in zip(relative, samples):
        assert tuple(s["latent_shape"]) == (4, *EXPECTED[name])
    starts = [s["clip_start"] for s in samples[:2]]
    assert 0 <= starts[0] < starts[1]  # two different clips of a.mp4
    skipped = {str(Path(s["video"]).relative_to(video_dir)): s["reason"] for s in index["skipped"]}
    assert skipped.keys() == SKIPPED.keys()
    for name, reason in SKIPPED.items():
        assert reason in skipped[name]
    assert index["buckets"] == {"2x4x4": 4, "2x4x6": 2, "3x4x6": 4}


def test_latents_and_text_match_the_encoders(preprocessed, pipeline_dir, video_dir):
    """Recompute every sample with the diffusers / transformers models used directly."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    out, _ = preprocessed
    vae = AutoencoderKLWan.from_pretrained(pipeline_dir / "vae")
    mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
    encoder = UMT5EncoderModel.from_pretrained(pipeline_dir / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    captions = json.loads((video_dir / "captions.json").read_text())
    dataset = LatentShardDataset(out)
    for i, record in enumerate(dataset.records):
        clip = read_clip(record.video, ClipShape(record.frames, record.height, record.width), record.fps,
                         record.clip_start)
        with torch.no_grad():
            z = vae.encode(clip[None]).latent_dist.mean[0]
            ids = tokenizer(record.caption, return_tensors="pt")["input_ids"]
            text = encoder(input_ids=ids).last_hidden_state[0]
        item = dataset[i]
        torch.testing.assert_close(item["latents"].float(), (z - mean) / std, rtol=1e-2, atol=1e-2)
        name = Path(record.video)
        assert record.caption in (captions.get(str(name.relative_to(video_dir))), captions.get(name.name),
                                  captions.get(name.stem))
        n = len(record.caption.split())
        assert record.text_tokens == n and item["text_mask"].sum() == min(n, 10)
        torch.testing.assert_close(item["text"][:n].float(), text[:10], rtol=1e-2, atol=1e-2)


def test_dataset_batches_are_one_bucket(preprocessed):
    out, _ = preprocessed
    dataset = LatentShardDataset(out)
    sampler = BucketBatchSampler(dataset.buckets, batch_size=2, seed=torch.seed() % 2**31)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_latents)
    batches = list(loader)
    assert len(batches) == 5  # buckets of 4, 2, 4 samples
    for batch in batches:
        buckets = {dataset.records[i].bucket for i in batch["index"].tolist()}
        assert buckets == {tuple(batch["latents"].shape[2:])}


def test_restart_redoes_only_the_missing_shard(preprocessed, pipeline_dir, video_dir, tmp_path):
    out, _ = preprocessed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    original = {i: load_file(shard_path(out, i)) for i in range(4)}
    shard_path(copy, 1).unlink()
    (copy / INDEX_NAME).unlink()
    before = {i: shard_path(copy, i).stat().st_mtime_ns for i in (0, 2, 3)}
    summary = run(make_config(pipeline_dir, video_dir, copy))
    assert summary.shards_written == [1] and summary.shards_present == [0, 2, 3] and summary.index_written
    assert {i: shard_path(copy, i).stat().st_mtime_ns for i in (0, 2, 3)} == before
    redone = load_file(shard_path(copy, 1))
    assert redone.keys() == original[1].keys()
    for key, value in redone.items():
        torch.testing.assert_close(value, original[1][key], rtol=0, atol=0)
    assert load_index(copy) == load_index(out)


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path

from sla_dist.data import shards
from sla_dist.data.preprocess import run
from tests.data.test_preprocess import make_config

real = shards.save_safetensors


def save_safetensors(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    if metadata["shard"] == "1":  # SIGKILL half-way through writing shard 1
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


shards.save_safetensors = save_safetensors
run(make_config(*map(Path, sys.argv[1:])))
"""


def test_kill_mid_write_leaves_no_partial_shard_and_restart_cleans_up(preprocessed, pipeline_dir, video_dir,
                                                                       tmp_path):
    out, _ = preprocessed
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)  # a run that still has shard 1 to write
    shard_path(killed, 1).unlink()
    (killed / INDEX_NAME).unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(pipeline_dir), str(video_dir), str(killed)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == -9, proc.stderr
    assert not shard_path(killed, 1).exists()
    (partial,) = (killed / "shards").glob(".shard-000001.safetensors.*.tmp")  # what the kill left
    summary = run(make_config(pipeline_dir, video_dir, killed))
    assert summary.shards_present == [0, 2, 3] and summary.shards_written == [1] and summary.index_written
    assert not partial.exists() and not list(killed.rglob("*.tmp"))
    assert load_index(killed) == load_index(out)


def test_plan_is_written_once_and_encoders_once(tmp_path):
    from sla_dist.data.preprocess import _record_encoders, _write_or_check_plan

    plan = {"settings": {"fps": 8.0}, "videos": ["a.mp4"], "num_shards": 1, "text_len": 4}
    _write_or_check_plan(tmp_path, plan)
    written = (tmp_path / PLAN_NAME).stat()
    encoders = {"vae": {"class": "AutoencoderKLWan", "spatial_factor": 8}, "text_encoder": {"class": "T5"}}
    for _ in range(2):  # the first rank to load the encoders records them, the others find the same
        _record_encoders(tmp_path, encoders)
        _write_or_check_plan(tmp_path, plan)
    after = (tmp_path / PLAN_NAME).stat()
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # never rewritten
    assert json.loads((tmp_path / ENCODERS_NAME).read_text()) == encoders
    with pytest.raises(ValueError, match="other encoders"):
        _record_encoders(tmp_path, {**encoders, "vae": {"class": "AutoencoderKL"}})
    assert json.loads((tmp_path / ENCODERS_NAME).read_text()) == encoders


def test_other_settings_are_refused(preprocessed, pipeline_dir, video_dir):
    out, _ = preprocessed
    with pytest.raises(ValueError, match=r"settings.fps"):
        run(make_config(pipeline_dir, video_dir, out, fps=FPS + 1))


def test_two_processes_split_the_work(preprocessed, pipeline_dir, video_dir, tmp_path):
    out, _ = preprocessed
    split = tmp_path / "split"
    command = [sys.executable, "-m", "sla_dist.cli", "preprocess", "--videos", str(video_dir),
               "--captions", str(video_dir / "captions.json"), "--out", str(split), "--vae", str(pipeline_dir / "vae"),
               "--text-encoder", str(pipeline_dir / "text_encoder"), "--fps", str(FPS), "--clips-per-video", "2",
               "--shard-size", "2", "--text-len", "10", *[a for s in CLIP_SHAPES for a in ("--clip-shape", s)]]
    # one thread each: two processes share the test machine's cores
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    procs = [subprocess.Popen(command + ["--world-size", "2", "--rank", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env),
             subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": "1"})]  # rank 1 from torchrun's variables
    results = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
    assert "rank 0/2: wrote shards [0, 2]" in results[0][0]
    assert "rank 1/2: wrote shards [1, 3]" in results[1][0]
    assert "skipping" in results[0][1] + results[1][1]  # unusable videos are reported
    assert sum("index.json written" in r[0] for r in results) >= 1
    index = load_index(split)
    reference = load_index(out)
    for name in ("shards", "buckets", "num_samples"):
        assert index[name] == reference[name]
    for i in range(4):
        for key, value in load_file(shard_path(split, i)).items():
            torch.testing.assert_close(value, load_file(shard_path(out, i))[key], rtol=0, atol=0)


def test_missing_weights_say_what_is_needed(video_dir, tmp_path, capsys):
    from sla_dist.cli import main

    rc = main(["preprocess", "--videos", str(video_dir), "--captions", str(video_dir / "captions.json"),
               "--out", str(tmp_path / "o"), "--text-encoder", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--vae is required" in err and "AutoencoderKLWan" in err
    assert f"--text-encoder {str(tmp_path / 'nowhere')!r} has no config.json" in err and "umt5" in err
    assert not (tmp_path / "o").exists()
