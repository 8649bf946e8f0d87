"""The built-in synthetic text-to-video set: procedurally rendered moving shapes, captioned, as latent-like tensors.

Each sample is a pure function of (seed, index): a shape (square, disc, ring, cross) of a colour moves in a
direction across a dark background for T frames. The video is rendered at latent resolution straight into C channels
through a fixed RGB -> C mixing matrix (``LatentCodec``), the stand-in for a VAE, so no download or encoder is needed
and the model sees structured, learnable latents; ``LatentCodec.decode`` maps predictions back to RGB for sample
videos. The caption ("a red disc moving left") is embedded by ``CaptionEncoder``: a fixed random word table plus
sinusoidal positions, [text_len, text_dim], the stand-in for umT5.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch.utils.data import Dataset

SHAPES = ("square", "disc", "ring", "cross")
COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1),
           "white": (1.0, 1.0, 1.0), "purple": (0.7, 0.2, 0.9)}
MOTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
VOCAB = ("<pad>", "a", "moving", "slowly", "quickly", *SHAPES, *COLOURS, *MOTIONS)


def _stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (unlike ``hash`` of a tuple)."""
    return zlib.crc32(",".join(map(str, parts)).encode()) * 2654435761 % (2**63 - 1)


class LatentCodec:
    """Fixed linear map between RGB and C latent channels (C >= 3): encode = mixing, decode = its pseudo-inverse."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        if channels < 3:
            raise ValueError(f"channels={channels} must be at least 3 to carry RGB")
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        self.mix = q[:, :3] * math.sqrt(channels / 3)  # [C, 3] orthogonal columns: decode is exact
        self.unmix = torch.linalg.pinv(self.mix)

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """[3, T, H, W] in [0, 1] -> [C, T, H, W] roughly unit-variance latents."""
        return torch.einsum("cr,rthw->cthw", self.mix, rgb * 2 - 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[..., C, T, H, W] -> [..., 3, T, H, W] in [0, 1]."""
        rgb = torch.einsum("rc,...cthw->...rthw", self.unmix.to(latents), latents)
        return ((rgb + 1) / 2).clamp(0, 1)


class CaptionEncoder:
    """Deterministic caption embedding [text_len, text_dim]: word vectors from a fixed table plus positions."""

    def __init__(self, text_dim: int, text_len: int, seed: int = 0) -> None:
        if text_dim < 2 or text_len < 1:
            raise ValueError(f"text_dim={text_dim} must be >= 2 and text_len={text_len} >= 1")
        generator = torch.Generator().manual_seed(seed + 1)
        self.table = torch.randn(len(VOCAB), text_dim, generator=generator)
        self.table[0] = 0
        pos = torch.arange(text_len, dtype=torch.float32)[:, None]
        freqs = torch.exp(-math.log(1e4) * torch.arange(0, text_dim, 2, dtype=torch.float32) / text_dim)
        self.positions = torch.zeros(text_len, text_dim)
        self.positions[:, 0::2] = torch.sin(pos * freqs)
        self.positions[:, 1::2] = torch.cos(pos * freqs)[:, : text_dim // 2]
        self.text_len = text_len

    def __call__(self, caption: str) -> torch.Tensor:
        words = caption.lower().split()
        unknown = [w for w in words if w not in VOCAB]
        if unknown:
            raise ValueError(f"caption {caption!r} has words outside the synthetic vocabulary: {unknown}")
        ids = torch.tensor([VOCAB.index(w) for w in words][: self.text_len], dtype=torch.long)
        ids = torch.cat([ids, ids.new_zeros(self.text_len - len(ids))])
        return (self.table[ids] + self.positions) * (ids != 0)[:, None]


def _mask(shape: str, dy: torch.Tensor, dx: torch.Tensor, radius: float) -> torch.Tensor:
    """Soft mask of ``shape`` centred at the origin of offsets dy, dx (pixels), anti-aliased over one pixel."""
    if shape == "square":
        dist = torch.maximum(dy.abs(), dx.abs()) - radius
    elif shape == "disc":
        dist = torch.sqrt(dy**2 + dx**2) - radius
    elif shape == "ring":
        dist = (torch.sqrt(dy**2 + dx**2) - radius * 0.7).abs() - radius * 0.3
    else:  # cross
        dist = torch.minimum(torch.maximum(dy.abs() - radius, dx.abs() - radius / 3),
                             torch.maximum(dy.abs() - radius / 3, dx.abs() - radius))
    return (0.5 - dist).clamp(0, 1)


def render(index: int, seed: int, frames: int, height: int, width: int) -> tuple[torch.Tensor, str]:
    """RGB video [3, T, H, W] in [0, 1] and its caption, a pure function of (seed, index)."""
    g = torch.Generator().manual_seed(_stable_seed(seed, index))
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    shape, colour, motion = SHAPES[pick(len(SHAPES))], list(COLOURS)[pick(len(COLOURS))], list(MOTIONS)[pick(4)]
    fast = pick(2) == 1
    radius = max(1.0, min(height, width) * (0.15 + 0.1 * float(torch.rand((), generator=g))))
    y0, x0 = (float(torch.rand((), generator=g)) * s for s in (height, width))
    speed = (0.25 if fast else 0.1) * min(height, width)
    vy, vx = MOTIONS[motion]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    background = 0.1 + 0.05 * float(torch.rand((), generator=g))
    video = torch.full((3, frames, height, width), background)
    rgb = torch.tensor(COLOURS[colour])[:, None, None]
    for t in range(frames):
        # positions wrap around the frame, so a shape never leaves the video
        cy, cx = (y0 + vy * speed * t) % height, (x0 + vx * speed * t) % width
        dy = (ys - cy + height / 2) % height - height / 2
        dx = (xs - cx + width / 2) % width - width / 2
        m = _mask(shape, dy, dx, radius)
        video[:, t] = video[:, t] * (1 - m) + rgb * m
    caption = f"a {colour} {shape} moving {'quickly' if fast else 'slowly'} {motion}"
    return video, caption


class SyntheticVideoDataset(Dataset):
    """``num_samples`` captioned moving-shape videos as {'latents' [C, T, H, W], 'text' [Lt, text_dim], 'index'}."""

    def __init__(self, num_samples: int, channels: int, frames: int, height: int, width: int, text_dim: int,
                 text_len: int, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be positive")
        self.num_samples, self.frames, self.height, self.width, self.seed = num_samples, frames, height, width, seed
        self.codec = LatentCodec(channels, seed)
        self.encoder = CaptionEncoder(text_dim, text_len, seed)

    def __len__(self) -> int:
        return self.num_samples

    def caption(self, index: int) -> str:
        return render(index, self.seed, 1, 4, 4)[1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for {self.num_samples} samples")
        video, caption = render(index, self.seed, self.frames, self.height, self.width)
        text = self.encoder(caption)
        # the encoder zeroes exactly the padding rows (real rows are a word vector plus a position, never zero)
        return {"latents": self.codec.encode(video), "text": text, "text_mask": text.ne(0).any(-1), "index": index}
