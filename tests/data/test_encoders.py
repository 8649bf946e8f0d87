"""Loading encoders by local path: image VAEs fold frames, clip checks, normalisation, text trimming, bad paths."""

import json
import shutil

import pytest
import torch

from sla_dist.data.encoders import load_text_encoder, load_vae
from tests.data.tiny_models import save_image_vae


def test_image_vae_encodes_frame_by_frame(tmp_path):
    from diffusers import AutoencoderKL

    save_image_vae(tmp_path / "vae", seed=torch.seed() % 2**31)
    vae = load_vae(tmp_path)  # a pipeline root: the vae/ subfolder is found
    assert vae.image and vae.temporal_factor == 1 and vae.spatial_factor == 2
    video = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    z = vae.encode(video)
    reference = AutoencoderKL.from_pretrained(tmp_path / "vae")
    for f in range(3):
        with torch.no_grad():
            raw = reference.encode(video[:, :, f]).latent_dist.mean
        torch.testing.assert_close(z[:, :, f], (raw - 0.1) * 0.7)
    vae.check_clip(7, 8, 6)  # any frame count
    with pytest.raises(ValueError, match="width=5 must be a multiple of AutoencoderKL's spatial factor 2"):
        vae.check_clip(1, 8, 5)


def test_wan_vae_clip_checks(pipeline_dir):
    vae = load_vae(pipeline_dir / "vae")
    assert not vae.image and (vae.temporal_factor, vae.spatial_factor) == (4, 8)
    with pytest.raises(ValueError, match=r"frames=8 must be 1 \+ k \* 4 .* \(e.g. 9\)"):
        vae.check_clip(8, 32, 32)
    with pytest.raises(ValueError, match="height=36"):
        vae.check_clip(9, 36, 32)


def test_text_embeddings_keep_real_tokens_only(pipeline_dir):
    encoder = load_text_encoder(pipeline_dir, max_length=6)  # pipeline root: text_encoder/ and tokenizer/
    captions = ["a red cat", "the dog runs over the green grass slowly", "bird"]
    batch = encoder.encode(captions)
    assert [t.shape for t in batch] == [(3, 16), (6, 16), (1, 16)]
    for caption, text in zip(captions, batch):
        torch.testing.assert_close(encoder.encode([caption])[0], text)  # padding does not leak into real tokens


def test_bad_encoder_directories(tmp_path, pipeline_dir):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel2"}))
    with pytest.raises(ValueError, match="_class_name='UNet2DModel2' is not a diffusers autoencoder"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        load_text_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_text_encoder(pipeline_dir / "text_encoder", tokenizer=tmp_path / "none")


@pytest.mark.parametrize("sub,weights,option", [("vae", "diffusion_pytorch_model", "--vae"),
                                                 ("text_encoder", "model", "--text-encoder")])
def test_pickled_weights_are_refused(pipeline_dir, tmp_path, sub, weights, option):
    from safetensors.torch import load_file

    copy = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, copy)
    torch.save(load_file(copy / sub / f"{weights}.safetensors"), copy / sub / f"{weights}.bin")
    (copy / sub / f"{weights}.safetensors").unlink()
    load = load_vae if sub == "vae" else load_text_encoder
    with pytest.raises(ValueError, match=rf"{option} '.*{sub}' holds only pickled weights \({weights}.bin\)"):
        load(copy)
