"""SLACallback (sla_dist/lightning/callback.py): conversion in setup, schedule, live measurements, state."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sla_dist import SLAConfig, SparseLinearAttention, dit_config
from sla_dist.attention import dense_attention, relative_l1
from sla_dist.lightning.callback import SLACallback
from sla_dist.lightning.module import DiTModule

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"


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
    cb = SLACallback(SLAConfig(topk=0.25, negligible=0.25), skip_first=1, dense_steps=2, error_every=2)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1,
                              _logger_connector=SimpleNamespace(should_update_logs=True))
    cb.setup(trainer, module, "fit")
    layers = [m for m in module.model.modules() if isinstance(m, SparseLinearAttention)]
    assert cb.converted == [1] and len(layers) == 1 and layers[0].config.topk == 1.0
    logged = {}
    module.log_dict = lambda metrics, **kw: logged.update(metrics)
    batch = {"latents": torch.randn(2, 4, 4, 16, 16), "text": torch.randn(2, 5, 32)}
    for step in (1, 3):  # step 1: dense (error ~ 0); step 3: sparse at the target (error > 0)
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, batch, 0)
        with torch.no_grad():
            module.model(batch["latents"], torch.rand(2) * 1000, batch["text"])
        trainer.global_step = step + 1
        cb.on_train_batch_end(trainer, module, None, batch, 0)
        if step == 1:
            assert logged["sla/error/layer_1"] < 1e-5 and logged["sla/sparsity/layer_1"] == 0.0
    assert layers[0].config.topk == 0.25
    assert logged["sla/error/layer_1"] > 1e-3 and logged["sla/sparsity/layer_1"] == pytest.approx(0.75)
    state = cb.state_dict()
    other = SLACallback(SLAConfig(topk=0.25))
    other.converted = [0]
    with pytest.raises(ValueError, match="converted layers"):
        other.load_state_dict(state)


def test_a_layer_called_several_times_in_a_step_logs_the_mean():
    """Sequence parallel may run a layer once per chunk of heads, and activation checkpointing runs it again in the
    backward: the row holds the mean over the step's calls, not whichever call came last."""
    module = DiTModule(dit_config("tiny"), seed=0)
    cb = SLACallback(SLAConfig(topk=0.25, negligible=0.0), error_every=1)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1,
                              _logger_connector=SimpleNamespace(should_update_logs=True))
    cb.setup(trainer, module, "fit")
    layer = next(m for m in module.model.modules() if isinstance(m, SparseLinearAttention))
    logged = {}
    module.log_dict = lambda metrics, **kw: logged.update(metrics)
    cb.on_train_batch_start(trainer, module, None, 0)
    g = torch.Generator().manual_seed(0)
    calls = [[torch.randn(1, 2, 256, layer.head_dim, generator=g) for _ in range(3)] for _ in range(2)]
    calls[1][1] = calls[1][0].clone()  # k = q: attention concentrates on the diagonal, a different error
    errors = []
    with torch.no_grad():
        for q, k, v in calls:
            errors.append(float(relative_l1(layer(q, k, v), dense_attention(q, k, v))))
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert errors[0] != pytest.approx(errors[1], rel=1e-2)
    assert logged["sla/error/layer_0"] == pytest.approx(sum(errors) / 2)
    assert logged["sla/sparsity/layer_0"] == pytest.approx(0.75)


