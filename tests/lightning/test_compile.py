"""Training with ``model.compile``: each DiT block compiled in place (``apply_compile``) trains as the eager model
does, with and without activation checkpointing, writes the eager model's checkpoint keys, resumes across the
setting, and samples from the EMA weights. The compiled runs take the ``aot_eager`` backend (the graphs Dynamo and
AOTAutograd trace, without Inductor's code generation) to stay fast on CPU."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from sla_dist.config import SLAConfig
from sla_dist.lightning import run
from sla_dist.lightning.checkpoint import consolidated_state_dict, safe_torch_load
from sla_dist.lightning.module import EMA, DiTModule
from sla_dist.lightning.recipe import OptimSection, load_recipe
from sla_dist.lightning.resume import incompatible
from sla_dist.lightning.callback import SLACallback
from sla_dist.models import apply_compile, apply_sla, dit_config
from tests.lightning.runs import in_process_runs

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"
FAST = ["trainer.progress_bar=false", "sample.enabled=false", "data.batch_size=2", "sparsity.dense_steps=0",
        "sparsity.anneal_steps=0", "sparsity.error_every=0", "trainer.val_every=0", "sample.every=0", "data.frames=1",
        "data.height=8", "data.width=8"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _module(compile_backend=None, checkpoint_blocks: bool = False) -> DiTModule:
    config = dit_config("tiny", checkpoint_blocks=checkpoint_blocks)
    module = DiTModule(config, OptimSection(), seed=5, compile_mode=None if compile_backend is None else "default",
                       compile_backend=compile_backend or "inductor")
    apply_sla(module.model, SLAConfig(topk=0.5, negligible=0.25, block_q=64, block_k=64))
    module.configure_model()
    return module


def _step(module: DiTModule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 2, 16, 16, generator=gen), "text": torch.randn(2, 5, 32, generator=gen),
             "index": torch.arange(2)}
    loss = module.losses(batch, torch.Generator().manual_seed(1))["loss"]
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in module.model.named_parameters()}


@pytest.mark.parametrize("checkpoint_blocks", [False, True], ids=["plain", "checkpointed"])
def test_compiled_training_step_equals_eager(checkpoint_blocks):
    """Loss and every gradient of one step (SLA layers, 128 tokens = 2 query blocks) match eager to float32
    rounding (rtol 1e-5, atol 1e-6), each block runs as one graph (the checkpoint traced inside it, no graph
    break), and the parameter names are unchanged."""
    backend = CompileCounterWithBackend("aot_eager")
    eager, compiled = _module(), _module(backend, checkpoint_blocks)
    assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
    loss, grads = _step(eager)
    compiled_loss, compiled_grads = _step(compiled)
    assert backend.frame_count >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()


def test_ema_sample_of_the_compiled_model_equals_eager():
    """draw_samples from EMA weights (a deep copy of the model with the averages, compiled blocks included: each
    copy runs its own weights) gives the eager model's videos and leaves the model's weights alone."""
    recipe = load_recipe(RECIPE, ["sample.steps=2", "sample.num_videos=1", "data.frames=1", "data.height=8",
                                  "data.width=8"])
    videos, backend = [], CompileCounterWithBackend("aot_eager")
    for compile_backend in (None, backend):
        module = _module(compile_backend)
        module.ema = EMA(module.model, 0.5)
        module.ema.shadow = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k)))
                             for k, v in module.ema.shadow.items()}
        live = {k: v.clone() for k, v in module.model.state_dict().items()}
        videos.append(run.draw_samples(recipe, SimpleNamespace(strategy=None), module))
        for k, v in module.model.state_dict().items():  # the model's own weights are back
            torch.testing.assert_close(v, live[k], rtol=0, atol=0)
    assert backend.frame_count >= 1
    torch.testing.assert_close(videos[1], videos[0], rtol=1e-5, atol=1e-6)


def test_compile_refuses_deepspeeds_exchange():
    model = DiTModule(dit_config("tiny"), seed=5).model
    model.blocks[1].self_attn.parallel = SimpleNamespace(exchange="deepspeed")
    with pytest.raises(NotImplementedError, match=r"blocks\.1\.self_attn\.parallel uses exchange='deepspeed'"):
        apply_compile(model, backend="aot_eager")
    model.blocks[1].self_attn.parallel.exchange = "fused"
    apply_compile(model, backend="aot_eager")
    assert all(block._compiled_call_impl is not None for block in model.blocks)


def test_compile_is_not_a_resume_compatibility_setting():
    eager = load_recipe(RECIPE)
    assert incompatible(eager, load_recipe(RECIPE, ["model.compile=true"])) == []
    assert incompatible(load_recipe(RECIPE, ["model.compile=true"]), eager) == []


def _keys(ckpt: Path) -> dict[str, list[str]]:
    """The parameter names in a checkpoint's module state, its EMA and its export."""
    states = safe_torch_load(ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    return {"module": sorted(states["module"]), "ema": sorted(states["ema"]["shadow"]),
            "export": sorted(consolidated_state_dict(ckpt))}


@pytest.fixture
def in_process():
    with in_process_runs():
        yield


def test_eager_run_resumed_compiled_keeps_checkpoint_keys(tmp_path, monkeypatch, in_process):
    """An eager run (ZeRO-2, one rank, EMA) resumed with model.compile=true: the resume is accepted, the compiled
    run trains and its checkpoint and export hold the eager one's keys (no ``_orig_mod.``)."""
    backend = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(run, "DiTModule", functools.partial(DiTModule, compile_backend=backend))
    out = tmp_path / "run"
    # log rows every 4 steps: the steps SLACallback measures (steps 3, 7, ...) run eagerly
    common = [f"output_dir={out}", *FAST, "trainer.checkpoint_every=1", "trainer.log_every_n_steps=4"]
    run.train(load_recipe(RECIPE, [*common, "trainer.max_steps=1"]))
    eager = _keys(out / "checkpoints" / "step1.ckpt")  # the rotation removes it once step 2 is saved
    assert backend.frame_count == 0
    run.train(load_recipe(RECIPE, [*common, "trainer.max_steps=2", "model.compile=true"]))
    assert backend.frame_count >= 1
    compiled = _keys(out / "checkpoints" / "step2.ckpt")
    assert compiled == eager and not any("_orig_mod" in k for keys in compiled.values() for k in keys)


def test_sla_schedule_and_measurements_with_compiled_blocks():
    """SLACallback on a compiled DiT: the anneal steps (topk changing each step) and the measured steps run eagerly,
    so the blocks compile once for the dense phase and once for the target settings instead of once per anneal
    step, and every measured step logs each layer's sparsity (compiled code runs no hooks registered after
    compilation)."""
    callback = SLACallback(SLAConfig(topk=0.25, negligible=0.25, block_q=64, block_k=64), dense_steps=2,
                           anneal_steps=6)
    logged: dict[int, dict] = {}
    module = SimpleNamespace(model=DiTModule(dit_config("tiny"), seed=5).model)  # dense: the callback converts it
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=4, _logger_connector=SimpleNamespace())
    module.log_dict = lambda metrics, **kwargs: logged.setdefault(trainer.global_step - 1, metrics)
    callback.setup(trainer, module, "fit")
    apply_compile(module.model, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 2, 16, 16, generator=gen), torch.randn(1, 5, 32, generator=gen)
    t = torch.tensor([500.0])
    for step in range(12):
        trainer.global_step = step
        trainer._logger_connector.should_update_logs = (step + 1) % 4 == 0
        callback.on_train_batch_start(trainer, module, None, step)
        module.model(x, t, text).sum().backward()
        trainer.global_step = step + 1
        callback.on_train_batch_end(trainer, module, None, None, step)
    callback.teardown(trainer, module, "fit")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    for step in (3, 7, 11):
        assert {"sla/sparsity/layer_0", "sla/sparsity/layer_1"} <= logged[step].keys(), (step, logged[step])
    assert logged[11]["sla/sparsity/layer_0"] == 0.5  # at topk 0.25 of 2 key blocks: 1 computed exactly
