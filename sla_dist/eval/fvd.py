"""Fréchet Video Distance through torchmetrics' ``FrechetInceptionDistance`` with a video feature extractor.

torchmetrics has no FVD, but its FID accepts any ``nn.Module`` as the feature extractor and only needs the
features: it accumulates their mean and covariance per set and computes the Fréchet distance. So FVD here is that
metric fed with videos [N, 3, T, H, W] in [0, 1] and one of two extractors:

* :class:`I3DFeatures`: the standard one, the I3D TorchScript detector used by StyleGAN-V and later FVD code
  (400-d logits of Kinetics-400, clips resized to 224 x 224, scaled to [-1, 1], at least 10 frames). It cannot be
  downloaded here: the user passes its path.
* :class:`RandomVideoFeatures`: a fixed, seeded random 3D-conv network, for tests and relative comparisons (e.g.
  dense vs SLA fine-tunes of one model); its numbers are not comparable with published FVDs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

I3D_SIZE = 224
I3D_MIN_FRAMES = 10


class RandomVideoFeatures(nn.Module):
    """Two strided 3D convolutions and a linear layer with seeded random weights -> [N, num_features].

    Random conv features still separate distributions of colour, texture and motion, which is what a relative FVD
    between checkpoints needs; keep ``num_features`` well below the number of videos, or the covariances are
    rank-deficient and the distance noisy."""

    min_frames = 1

    def __init__(self, num_features: int = 32, seed: int = 0) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features={num_features} must be positive")
        self.num_features = num_features
        self.net = nn.Sequential(
            nn.Conv3d(3, 16, kernel_size=3, stride=(1, 2, 2), padding=1), nn.ReLU(),
            nn.Conv3d(16, 32, kernel_size=3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, num_features))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                # He-style scale per fan-in, so the features neither vanish nor explode through the ReLUs
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=generator) * (2 / fan_in) ** 0.5)
        self.requires_grad_(False).eval()

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.net(videos.float() * 2 - 1)


class I3DFeatures(nn.Module):
    """The I3D TorchScript FVD detector (``i3d_torchscript.pt``) loaded from ``path`` -> [N, 400] logits.

    ``torch.jit.load`` runs code stored in the file, like unpickling: load only a detector file you trust."""

    min_frames = I3D_MIN_FRAMES
    num_features = 400

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"I3D detector {str(path)!r} not found. FVD's standard extractor is the I3D TorchScript file "
                "'i3d_torchscript.pt' (StyleGAN-V's FVD detector); these machines cannot download it, so fetch it "
                "where you have internet access and pass its path (--i3d PATH). Without it, FVD uses the random "
                "3D-conv extractor, whose numbers are only comparable with each other.")
        self.detector = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = videos.shape
        # shorter side to 224 (bilinear, per frame), then a centred 224 x 224 crop, then [0, 1] -> [-1, 1]
        scale = I3D_SIZE / min(h, w)
        size = (max(I3D_SIZE, round(h * scale)), max(I3D_SIZE, round(w * scale)))
        frames = videos.float().transpose(1, 2).reshape(n * t, c, h, w)
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
        top, left = (size[0] - I3D_SIZE) // 2, (size[1] - I3D_SIZE) // 2
        frames = frames[..., top:top + I3D_SIZE, left:left + I3D_SIZE]
        clips = frames.reshape(n, t, c, I3D_SIZE, I3D_SIZE).transpose(1, 2) * 2 - 1
        return self.detector(clips.contiguous(), rescale=False, resize=False, return_features=True)


def check_videos(videos: torch.Tensor, extractor: nn.Module, what: str) -> None:
    """ValueError naming the problem unless ``videos`` is [N >= 2, 3, T >= extractor.min_frames, H, W]."""
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"{what} of shape {tuple(videos.shape)} are not videos [N, 3, T, H, W]")
    if videos.shape[0] < 2:
        raise ValueError(f"{what} hold {videos.shape[0]} video(s); FVD needs at least 2 per set (a covariance)")
    min_frames = getattr(extractor, "min_frames", 1)
    if videos.shape[2] < min_frames:
        raise ValueError(f"{what} have {videos.shape[2]} frames but {type(extractor).__name__} needs at least "
                         f"{min_frames}")


class VideoFVD:
    """FVD of generated sets against one reference set, whose features are extracted once.

    ``fvd = VideoFVD(RandomVideoFeatures(), reference); fvd(generated_a); fvd(generated_b)``."""

    def __init__(self, extractor: nn.Module, reference: torch.Tensor, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        check_videos(reference, extractor, "reference videos")
        self.extractor, self.batch_size = extractor, batch_size
        self.shape = tuple(reference.shape[1:])
        self.num_reference = reference.shape[0]
        # the metric's feature sums live where the extractor runs
        self.device = next(extractor.parameters(), torch.empty(0)).device
        self.metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False).to(self.device)
        self._update(reference, real=True)

    def _update(self, videos: torch.Tensor, real: bool) -> None:
        with torch.no_grad():
            for batch in videos.split(self.batch_size):
                self.metric.update(batch.to(self.device), real=real)

    def __call__(self, generated: torch.Tensor) -> float:
        check_videos(generated, self.extractor, "generated videos")
        if tuple(generated.shape[1:]) != self.shape:
            raise ValueError(f"generated videos are {'x'.join(map(str, generated.shape[1:]))} (C x T x H x W) but "
                             f"the reference videos are {'x'.join(map(str, self.shape))}; FVD compares videos of "
                             "one resolution and length: resize or cut one set to the other's shape")
        self.metric.reset()  # keeps the reference features (reset_real_features=False)
        self._update(generated, real=False)
        return float(self.metric.compute())


def build_extractor(i3d: str | Path | None = None, seed: int = 0) -> nn.Module:
    """The I3D detector at ``i3d`` when given, else the seeded random 3D-conv extractor."""
    return I3DFeatures(i3d) if i3d is not None else RandomVideoFeatures(seed=seed)
