"""Tiny random encoders saved the way real ones ship, for loading by path (built offline, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a the red blue green cat dog bird runs jumps flies over under grass sky water slowly quickly".split()


def save_wan_vae(path: Path, seed: int) -> Path:
    """A 4-channel AutoencoderKLWan: 8x spatial, 4x temporal compression like Wan's, random normalisation."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=torch.randn(4, generator=gen).tolist(),
                           latents_std=(torch.rand(4, generator=gen) + 0.5).tolist())
    vae.save_pretrained(path)
    return path


def save_image_vae(path: Path, seed: int) -> Path:
    """A 2D AutoencoderKL (frames are encoded one by one) with scaling and shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.7, shift_factor=0.1)
    vae.save_pretrained(path)
    return path


def save_text_encoder(model_dir: Path, tokenizer_dir: Path, seed: int) -> None:
    """A 1-layer UMT5EncoderModel (d_model 16) and a whitespace word-level tokenizer of WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    UMT5EncoderModel(config).save_pretrained(model_dir)
