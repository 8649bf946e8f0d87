"""Shared fixtures of the data tests: a tiny pipeline directory (vae/, text_encoder/, tokenizer/) and a folder of
synthetic videos with captions, one corrupt, one uncaptioned, one too short; built once per session."""

import json
import random

import pytest
import torch

from tests.data.tiny_models import WORDS, save_text_encoder, save_wan_vae
from tests.data.videos import write_video

CLIP_SHAPES = ["5x32x32", "5x32x48", "9x32x48"]
FPS = 8.0


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    seed = torch.seed() % 2**31
    save_wan_vae(root / "vae", seed)
    save_text_encoder(root / "text_encoder", root / "tokenizer", seed)
    return root


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory):
    """Videos of two aspect ratios and lengths in nested folders; captions.json keyed three different ways."""
    root = tmp_path_factory.mktemp("videos")
    rng = random.Random(torch.seed())
    (root / "sub").mkdir()
    # (relative path, frames at 10 fps, height, width): 0.9 s fits 5 frames at 8 fps only; 1.9 s fits 9 frames
    layout = [("a.mp4", 19, 48, 72), ("b.webm", 9, 40, 40), ("sub/c.mp4", 12, 64, 64), ("sub/d.mp4", 19, 40, 60),
              ("e.mp4", 9, 48, 72), ("short.mp4", 3, 32, 32), ("nocaption.mp4", 12, 32, 48)]
    for name, frames, h, w in layout:
        write_video(root / name, frames, 10, h, w, seed=rng.randrange(2**31))
    (root / "broken.mp4").write_bytes(bytes(rng.randrange(256) for _ in range(2000)))
    words = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))  # noqa: E731
    captions = {"a.mp4": words(), "b": words(), "sub/c.mp4": words(), "d.mp4": words(), "e": words(),
                "short.mp4": words(), "broken.mp4": words()}
    (root / "captions.json").write_text(json.dumps(captions))
    return root
