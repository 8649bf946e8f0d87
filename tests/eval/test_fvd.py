"""FVD through torchmetrics' FID machinery: zero for identical sets, growing with a shift, clear input errors."""

import pytest
import torch

from sla_dist.eval.fvd import I3DFeatures, RandomVideoFeatures, VideoFVD, build_extractor, check_videos


def _videos(n: int, t: int = 6, size: int = 16) -> torch.Tensor:
    # smooth random videos: a random colour field plus noise, in [0, 1]
    base = torch.rand(n, 3, 1, 1, 1)
    return (base + 0.3 * torch.rand(n, 3, t, size, size)).clamp(0, 1)


def test_identical_sets_are_zero_and_shift_grows():
    reference = _videos(48)
    fvd = VideoFVD(RandomVideoFeatures(num_features=8), reference)
    same = fvd(reference.clone())
    assert abs(same) < 1e-3
    distances = [fvd((reference + delta).clamp(0, 1)) for delta in (0.05, 0.15, 0.4)]
    assert distances[0] > 10 * max(abs(same), 1e-6)
    assert distances == sorted(distances), distances


def test_reference_features_are_kept_between_calls():
    reference, other = _videos(24), _videos(24)
    fvd = VideoFVD(RandomVideoFeatures(num_features=8), reference)
    first = fvd(other)
    fvd((other * 0.5))
    assert fvd(other) == pytest.approx(first, rel=1e-6)


def test_random_extractor_is_seeded():
    x = torch.rand(3, 3, 4, 16, 16)
    assert torch.equal(RandomVideoFeatures(seed=3)(x), RandomVideoFeatures(seed=3)(x))
    assert not torch.allclose(RandomVideoFeatures(seed=3)(x), RandomVideoFeatures(seed=4)(x))


def test_mismatched_resolution_is_named():
    fvd = VideoFVD(RandomVideoFeatures(num_features=4), _videos(4, size=16))
    with pytest.raises(ValueError, match="3x6x8x8.*3x6x16x16"):
        fvd(_videos(4, size=8))


def test_too_few_videos():
    with pytest.raises(ValueError, match="hold 1 video"):
        VideoFVD(RandomVideoFeatures(), _videos(1))


def test_missing_i3d_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        build_extractor(tmp_path / "i3d.pt")


class _FakeI3D(torch.nn.Module):
    """The I3D detector's calling convention (TorchScript, keyword flags); its 400 "logits" report the input's
    minimum and maximum, so the test sees what reached the detector."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        assert x.shape[-2:] == (224, 224), "I3D input must be 224 x 224"
        assert not rescale and not resize and return_features
        n = x.shape[0]
        lo, hi = x.reshape(n, -1).min(dim=1).values, x.reshape(n, -1).max(dim=1).values
        return torch.cat([lo[:, None], hi[:, None], x.new_zeros(n, 398)], dim=1)


def test_i3d_loads_torchscript_and_needs_ten_frames(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_FakeI3D()), str(path))
    extractor = I3DFeatures(path)
    videos = torch.zeros(2, 3, 10, 20, 30)
    videos[..., :, 15:] = 1.0  # left half black, right half white: survives the centre crop
    features = extractor(videos)
    assert features.shape == (2, 400)
    assert torch.allclose(features[:, :2], torch.tensor([-1.0, 1.0]))  # [0, 1] -> [-1, 1]
    with pytest.raises(ValueError, match="9 frames but I3DFeatures needs at least 10"):
        check_videos(torch.rand(2, 3, 9, 20, 30), extractor, "generated videos")
