"""The built-in synthetic text-to-video set: procedurally rendered moving shapes, captioned, as latent-like tensors.

Each sample is a pure function of (seed, index): a shape (square, disc, ring, cross) of a colour moves in a
direction for T frames, over one of two scenes (``SCENES``):

* ``plain`` (the default, the original set): a flat dark background. Most tokens of a clip are then identical, so
  a model trained on it has no reason to attend locally and its attention stays diffuse;
* ``textured``: a procedural texture (random-phase plane waves at three scales, 1/f amplitudes, colour varying in
  space) seen through a camera panning in a random direction at a random sub-pixel speed, as real footage is: a
  token's content is its neighbourhood's and, in the next frame, a nearby token's, which is what gives real video
  DiTs their concentrated (local plus correspondence) attention. The texture is evaluated analytically at the
  panned coordinates, so frame t + 1 is frame t shifted by exactly the pan, with no resampling blur. The caption
  adds the pan's direction ("... panning up left"). The video is rendered at latent resolution straight into C channels
through a fixed RGB -> C mixing matrix (``LatentCodec``), the stand-in for a VAE, so no download or encoder is needed
and the model sees structured, learnable latents; ``LatentCodec.decode`` maps predictions back to RGB for sample
videos. The caption ("a red disc moving left") is embedded by ``CaptionEncoder``: a fixed random word table plus
sinusoidal positions, [text_len, text_dim], the stand-in for umT5.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import cast

import torch
from torch.utils.data import Dataset

SHAPES = ("square", "disc", "ring", "cross")
COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1),
           "white": (1.0, 1.0, 1.0), "purple": (0.7, 0.2, 0.9)}
MOTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
SCENES = ("plain", "textured")
_PLAIN_VOCAB = ("<pad>", "a", "moving", "slowly", "quickly", *SHAPES, *COLOURS, *MOTIONS)
VOCAB = (*_PLAIN_VOCAB, "panning")
"""Words of the captions; those after the plain scene's take their embedding rows after its rows (CaptionEncoder),
so plain captions embed as they did before the textured scene existed."""


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
        plain = torch.randn(len(_PLAIN_VOCAB), text_dim, generator=generator)
        self.table = torch.cat([plain, torch.randn(len(VOCAB) - len(plain), text_dim, generator=generator)])
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


def _check_scene(scene: str) -> None:
    if scene not in SCENES:
        raise ValueError(f"scene={scene!r} is not one of {SCENES}")


@dataclass(frozen=True)
class Texture:
    """The textured scene's background: a sum of plane waves, seen by a camera moving ``pan`` = (vy, vx) pixels per
    frame, so frame t shows the texture at (y + vy t, x + vx t) and its content moves by -pan on screen."""

    base: torch.Tensor
    """[3] mean RGB."""
    waves: torch.Tensor
    """[K, 2] wave vectors (ky, kx), radians per pixel."""
    phases: torch.Tensor
    """[K]."""
    colours: torch.Tensor
    """[K, 3] each wave's amplitude per RGB channel: hue varies across the frame."""
    pan: tuple[float, float]

    OCTAVES = 3
    WAVES_PER_OCTAVE = 8

    @classmethod
    def draw(cls, g: torch.Generator, height: int, width: int) -> Texture:
        """A random texture and pan from ``g``; the number of draws does not depend on the frame size, so a clip's
        caption is the same at any size."""
        rand = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731
        angle, speed = 2 * math.pi * float(rand()), float(rand())
        size = min(height, width)
        # up to 4 % of the frame per frame: a slow to brisk pan (a full-width pan over ~25 latent frames at most)
        speed = size * (0.005 + 0.035 * speed)
        k = cls.OCTAVES * cls.WAVES_PER_OCTAVE
        # wavelengths of 1/2, 1/4 and 1/8 of the frame (+-25 %), any orientation, amplitudes ~ wavelength (1/f)
        octave = torch.arange(cls.OCTAVES, dtype=torch.float32).repeat_interleave(cls.WAVES_PER_OCTAVE)
        wavelength = size / 2 * 0.5**octave * (0.8 + 0.45 * rand(k))
        direction = 2 * math.pi * rand(k)
        waves = (2 * math.pi / wavelength)[:, None] * torch.stack([direction.sin(), direction.cos()], 1)
        amplitude = 0.5**octave
        # a per-channel std of ~0.15 for the sum (K / 2 of the squared amplitudes, times the colour weights')
        amplitude = amplitude * 0.15 / math.sqrt(float(amplitude.square().sum()) / 2)
        colours = amplitude[:, None] * (0.4 + 1.2 * rand(k, 3))
        base = 0.25 + 0.2 * rand(3)
        return cls(base, waves, 2 * math.pi * rand(k), colours, (speed * math.sin(angle), speed * math.cos(angle)))

    def render(self, frames: int, height: int, width: int) -> torch.Tensor:
        """RGB frames [3, T, H, W] in [0, 1]."""
        t = torch.arange(frames, dtype=torch.float32)
        ys = torch.arange(height, dtype=torch.float32)[None, :] + self.pan[0] * t[:, None]  # [T, H]
        xs = torch.arange(width, dtype=torch.float32)[None, :] + self.pan[1] * t[:, None]  # [T, W]
        # sin(a + b) = sin a cos b + cos a sin b: sines along rows and columns only, then one contraction
        a = self.waves[:, 0, None, None] * ys + self.phases[:, None, None]  # [K, T, H]
        b = self.waves[:, 1, None, None] * xs  # [K, T, W]
        waves = (torch.einsum("kc,kth,ktw->cthw", self.colours, a.sin(), b.cos())
                 + torch.einsum("kc,kth,ktw->cthw", self.colours, a.cos(), b.sin()))
        return (self.base[:, None, None, None] + waves).clamp(0, 1)

    def pan_words(self) -> str:
        """The pan's direction as caption words, to the nearest of 8 compass directions ("up left", "right")."""
        angle = round(math.atan2(self.pan[0], self.pan[1]) / (math.pi / 4)) * math.pi / 4
        vertical = {1: "down", -1: "up"}.get(round(math.sin(angle)))
        horizontal = {1: "right", -1: "left"}.get(round(math.cos(angle)))
        return " ".join(w for w in (vertical, horizontal) if w)


