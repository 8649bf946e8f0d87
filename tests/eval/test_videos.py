"""Video files: exact safetensors round trip, mp4 round trip (with PyAV), grids, reference-directory errors."""

from pathlib import Path

import pytest
import torch
from PIL import Image

import sla_dist.eval
from sla_dist.eval.videos import (read_video, read_video_dir, to_uint8, upscale, write_grid, write_mp4,
                                  write_tensor_video)


def _video(t: int = 5, h: int = 16, w: int = 24) -> torch.Tensor:
    return (torch.rand(3, t, h, w) * 255).round() / 255  # exactly representable in uint8


def test_tensor_video_round_trip_is_exact(tmp_path):
    video = _video()
    write_tensor_video(video, tmp_path / "a.safetensors")
    assert torch.equal(read_video(tmp_path / "a.safetensors"), video)


def test_mp4_round_trip(tmp_path):
    pytest.importorskip("av")
    video = upscale(torch.rand(1, 3, 1, 1, 1).expand(1, 3, 6, 8, 8).contiguous(), 32)[0]
    write_mp4(video, tmp_path / "a.mp4")
    back = read_video(tmp_path / "a.mp4")
    assert back.shape == video.shape
    assert (back - video).abs().mean() < 0.03  # lossy, but a flat colour survives


def test_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        read_video_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no .mp4 or .safetensors"):
        read_video_dir(tmp_path)
    write_tensor_video(_video(h=16), tmp_path / "a.safetensors")
    write_tensor_video(_video(h=8), tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"a.safetensors: 3x5x16x24, b.safetensors: 3x5x8x24"):
        read_video_dir(tmp_path)


def test_directory_reads_sorted_and_limited(tmp_path):
    videos = [_video() for _ in range(3)]
    for i, v in enumerate(videos):
        write_tensor_video(v, tmp_path / f"{i}.safetensors")
    (tmp_path / "notes.txt").write_text("ignored")
    assert torch.equal(read_video_dir(tmp_path, limit=2), torch.stack(videos[:2]))


def test_upscale_and_grid(tmp_path):
    videos = torch.rand(2, 3, 10, 5, 7)
    big = upscale(videos, 16)
    assert big.shape[-2:] == (20, 28) and torch.equal(big[..., ::4, ::4], videos)
    write_grid(videos, tmp_path / "g.png", max_frames=4, pad=1)
    assert Image.open(tmp_path / "g.png").size == (4 * 8 + 1, 2 * 6 + 1)


def test_one_uint8_quantisation_for_files_grids_and_clip():
    pixels = torch.tensor([[-0.5, 0.0, 0.6 / 255, 0.3], [0.999, 1.0, 1.7, 0.5]])
    assert torch.equal(to_uint8(pixels), torch.tensor([[0, 0, 1, 76], [255, 255, 255, 128]], dtype=torch.uint8))
    assert to_uint8(torch.rand(3, 2, 4, 5)).shape == (3, 2, 4, 5)  # the layout is the caller's
    # no other copy of the conversion in the eval package
    sources = [p.read_text() for p in Path(sla_dist.eval.__file__).parent.glob("*.py")]
    assert sum(src.count("* 255).round()") for src in sources) == 1
