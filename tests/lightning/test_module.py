"""DiTModule's caption dropout: the null (zero) text embedding that classifier-free guidance samples against."""

from __future__ import annotations

import random

import torch

from sla_dist.lightning.module import DiTModule, drop_captions
from sla_dist.lightning.recipe import OptimSection
from sla_dist.models import dit_config


def test_drop_captions_replaces_whole_embeddings():
    text = torch.randn(2000, 3, 4) + 5
    assert drop_captions(text, 0.0, torch.Generator()) is text
    seed = random.randrange(1000)
    out = drop_captions(text, 0.3, torch.Generator().manual_seed(seed))
    dropped = out.eq(0).all(-1).all(-1)
    kept = out.eq(text).all(-1).all(-1)
    assert (dropped ^ kept).all()  # each sample is either untouched or entirely the null embedding
    assert 0.25 < dropped.float().mean() < 0.35
    torch.testing.assert_close(drop_captions(text, 0.3, torch.Generator().manual_seed(seed)), out, rtol=0, atol=0)
    assert not drop_captions(text, 1.0, torch.Generator()).any()


def _loss(dropout: float, text: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    module = DiTModule(dit_config("tiny"), OptimSection(caption_dropout=dropout), seed=3)
    batch = {"latents": latents, "text": text, "index": torch.arange(2)}
    return module.losses(batch, torch.Generator().manual_seed(11))["loss"]


def test_losses_train_on_the_null_caption():
    torch.manual_seed(random.randrange(1000))
    latents, text = torch.randn(2, 4, 1, 8, 8), torch.randn(2, 5, 32, requires_grad=True)
    # the caption matters to the model: the loss has a gradient through it (two scalar losses can match by chance)
    _loss(0.0, text, latents).backward()
    assert text.grad.abs().amax() > 1e-6
    text = text.detach()
    null = _loss(0.0, torch.zeros_like(text), latents)
    # dropping every caption trains on the null embedding, with the same noise and timesteps
    torch.testing.assert_close(_loss(1.0, text, latents), null, rtol=0, atol=0)
