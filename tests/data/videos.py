"""Synthetic videos for the data tests: a frame index drawn into every frame, so tests can tell which frames a clip
took, on random per-video colours."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np


def frame_pixels(k: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Frame ``k``: a random smooth background and a bright bar whose row encodes k."""
    base = rng.integers(0, 120, size=3, dtype=np.uint8)
    img = np.broadcast_to(base, (height, width, 3)).copy()
    row = (k * 4) % height
    img[row: row + 4] = 255
    return img


def write_video(path: Path, frames: int, fps: int, height: int, width: int, seed: int,
                paint: Callable[[np.ndarray], None] | None = None, start_frame: int = 0) -> Path:
    """Encode an mp4 / mkv (H.264) or webm (VP9) by suffix; ``paint`` may draw over each frame in place; the
    first frame's timestamp is ``start_frame / fps`` seconds (a stream that starts late)."""
    import av  # optional dependency: the test modules that write videos importorskip it

    rng = np.random.default_rng(seed)
    codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            pixels = frame_pixels(k, height, width, rng)
            if paint is not None:
                paint(pixels)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if start_frame:
                frame.pts, frame.time_base = start_frame + k, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
