"""Small offline artefacts for the eval tests: a tiny random CLIP directory and tiny DiT checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"


def tiny_clip_dir(root: Path, aligned: bool = True) -> Path:
    """A random 1-layer CLIP (CLIPModel + CLIPProcessor, character-level vocabulary) saved under ``root / 'clip'``.

    With ``aligned`` both towers end in the same projection of a shared final-norm bias, so image and text
    embeddings share a direction and the CLIP score is well above 0 (CLIPScore clamps negative means to 0, which
    would hide errors)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config)
    if aligned:
        with torch.no_grad():
            bias = torch.randn(32)
            model.text_model.final_layer_norm.bias.copy_(bias)
            model.vision_model.post_layernorm.bias.copy_(bias)
            model.text_projection.weight.copy_(model.visual_projection.weight)
    out = root / "clip"
    model.save_pretrained(out)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return out


def save_dit(model: torch.nn.Module, path: Path) -> Path:
    """An exported-style checkpoint: the plain VideoDiT state dict as safetensors."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
