"""The sampler moved below the training and evaluation packages: :mod:`sla_dist.sampling`. Re-exported here for
existing imports (``from sla_dist.eval.sampling import SamplerConfig, sample``)."""

from ..sampling import (SOLVERS, TIMESTEP_SCALE, SamplerConfig, flow_sigmas, guided_velocity, initial_noise, sample,
                        sigma_schedule)

__all__ = ["SOLVERS", "TIMESTEP_SCALE", "SamplerConfig", "flow_sigmas", "guided_velocity", "initial_noise", "sample",
           "sigma_schedule"]