@dataclass(frozen=True)
class _Layout:
    """The random choices of one clip (its shape, motion and scene), in the order they are drawn."""

    shape: str
    colour: str
    motion: str
    fast: bool
    radius: float
    start: tuple[float, float]
    background: float
    texture: Texture | None


def _layout(index: int, seed: int, height: int, width: int, scene: str) -> _Layout:
    _check_scene(scene)
    g = torch.Generator().manual_seed(_stable_seed(seed, index))
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    shape, colour, motion = SHAPES[pick(len(SHAPES))], list(COLOURS)[pick(len(COLOURS))], list(MOTIONS)[pick(4)]
    fast = pick(2) == 1
    radius = max(1.0, min(height, width) * (0.15 + 0.1 * float(torch.rand((), generator=g))))
    y0, x0 = (float(torch.rand((), generator=g)) * s for s in (height, width))
    background = 0.1 + 0.05 * float(torch.rand((), generator=g))
    # the texture draws last: a clip's shape and motion are the same in both scenes
    texture = Texture.draw(g, height, width) if scene == "textured" else None
    return _Layout(shape, colour, motion, fast, radius, (y0, x0), background, texture)


def scene_texture(index: int, seed: int, height: int, width: int) -> Texture:
    """The background (and pan) of clip ``index`` of the textured scene."""
    return cast(Texture, _layout(index, seed, height, width, "textured").texture)


def render(index: int, seed: int, frames: int, height: int, width: int,
           scene: str = "plain") -> tuple[torch.Tensor, str]:
    """RGB video [3, T, H, W] in [0, 1] and its caption, a pure function of (seed, index) in ``scene``."""
    clip = _layout(index, seed, height, width, scene)
    speed = (0.25 if clip.fast else 0.1) * min(height, width)
    vy, vx = MOTIONS[clip.motion]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    if clip.texture is None:
        video = torch.full((3, frames, height, width), clip.background)
    else:
        video = clip.texture.render(frames, height, width)
    rgb = torch.tensor(COLOURS[clip.colour])[:, None, None]
    y0, x0 = clip.start
    for t in range(frames):
        # positions wrap around the frame, so a shape never leaves the video
        cy, cx = (y0 + vy * speed * t) % height, (x0 + vx * speed * t) % width
        dy = (ys - cy + height / 2) % height - height / 2
        dx = (xs - cx + width / 2) % width - width / 2
        m = _mask(clip.shape, dy, dx, clip.radius)
        video[:, t] = video[:, t] * (1 - m) + rgb * m
    caption = f"a {clip.colour} {clip.shape} moving {'quickly' if clip.fast else 'slowly'} {clip.motion}"
    if clip.texture is not None:
        caption += f" panning {clip.texture.pan_words()}"
    return video, caption


class SyntheticVideoDataset(Dataset):
    """``num_samples`` captioned moving-shape videos as {'latents' [C, T, H, W], 'text' [Lt, text_dim], 'index'},
    over the ``scene`` of ``SCENES`` ('plain', the default, or 'textured': module docstring)."""

    def __init__(self, num_samples: int, channels: int, frames: int, height: int, width: int, text_dim: int,
                 text_len: int, seed: int = 0, scene: str = "plain") -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be positive")
        _check_scene(scene)
        self.num_samples, self.frames, self.height, self.width, self.seed = num_samples, frames, height, width, seed
        self.scene = scene
        self.codec = LatentCodec(channels, seed)
        self.encoder = CaptionEncoder(text_dim, text_len, seed)

    def __len__(self) -> int:
        return self.num_samples

    def caption(self, index: int) -> str:
        return render(index, self.seed, 1, 4, 4, self.scene)[1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for {self.num_samples} samples")
        video, caption = render(index, self.seed, self.frames, self.height, self.width, self.scene)
        text = self.encoder(caption)
        # the encoder zeroes exactly the padding rows (real rows are a word vector plus a position, never zero)
        return {"latents": self.codec.encode(video), "text": text, "text_mask": text.ne(0).any(-1), "index": index}
