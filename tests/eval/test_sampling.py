"""The flow-matching sampler: solver accuracy on an ODE with a known solution, guidance, seeds, validation."""

import math

import pytest
import torch

from sla_dist.sampling import SamplerConfig, guided_velocity, initial_noise, sample, sigma_schedule


class LinearVelocity(torch.nn.Module):
    """v(x, t) = a x: the ODE dx/dsigma = a x from sigma 1 to 0 ends at x(1) exp(-a)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t, text):
        self.seen_t.append(t)
        return self.a * x


def _final_error(solver: str, steps: int, a: float = 1.3) -> float:
    model = LinearVelocity(a)
    config = SamplerConfig(steps=steps, solver=solver, seed=5)
    out = sample(model, torch.zeros(2, 1, 1), (1, 2, 2, 2), config)
    exact = initial_noise(2, (1, 2, 2, 2), seed=5) * math.exp(-a)
    return float((out - exact).abs().max() / exact.abs().max())


def test_heun_is_second_order_and_beats_euler():
    euler = [_final_error("euler", n) for n in (8, 16)]
    heun = [_final_error("heun", n) for n in (8, 16)]
    assert 1.7 < euler[0] / euler[1] < 2.3  # first order: halving the step halves the error
    assert heun[1] < euler[1] / 5
    assert heun[0] / heun[1] > 2.5  # better than first order (the last step to sigma 0 is Euler)


def test_timesteps_follow_the_shifted_schedule():
    model = LinearVelocity(0.0)
    sample(model, torch.zeros(1, 1, 1), (1, 1, 1, 1), SamplerConfig(steps=4, shift=3.0))
    sigmas = sigma_schedule(4, 3.0)
    assert torch.allclose(torch.stack([t[0] for t in model.seen_t]).double(), sigmas[:-1] * 1000)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert float(sigmas[1]) > 0.75  # shift > 1 spends more steps at high noise


def test_classifier_free_guidance_combines_both_passes():
    class TextVelocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.calls = 0

        def forward(self, x, t, text):
            self.calls += 1
            return x * 0 + text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) * self.w

    model = TextVelocity()
    x = torch.randn(2, 1, 1, 2, 2)
    text, null = torch.full((2, 3, 4), 2.0), torch.full((1, 3, 4), 0.5)
    v = guided_velocity(model, x, 0.5, text, null, guidance=4.0)
    assert model.calls == 1  # conditional and null passes in one batch
    assert torch.allclose(v, torch.full_like(x, 0.5 + 4.0 * (2.0 - 0.5)))
    with pytest.raises(ValueError, match="needs null_text"):
        guided_velocity(model, x, 0.5, text, None, guidance=2.0)


def test_noise_of_a_video_does_not_depend_on_the_batch():
    both = initial_noise(3, (2, 2, 4, 4), seed=11)
    assert torch.equal(initial_noise(1, (2, 2, 4, 4), seed=11, first_index=2)[0], both[2])
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(initial_noise(1, (2, 2, 4, 4), seed=12)[0], both[0])


@pytest.mark.parametrize("field,value,message", [("steps", 0, "steps=0"), ("solver", "rk4", "solver='rk4'"),
                                                 ("shift", 0.0, "shift=0.0"), ("guidance", -1.0, "guidance=-1.0")])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**{field: value})


def test_batched_sampling_gives_the_videos_of_one_batch():
    from sla_dist.eval.evaluate import EvalConfig, sample_videos
    from sla_dist.models import VideoDiT, dit_config

    config = dit_config("tiny")
    model = VideoDiT(config).eval()
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    text = torch.randn(5, 3, config.text_dim)
    shape = (config.in_channels, 2, 8, 8)
    sampler = SamplerConfig(steps=2, guidance=2.0, seed=3)
    whole = sample(model, text, shape, sampler, null_text=torch.zeros_like(text[:1]))
    sizes.clear()
    batched = sample_videos(model, text, shape, sampler, batch_size=2, null_text=torch.zeros_like(text[:1]))
    assert sizes == [4, 4, 4, 4, 2, 2]  # 2 + 2 + 1 videos, conditional and null passes, 2 steps
    assert torch.allclose(batched, whole, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])
    assert EvalConfig(checkpoints=["a"], recipes=["r"], out_dir="o", val_samples=1).val_samples == 1
    with pytest.raises(ValueError, match="batch_size=0"):
        EvalConfig(checkpoints=["a"], recipes=["r"], out_dir="o", batch_size=0)
