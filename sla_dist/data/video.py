"""Reading videos (mp4, webm, anything FFmpeg decodes) with PyAV and sampling fixed-size clips from them.

A clip is ``frames`` frames at ``fps`` frames per second, resized to cover ``height x width`` (aspect ratio kept)
and centre-cropped, returned as a float tensor [3, frames, height, width] in [-1, 1] (what video VAEs take). Each
video is matched to one of several clip shapes (the buckets): the one whose aspect ratio is closest among those
the video is long enough for, preferring more frames. Frames are converted and scaled one at a time by FFmpeg's
scaler, so memory holds only the output clip, whatever the source resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")


class VideoError(ValueError):
    """A video that cannot give a clip (unreadable, no video stream, too short): reported and skipped."""


@dataclass(frozen=True)
class ClipShape:
    """Pixel size of a clip: ``frames`` x ``height`` x ``width``, written ``FxHxW`` on the command line."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"clip {name}={value!r} must be a positive integer")

    @classmethod
    def parse(cls, text: str) -> ClipShape:
        """``"81x480x832"`` -> ClipShape(81, 480, 832)."""
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"clip shape {text!r} must be FRAMESxHEIGHTxWIDTH, e.g. 81x480x832")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class VideoInfo:
    """Stream facts needed to choose clips."""

    duration: float
    """Seconds."""

    fps: float
    """Average source frame rate."""

    height: int
    width: int


def _open(path: str | Path):
    import av  # optional dependency of preprocessing only

    try:
        container = av.open(str(path))
    except Exception as exc:  # FFmpeg raises a family of errors (invalid data, EOF, permissions, ...)
        raise VideoError(f"cannot open {str(path)!r}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{str(path)!r} has no video stream")
    return container


def _start_time(stream) -> float:
    """Seconds of the stream's first timestamp (0 if unknown): clip times are relative to it."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def probe(path: str | Path) -> VideoInfo:
    """Duration (from the stream's first timestamp), frame rate and size of the first video stream (VideoError if
    they cannot be determined)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)  # a length, already relative to the start
        elif container.duration is not None:
            # container duration is in microseconds; Matroska / WebM report the end time, which includes a late
            # start (subtracting it errs short where it is a length: clips then fit for sure)
            duration = max(container.duration / 1_000_000 - _start_time(stream), 0.0)
        elif stream.frames and fps > 0:
            duration = stream.frames / fps
        else:
            duration = 0.0
        height, width = stream.codec_context.height, stream.codec_context.width
    if not (fps > 0 and duration > 0 and height > 0 and width > 0):
        raise VideoError(f"{str(path)!r}: cannot determine duration/frame rate/size "
                         f"(duration={duration}, fps={fps}, {width}x{height})")
    return VideoInfo(duration=duration, fps=fps, height=height, width=width)


def choose_shape(info: VideoInfo, shapes: list[ClipShape], fps: float) -> ClipShape:
    """The clip shape for a video: closest aspect ratio among shapes it is long enough for, then most frames."""
    fitting = [s for s in shapes if (s.frames - 1) / fps <= info.duration]
    if not fitting:
        shortest = min(shapes, key=lambda s: s.frames)
        raise VideoError(f"video of {info.duration:.2f}s is shorter than the shortest clip {shortest} at {fps} fps "
                         f"({(shortest.frames - 1) / fps:.2f}s)")
    aspect = math.log(info.width / info.height)
    return min(fitting, key=lambda s: (round(abs(aspect - math.log(s.width / s.height)), 6), -s.frames))


def clip_starts(duration: float, clip_seconds: float, count: int) -> list[float]:
    """Start times of ``count`` clips of ``clip_seconds`` spread evenly over the video: clip k centred in the k-th of
    ``count`` equal parts of the range of valid starts (one clip: the middle of the video)."""
    slack = max(duration - clip_seconds, 0.0)
    return [slack * (k + 0.5) / count for k in range(count)]


def read_clip(path: str | Path, shape: ClipShape, fps: float, start: float) -> torch.Tensor:
    """Decode ``shape.frames`` frames at ``fps`` from ``start`` seconds -> float [3, F, H, W] in [-1, 1].

    Output frame k shows the source frame on screen at ``start + k / fps`` (the last one whose timestamp is not
    later), times counted from the stream's first timestamp (``stream.start_time``, which need not be 0). VideoError
    if the video is unreadable or ends before the clip does.
    """
    out = np.empty((shape.frames, shape.height, shape.width, 3), dtype=np.uint8)
    filled = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        t0 = _start_time(stream)
        targets = [t0 + start + k / fps for k in range(shape.frames)]
        scaled = _cover_size(stream.codec_context.height, stream.codec_context.width, shape)
        if start > 0 and stream.time_base is not None:
            # jump to the keyframe before the clip instead of decoding the whole prefix
            container.seek(int((t0 + start) / stream.time_base), stream=stream, backward=True, any_frame=False)
        shown, shown_rgb = None, None
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                while filled < shape.frames and shown is not None and frame.time > targets[filled] + 1e-6:
                    if shown_rgb is None:
                        shown_rgb = _scaled_crop(shown, scaled, shape)
                    out[filled] = shown_rgb
                    filled += 1
                if filled == shape.frames:
                    break
                shown, shown_rgb = frame, None
        except Exception as exc:  # a stream that breaks mid-way: report it like an unreadable file
            raise VideoError(f"{str(path)!r}: decoding failed after {filled} of {shape.frames} frames: {exc}") from exc
        # the last frame stays on screen for one source frame period
        while filled < shape.frames and shown is not None and \
                targets[filled] <= shown.time + 1 / float(stream.average_rate or fps) + 1e-6:
            if shown_rgb is None:
                shown_rgb = _scaled_crop(shown, scaled, shape)
            out[filled] = shown_rgb
            filled += 1
    if filled < shape.frames:
        raise VideoError(f"{str(path)!r} ends after {filled} of {shape.frames} frames of a clip starting at "
                         f"{start:.2f}s at {fps} fps")
    clip = torch.from_numpy(out).permute(3, 0, 1, 2).float()
    return clip / 127.5 - 1.0


def _cover_size(height: int, width: int, shape: ClipShape) -> tuple[int, int]:
    """Smallest (h, w) with the source aspect ratio that covers the clip's height and width."""
    scale = max(shape.height / height, shape.width / width)
    return max(shape.height, round(height * scale)), max(shape.width, round(width * scale))


def _scaled_crop(frame, scaled: tuple[int, int], shape: ClipShape) -> np.ndarray:
    rgb = frame.to_ndarray(height=scaled[0], width=scaled[1], format="rgb24", interpolation="BICUBIC")
    top, left = (scaled[0] - shape.height) // 2, (scaled[1] - shape.width) // 2
    return rgb[top: top + shape.height, left: left + shape.width]


def list_videos(source: str | Path) -> list[str]:
    """Input list: the video files under a directory (recursive, sorted), or the lines of a text file of paths
    (relative paths are relative to that file; blank lines and lines starting with '#' are ignored)."""
    source = Path(source)
    if source.is_dir():
        return sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if source.is_file():
        lines = [ln.strip() for ln in source.read_text().splitlines()]
        return [str(source.parent / ln) if not Path(ln).is_absolute() else ln
                for ln in lines if ln and not ln.startswith("#")]
    raise FileNotFoundError(f"--videos {str(source)!r} is neither a directory of videos nor a file listing them")