def test_logged_sparsity_is_measured_at_the_rows_step(tmp_path):
    """Lightning writes a row every ``log_every_n_steps`` at steps n-1, 2n-1, ...; each row's sparsity and error
    must be the ones measured on that step's batch, not a step before (the anneal changes them every step)."""
    from sla_dist.lightning.recipe import load_recipe
    from sla_dist.lightning.run import train

    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", "parallel.strategy=auto", "trainer.max_steps=6",
                                  "trainer.log_every_n_steps=2", "trainer.checkpoint_every=6", "trainer.val_every=0",
                                  "trainer.progress_bar=false", "sample.enabled=false", "data.batch_size=2",
                                  "sparsity.dense_steps=1", "sparsity.anneal_steps=4", "sparsity.error_every=4"])
    train(recipe)
    rows = {int(row["step"]): row for row in csv.DictReader(next(tmp_path.glob("logs/csv/version_*/metrics.csv")).open())
            if row.get("sla/topk")}
    # topk 1, 1, 0.8125, 0.625, 0.4375, 0.25 at steps 0-5: max(1, floor(4 topk)) of the 4 key blocks are critical
    assert {step: float(row["sla/topk"]) for step, row in rows.items()} == {1: 1.0, 3: 0.625, 5: 0.25}
    for layer in (0, 1):
        sparsity = {step: float(row[f"sla/sparsity/layer_{layer}"]) for step, row in rows.items()}
        assert sparsity == {1: 0.0, 3: 0.5, 5: 0.75}, f"layer {layer}: {sparsity}"
        # error_every=4: first on the row covering steps 2-3, measured at step 3 (sparse: not 0; step 0 was dense).
        # Lightning repeats a step metric's last value in later rows, so row 5 shows it again.
        errors = {step: float(row[f"sla/error/layer_{layer}"]) for step, row in rows.items()
                  if row[f"sla/error/layer_{layer}"]}
        assert min(errors) == 3 and errors[3] > 1e-3, f"layer {layer}: {errors}"


def test_calibration_fits_proj_l_once_on_the_first_step_at_the_target():
    """calibrate=True: the forwards of step dense_steps + anneal_steps (both micro-batches of an accumulated step)
    give proj_l the fit calibrate_projections finds on the same inputs, once; momentum and EMA follow; the state
    says so, and a checkpoint from before the flag existed still loads."""
    import copy

    from sla_dist import calibrate_projections
    from sla_dist.lightning.module import EMA

    module = DiTModule(dit_config("tiny"), seed=0)
    cb = SLACallback(SLAConfig(topk=0.25, negligible=0.0), dense_steps=1, anneal_steps=1, calibrate=True)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1, strategy=None,
                              _logger_connector=SimpleNamespace(should_update_logs=False))
    cb.setup(trainer, module, "fit")
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)  # after setup, as configure_optimizers
    trainer.optimizers = [optimizer]
    cb.on_train_start(trainer, module)
    module.ema = EMA(module.model, 0.9)
    logged = {}
    module.log_dict = lambda metrics, **kw: logged.update(metrics)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 4, 4, 16, 16, generator=g), torch.rand(2, generator=g) * 1000,
                torch.randn(2, 5, 32, generator=g)) for _ in range(5)]
    layers = [m for m in module.model.modules() if isinstance(m, SparseLinearAttention)]
    reference = None
    for batch, (step, micro) in zip(batches, [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, None, micro)
        if (step, micro) == (2, 0):  # the model as step 2's forwards see it, at the target topk, without the hooks
            reference = copy.deepcopy(module.model)
            for m in reference.modules():
                m._forward_hooks.clear()
        assert cb.runs_eagerly == (step == 2)  # hooks of a compiled model need eager execution
        module.model(*batch).square().mean().backward()
        if micro == 1 or step != 2:  # step 2 accumulates two micro-batches: one optimizer step after both
            optimizer.step()
            optimizer.zero_grad()
            trainer.global_step = step + 1
        cb.on_train_batch_end(trainer, module, None, None, micro)
        assert ("sla/calibration/error_after" in logged) == (trainer.global_step == 3), (step, micro)
        if trainer.global_step == 3:
            assert not cb._hooks and cb.calibrated and not cb.runs_eagerly
            assert not any(layer._forward_hooks for layer in layers)
            calibrated = [layer.proj_l.weight.detach().clone() for layer in layers]
            # what calibrate_projections fits on the same inputs
            report = calibrate_projections(reference, lambda: [reference(*b) for b in batches[2:4]])
            for layer, want in zip(layers, report):
                fitted = reference.get_submodule(want).proj_l.weight
                torch.testing.assert_close(layer.proj_l.weight.detach(), fitted, rtol=1e-5, atol=1e-6)
                assert layer.proj_l.weight.abs().sum() > 0
                assert not optimizer.state[layer.proj_l.weight]["exp_avg"].any()
                assert optimizer.state[layer.proj_l.weight]["exp_avg_sq"].any()  # kept (module docstring)
                key = f"{want}.proj_l.weight"
                torch.testing.assert_close(module.ema.shadow[key], layer.proj_l.weight.detach())
            assert logged["sla/calibration/error_after"] < logged["sla/calibration/error_before"]
            logged.clear()
    # step 3 did not calibrate again: proj_l moved by one optimizer step only
    for layer, before in zip(layers, calibrated):
        assert (layer.proj_l.weight.detach() - before).abs().max() < 2e-3
    state = cb.state_dict()
    assert state["calibrated"] is True
    resumed = SLACallback(SLAConfig(topk=0.25), calibrate=True)
    resumed.load_state_dict(state)
    assert resumed.calibrated
    old = {k: v for k, v in state.items() if k != "calibrated"}
    resumed.load_state_dict(old)
    assert not resumed.calibrated


def test_calibration_refuses_a_partitioned_proj_l_and_ring_context_parallel():
    module = DiTModule(dit_config("tiny"), seed=0)
    cb = SLACallback(SLAConfig(topk=0.25), calibrate=True)
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(sp_groups=SimpleNamespace(ring_degree=2,
                                                                                                 sp_size=4)))
    cb.setup(trainer, module, "fit")
    with pytest.raises(ValueError, match=r"context parallel \(ring degree 2 of sp 4\)"):
        cb.on_train_start(trainer, module)
    trainer.strategy.sp_groups.ring_degree = 1  # Ulysses only: fine
    cb.on_train_start(trainer, module)
    cb.layers[0].proj_l.weight.ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    with pytest.raises(ValueError, match="ZeRO-3 partitions it"):
        cb.on_train_start(trainer, module)
    cb.calibrated = True  # a resumed run past its calibration checks nothing
    cb.on_train_start(trainer, module)


