"""SLACallback (sla_dist/lightning/callback.py): conversion in setup, schedule, live measurements, state."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from sla_dist import SLAConfig, SparseLinearAttention, dit_config
from sla_dist.lightning.callback import SLACallback
from sla_dist.lightning.module import DiTModule


def test_schedule():
    cb = SLACallback(SLAConfig(topk=0.2, negligible=0.1), dense_steps=10, anneal_steps=8)
    assert cb.settings_at(0) == cb.settings_at(9) == (1.0, 0.0)
    topk, negligible = cb.settings_at(14)
    assert topk == pytest.approx(1 - 0.5 * 0.8) and negligible == pytest.approx(0.05)
    assert cb.settings_at(18) == cb.settings_at(1000) == (0.2, 0.1)
    with pytest.raises(ValueError, match="dense_steps=-1"):
        SLACallback(dense_steps=-1)


def test_setup_converts_and_measures_live_batch():
    module = DiTModule(dit_config("tiny"), seed=random.randrange(1000))
    cb = SLACallback(SLAConfig(topk=0.25, negligible=0.25), skip_first=1, dense_steps=2, error_every=3)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1000)
    cb.setup(trainer, module, "fit")
    layers = [m for m in module.model.modules() if isinstance(m, SparseLinearAttention)]
    assert cb.converted == [1] and len(layers) == 1 and layers[0].config.topk == 1.0
    logged = {}
    module.log_dict = lambda metrics, **kw: logged.update(metrics)
    batch = {"latents": torch.randn(2, 4, 4, 16, 16), "text": torch.randn(2, 5, 32)}
    for step in (0, 3):  # step 0: dense (error ~ 0); step 3: sparse at the target (error > 0)
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, batch, 0)
        with torch.no_grad():
            module.model(batch["latents"], torch.rand(2) * 1000, batch["text"])
        trainer.global_step = step + 1
        cb.on_train_batch_end(trainer, module, None, batch, 0)
        if step == 0:
            assert logged["sla/error/layer_1"] < 1e-5 and logged["sla/sparsity/layer_1"] == 0.0
    assert layers[0].config.topk == 0.25
    assert logged["sla/error/layer_1"] > 1e-3 and logged["sla/sparsity/layer_1"] == pytest.approx(0.75)
    state = cb.state_dict()
    other = SLACallback(SLAConfig(topk=0.25))
    other.converted = [0]
    with pytest.raises(ValueError, match="converted layers"):
        other.load_state_dict(state)
