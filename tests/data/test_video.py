"""Video reading: which source frames a clip shows, resizing and cropping, clip shapes, unreadable inputs."""

import math
import random

import pytest
import torch

from sla_dist.data.video import (ClipShape, VideoError, VideoInfo, choose_shape, clip_starts, list_videos, probe,
                                 read_clip)
from tests.data.videos import write_video

pytest.importorskip("av", reason="reading videos needs PyAV: pip install av (the 'data' extra)")


def bar_frames(clip: torch.Tensor) -> list[int]:
    """The source frame index each frame shows, from the centre of its 4-row bright bar (rows 4k .. 4k + 3): lossy
    codecs may dim the bar's edge rows, which moves its first row but hardly its centre."""
    bright = ((clip.min(0).values > 0.8).float().mean(-1) > 0.5).float()  # [F, H]
    rows = torch.arange(bright.shape[-1], dtype=torch.float32)
    centre = (bright * rows).sum(-1) / bright.sum(-1).clamp_min(1)
    return torch.round((centre - 1.5) / 4).long().tolist()


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_clip_shows_the_frame_on_screen_at_each_time(tmp_path, suffix):
    seed = random.randrange(2**32)  # a new case each run, reproducible from the message below
    rng = random.Random(seed)
    src_fps, fps = rng.choice([10, 12, 15]), rng.choice([4.0, 5.0, 7.5])
    frames = 6
    path = write_video(tmp_path / f"v{suffix}", 30, src_fps, 128, 64, seed=rng.randrange(2**31))
    info = probe(path)
    assert (info.height, info.width) == (128, 64) and info.fps == src_fps
    assert info.duration == pytest.approx(30 / src_fps, abs=1e-3)
    start = rng.uniform(0, 30 / src_fps - (frames - 1) / fps - 0.1)
    clip = read_clip(path, ClipShape(frames, 128, 64), fps, start)
    assert clip.shape == (3, frames, 128, 64) and clip.min() >= -1 and clip.max() <= 1
    shown = [math.floor((start + k / fps) * src_fps + 1e-6) for k in range(frames)]
    assert bar_frames(clip) == shown, f"seed {seed}"


@pytest.mark.parametrize("suffix", [".mkv", ".webm", ".mp4"])
def test_times_count_from_a_late_stream_start(tmp_path, suffix):
    # the first frame is at 2.0 s: start=0 is that frame, and the duration excludes the 2 s before it
    path = write_video(tmp_path / f"late{suffix}", 20, 10, 64, 32, seed=3, start_frame=20)
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert float(stream.start_time * stream.time_base) == pytest.approx(2.0)
    info = probe(path)
    assert info.duration == pytest.approx(2.0, abs=1e-3)
    assert bar_frames(read_clip(path, ClipShape(4, 64, 32), 5.0, 0.0)) == [0, 2, 4, 6]
    assert bar_frames(read_clip(path, ClipShape(3, 64, 32), 10.0, 1.2)) == [12, 13, 14]  # seeks
    with pytest.raises(VideoError, match="ends after"):
        read_clip(path, ClipShape(4, 64, 32), 5.0, 1.5)


def test_resize_covers_then_centre_crops(tmp_path):
    def paint(pixels):
        pixels[:, : pixels.shape[1] // 8] = (0, 255, 0)  # a green stripe in the left eighth

    path = write_video(tmp_path / "wide.mp4", 5, 10, 40, 80, seed=0, paint=paint)
    full = read_clip(path, ClipShape(1, 20, 40), 10.0, 0.0)  # same aspect: nothing cropped
    cropped = read_clip(path, ClipShape(1, 32, 32), 10.0, 0.0)  # scaled to 32x64, middle 32 columns kept
    green = lambda c: (c[1] - c[0] > 1.0).float().mean().item()  # noqa: E731
    assert green(full) == pytest.approx(1 / 8, abs=0.03)
    assert cropped.shape == (3, 1, 32, 32) and green(cropped) == 0


def test_unreadable_and_short_videos_raise_video_error(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(random.Random(torch.seed()).randrange(256) for _ in range(1000)))
    with pytest.raises(VideoError, match="broken.mp4"):
        probe(broken)
    with pytest.raises(VideoError, match="missing.mp4"):
        read_clip(tmp_path / "missing.mp4", ClipShape(1, 8, 8), 8.0, 0.0)
    path = write_video(tmp_path / "short.mp4", 5, 10, 16, 16, seed=1)
    with pytest.raises(VideoError, match="ends after 4 of 8 frames"):
        read_clip(path, ClipShape(8, 16, 16), 10.0, 0.2)  # frames 2, 3, 4, and 4 held to the end (0.5 s)


def test_choose_shape_by_aspect_then_length():
    shapes = [ClipShape.parse(s) for s in ("9x32x48", "17x32x48", "17x48x32", "5x32x32")]
    wide = VideoInfo(duration=1.5, fps=10, height=720, width=1280)
    assert choose_shape(wide, shapes, fps=8.0) == shapes[0]  # 17 frames need 2 s
    assert choose_shape(VideoInfo(3.0, 10, 720, 1280), shapes, 8.0) == shapes[1]
    assert choose_shape(VideoInfo(3.0, 10, 1280, 720), shapes, 8.0) == shapes[2]
    assert choose_shape(VideoInfo(1.0, 10, 1280, 720), shapes, 8.0) == shapes[3]  # only the short square fits
    with pytest.raises(VideoError, match="shorter than the shortest clip 5x32x32"):
        choose_shape(VideoInfo(0.4, 10, 100, 100), shapes, 8.0)


def test_clip_starts_spread_over_the_video():
    assert clip_starts(10.0, 2.0, 1) == [4.0]
    assert clip_starts(10.0, 2.0, 4) == [1.0, 3.0, 5.0, 7.0]
    assert clip_starts(1.0, 2.0, 2) == [0.0, 0.0]


def test_clip_shape_parsing():
    assert ClipShape.parse("81x480X832") == ClipShape(81, 480, 832) and str(ClipShape(1, 2, 3)) == "1x2x3"
    for bad in ("81x480", "axbxc", "0x8x8"):
        with pytest.raises(ValueError, match="clip"):
            ClipShape.parse(bad)


def test_list_videos_from_directory_and_list_file(tmp_path):
    (tmp_path / "d" / "deep").mkdir(parents=True)
    for name in ("d/b.mp4", "d/a.WEBM", "d/deep/c.mkv", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_videos(tmp_path / "d") == [str(tmp_path / n) for n in ("d/a.WEBM", "d/b.mp4", "d/deep/c.mkv")]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# inputs\nd/b.mp4\n\n{tmp_path / 'x.mp4'}\n")
    assert list_videos(listing) == [str(tmp_path / "d/b.mp4"), str(tmp_path / "x.mp4")]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_videos(tmp_path / "nowhere")
