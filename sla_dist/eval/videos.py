"""Video files of the evaluation: mp4 (PyAV, optional), exact tensor files (safetensors) and PNG frame grids.

In memory a set of videos is a float tensor [N, 3, T, H, W] in [0, 1]; on disk a video is either an mp4 (lossy,
for people; needs PyAV, ``pip install av``) or a ``.safetensors`` file holding ``video``: uint8 [T, H, W, 3]
(exact, for metrics; always written). A reference directory for FVD may hold either kind.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..files import save_safetensors

VIDEO_SUFFIXES = (".mp4", ".safetensors")


def has_mp4_writer() -> bool:
    """Whether PyAV (an offline mp4 encoder: its wheels bundle FFmpeg with libx264) is importable."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] (any shape) -> uint8 0..255 of the same shape: the one quantisation of eval's videos
    (files, grids, CLIP frames); callers permute to the layout they need."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def frames_hwc(video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] float in [0, 1] -> [T, H, W, 3] uint8 (the layout of video files)."""
    return to_uint8(video).permute(1, 2, 3, 0).contiguous()


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, H, W] float in [0, 1]."""
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"video frames of shape {tuple(frames.shape)} and dtype {frames.dtype} are not uint8 "
                         "[T, H, W, 3]")
    return frames.permute(3, 0, 1, 2).float() / 255


def upscale(videos: torch.Tensor, min_side: int) -> torch.Tensor:
    """Nearest-neighbour upscale [N, 3, T, H, W] by the smallest integer factor giving a side >= ``min_side`` (and
    even sides, which the yuv420p mp4 encoding needs): latent-resolution videos are a few pixels across."""
    h, w = videos.shape[-2:]
    factor = max(1, math.ceil(min_side / min(h, w)))
    if (h * factor) % 2 or (w * factor) % 2:
        factor += 1
    if factor == 1:
        return videos
    return F.interpolate(videos, scale_factor=(1, factor, factor), mode="nearest")


def write_tensor_video(video: torch.Tensor, path: str | Path) -> None:
    """Save [3, T, H, W] in [0, 1] exactly as ``video`` uint8 [T, H, W, 3] in a safetensors file."""
    save_safetensors({"video": frames_hwc(video)}, path)


def write_mp4(video: torch.Tensor, path: str | Path, fps: int = 8) -> None:
    """Encode [3, T, H, W] in [0, 1] (even H and W) as H.264 mp4; raises ImportError naming the install step."""
    try:
        import av
    except ImportError as exc:
        raise ImportError("writing mp4 needs PyAV: pip install av") from exc
    frames = frames_hwc(video).numpy()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def read_video(path: str | Path) -> torch.Tensor:
    """One video file (.mp4 or .safetensors) -> [3, T, H, W] float in [0, 1]."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if "video" not in tensors:
            raise ValueError(f"{str(path)!r} has no 'video' tensor (keys: {sorted(tensors)})")
        return from_uint8(tensors["video"])
    if path.suffix != ".mp4":
        raise ValueError(f"{str(path)!r} is not a video file ({' or '.join(VIDEO_SUFFIXES)})")
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"reading {str(path)!r} needs PyAV: pip install av") from exc
    with av.open(str(path)) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{str(path)!r} has no video frames")
    return from_uint8(torch.stack(frames))


def check_same_shape(videos: list[torch.Tensor], names: list[str], what: str) -> None:
    """All [3, T, H, W] videos of one set must share T, H and W (a metric batch is one tensor)."""
    shapes = {tuple(v.shape): n for v, n in zip(videos, names)}
    if len(shapes) > 1:
        listing = ", ".join(f"{n}: {'x'.join(map(str, s))}" for s, n in shapes.items())
        raise ValueError(f"{what} mix video shapes (C x T x H x W): {listing}; resize or cut them to one shape")


def read_video_dir(directory: str | Path, limit: int | None = None) -> torch.Tensor:
    """Every .mp4 / .safetensors video of ``directory`` (sorted by name, at most ``limit``) -> [N, 3, T, H, W]."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"video directory {str(directory)!r} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"video directory {str(directory)!r} holds no {' or '.join(VIDEO_SUFFIXES)} files")
    files = files[:limit]
    videos = [read_video(p) for p in files]
    check_same_shape(videos, [p.name for p in files], f"the videos of {str(directory)!r}")
    return torch.stack(videos)


def write_grid(videos: torch.Tensor, path: str | Path, max_frames: int = 8, pad: int = 2) -> None:
    """PNG grid: one row per video [N, 3, T, H, W] in [0, 1], ``max_frames`` evenly spaced frames per row."""
    from PIL import Image

    n, _, t, h, w = videos.shape
    picks = torch.linspace(0, t - 1, min(t, max_frames)).round().long()
    canvas = torch.ones(3, n * (h + pad) + pad, len(picks) * (w + pad) + pad)
    for i in range(n):
        for j, f in enumerate(picks.tolist()):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y:y + h, x:x + w] = videos[i, :, f]
    pixels = to_uint8(canvas).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(pixels).save(str(path))
