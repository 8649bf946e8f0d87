"""In-process `train` with Lightning's own strategy (parallel.strategy=auto): fit, checkpoint, and the final sample
drawn with sla_dist.eval's sampler."""

from __future__ import annotations

from pathlib import Path

import torch

from sla_dist.lightning import run
from sla_dist.lightning.recipe import load_recipe

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny_cpu.yaml"


def test_auto_strategy_trains_and_samples_with_the_eval_sampler(tmp_path, monkeypatch):
    calls, real = [], run.sample

    def spy(model, text, shape, config, **kwargs):
        calls.append(config)
        latents = real(model, text, shape, config, **kwargs)
        # the predictor runs the trained DiT itself (no sequence parallelism here)
        x, t = torch.randn(1, *shape), torch.full((1,), 500.0)
        torch.testing.assert_close(model(x, t, text[:1]), model.model(x, t, text[:1]))
        return latents

    monkeypatch.setattr(run, "sample", spy)
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", "parallel.strategy=auto", "trainer.max_steps=2",
                                  "trainer.checkpoint_every=2", "trainer.progress_bar=false", "sample.steps=2",
                                  "sample.num_videos=1", "data.batch_size=2", "optim.flow_shift=3.0"])
    trainer = run.train(recipe)
    assert trainer.global_step == 2 and (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "samples" / "final.gif").stat().st_size > 0
    assert len(calls) == 1 and (calls[0].steps, calls[0].shift, calls[0].guidance) == (2, 3.0, 1.0)


def test_sample_gif_is_upscaled_to_a_viewable_size(tmp_path):
    from PIL import Image

    from sla_dist.lightning.sample import write_gif

    videos = torch.rand(3, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    gif = Image.open(write_gif(videos, tmp_path / "s.gif"))
    assert gif.size == (3 * 256, 256) and gif.n_frames == 4
    # nearest: every 16 x 16 square of the first frame is one source pixel
    first = torch.tensor(list(gif.convert("RGB").getdata()), dtype=torch.float32).view(256, 3 * 256, 3)
    assert torch.equal(first[:16, :16], first[:1, :1].expand(16, 16, 3))


def test_samples_at_an_interval_go_to_files_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", "parallel.strategy=auto", "trainer.max_steps=4",
                                  "trainer.checkpoint_every=4", "trainer.progress_bar=false", "trainer.val_every=0",
                                  "sample.steps=2", "sample.num_videos=1", "sample.every=2", "data.batch_size=2"])
    run.train(recipe)
    # step 4 is the last: its sample is final.gif, not a step4.gif beside it
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["final.gif", "final.txt", "step2.gif"]
    events = EventAccumulator(str(next((tmp_path / "logs" / "tensorboard").iterdir()))).Reload()
    images = events.Images("samples")
    assert [i.step for i in images] == [2]
    # a filmstrip: one 128-pixel-high tile per frame (16 x 16 latents scaled by 8), frames top to bottom
    assert (images[0].height, images[0].width) == (128 * recipe.data.frames, 128)