def test_without_warm_up_calibration_collects_on_step_zero():
    module = DiTModule(dit_config("tiny"), seed=0)
    cb = SLACallback(SLAConfig(topk=0.25), calibrate=True)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1,
                              _logger_connector=SimpleNamespace(should_update_logs=False))
    cb.setup(trainer, module, "fit")
    assert cb.calibration_step == 0
    cb.on_train_batch_start(trainer, module, None, 0)
    assert cb._calibration is not None and all(layer._forward_hooks for layer in cb.layers)
    cb.teardown(trainer, module, "fit")  # a fit stopped inside the step leaves no hooks behind
    assert cb._calibration is None and not any(layer._forward_hooks for layer in cb.layers)


def _two_rank_callback_calibration(device: torch.device) -> None:
    import copy

    import torch.distributed as dist

    from sla_dist import calibrate_projections

    module = DiTModule(dit_config("tiny"), seed=0)  # the same weights on both ranks
    cb = SLACallback(SLAConfig(topk=0.25, negligible=0.0), calibrate=True)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1,
                              _logger_connector=SimpleNamespace(should_update_logs=False))
    cb.setup(trainer, module, "fit")
    module.log_dict = lambda metrics, **kw: None
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(1, 4, 4, 16, 16, generator=g), torch.rand(1, generator=g) * 1000,
                torch.randn(1, 5, 32, generator=g)) for _ in range(2)]
    alone = copy.deepcopy(module.model)  # one process, both ranks' samples
    report = calibrate_projections(alone, lambda: [alone(*b) for b in batches])
    cb.on_train_batch_start(trainer, module, None, 0)
    with torch.no_grad():
        module.model(*batches[dist.get_rank()])
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, module, None, None, 0)
    for name in report:
        torch.testing.assert_close(module.model.get_submodule(name).proj_l.weight.detach(),
                                   alone.get_submodule(name).proj_l.weight.detach(), rtol=1e-5, atol=1e-6)


def test_ranks_calibrate_one_proj_l_over_all_their_samples():
    """With torch.distributed initialised the fit is summed over the world: each rank's proj_l is the fit over both
    ranks' samples (data parallel; Ulysses ranks likewise hold different heads of one sample)."""
    from tests.parallel.dist_utils import run_distributed

    run_distributed(_two_rank_callback_calibration, 2, "cpu")
