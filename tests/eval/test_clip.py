"""CLIP score through torchmetrics' CLIPScore from a local tiny random CLIP, checked by hand."""

import pytest
import torch

from sla_dist.eval.clip import clip_score, local_clip
from tests.eval.helpers import tiny_clip_dir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


@torch.no_grad()
def _hand_score(clip_dir, videos, prompts) -> float:
    """Mean over all frames of 100 cos(image, text), each frame with its video's prompt, from the raw model."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    scores = []
    for video, prompt in zip(videos, prompts):
        for t in range(video.shape[1]):
            frame = (video[:, t] * 255).round().to(torch.uint8)
            image = model.get_image_features(processor(images=[frame], return_tensors="pt")["pixel_values"])
            tokens = processor(text=[prompt], return_tensors="pt")
            text = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
            image, text = image.pooler_output[0], text.pooler_output[0]
            scores.append(100 * torch.dot(image, text) / (image.norm() * text.norm()))
    return float(torch.stack(scores).mean())


def test_clip_score_matches_hand_computation(clip_dir):
    videos = torch.rand(3, 3, 4, 24, 40)
    prompts = ["a red disc", "blue square moving", "a cross"]
    expected = _hand_score(clip_dir, videos, prompts)
    assert expected > 1.0  # the aligned tiny model keeps the mean away from CLIPScore's clamp at 0
    assert clip_score(videos, prompts, local_clip(clip_dir)) == pytest.approx(expected, rel=1e-4)
    # pairing matters: each frame is scored against its own video's prompt
    swapped = clip_score(videos, prompts[::-1], local_clip(clip_dir))
    assert swapped == pytest.approx(_hand_score(clip_dir, videos, prompts[::-1]), rel=1e-4)
    assert swapped != pytest.approx(expected, rel=1e-4)


def test_clip_errors(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        local_clip(tmp_path / "nope")
    with pytest.raises(ValueError, match="lacks config.json or weights"):
        local_clip(tmp_path)
    with pytest.raises(ValueError, match="2 prompts for 3 videos"):
        clip_score(torch.rand(3, 3, 2, 8, 8), ["a", "b"], local_clip(clip_dir))


def test_pickled_weights_are_refused(clip_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(clip_dir, pickled)
    weights = pickled / "model.safetensors"
    torch.save(load_file(weights), pickled / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match=r"CLIP directory '.*pickled' holds only pickled weights "
                                         r"\(pytorch_model.bin\)"):
        local_clip(pickled)()
