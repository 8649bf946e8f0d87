"""Wall-clock budget of the quality study: a timestamped log, and step counts sized from measured step times.

A device call has a hard wall-clock limit, so the study plans its schedule before training: it times a few steps and
forward passes of every variant (``StepTimes``, measured by quality_study.probe), then ``plan_steps`` picks the
largest pretrain and fine-tune step counts, at most the preset's and in the preset's ratio, whose predicted time
(training, evaluations, FVD sampling, a fixed reserve) fits what is left of the budget. Every fine-tune gets the same
number of steps, so the variants stay comparable.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

MARGIN = 0.08
"""Fraction of the remaining budget kept free for the error of the prediction (allocator warm-up, new shapes)."""

RESERVE_S = 10.0
"""Seconds kept for what the plan does not time: per-layer attention errors, checkpoint, report and plot."""


class Clock:
    """Seconds since the process started (``started``: a ``time.monotonic()`` taken before the heavy imports) and a
    log whose lines carry the wall time and that offset, so that a run cut by a time limit still says where it was."""

    def __init__(self, started: float, budget: float | None = None) -> None:
        self.started, self.budget = started, budget

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float | None:
        return None if self.budget is None else self.budget - self.elapsed()

    def log(self, message: str) -> None:
        budget = "" if self.budget is None else f"/{self.budget:.0f}s"
        print(f"[{datetime.now():%H:%M:%S} +{self.elapsed():6.1f}s{budget}] {message}", file=sys.stdout, flush=True)


@dataclass
class StepTimes:
    """Measured seconds of one variant: an optimizer step on one batch, a no-grad forward of one batch, and one
    validation pass (forwards plus the noise it draws on the host)."""

    train: float
    forward: float
    validation: float

    def __post_init__(self) -> None:
        if not (self.train > 0 and self.forward > 0 and self.validation > 0):
            raise ValueError(f"step times must be positive, got train={self.train}, forward={self.forward}, "
                             f"validation={self.validation}")


@dataclass
class Schedule:
    """What the study does, as the preset asks (caps) or as planned; ``fixed`` names the counts the user set."""

    pretrain_steps: int
    finetune_steps: int
    pretrain_eval_every: int
    finetune_eval_every: int
    predicted_s: dict[str, float] = field(default_factory=dict)
    """The plan's prediction per part (empty when the steps were not planned)."""
    scaled: bool = False
    """True when the budget cut the steps below the preset's."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Workload:
    """The quantities of a study that scale its cost (copied from StudyConfig, so this module stays standalone)."""

    pretrain_steps: int
    finetune_steps: int
    pretrain_evals: int
    eval_every: int
    fvd_videos: int
    sample_steps: int
    batch_size: int

    def fvd_forwards(self) -> int:
        """Batched forwards of sampling the FVD videos."""
        return math.ceil(self.fvd_videos / self.batch_size) * self.sample_steps


def eval_every_for(steps: int, evals: int) -> int:
    """The interval that gives about ``evals`` evaluations over ``steps`` steps."""
    return max(1, math.ceil(steps / max(1, evals)))


def default_schedule(w: Workload) -> Schedule:
    return Schedule(w.pretrain_steps, w.finetune_steps, eval_every_for(w.pretrain_steps, w.pretrain_evals),
                    w.eval_every)


def plan_steps(w: Workload, times: dict[str, StepTimes], runs: list[str], remaining_s: float, *,
               pretrain: bool, finetune: bool, fixed: frozenset[str] = frozenset()) -> Schedule:
    """The step counts that fit ``remaining_s`` seconds.

    ``runs``: the variant of each fine-tune ('dense' twice for two seeds); ``times`` holds every variant of
    ``runs`` and 'dense' when ``pretrain``. Counts named in ``fixed`` ('pretrain_steps', 'finetune_steps') are kept
    as given; the others shrink (never grow) from the preset's, pretrain and fine-tune in the preset's ratio.
    Raises ValueError when not even one step of each fits, naming the seconds it would need."""
    if not (pretrain or finetune):
        raise ValueError("nothing to plan: neither pretraining nor fine-tuning")
    runs = runs if finetune else []
    missing = sorted({*runs, *(["dense"] if pretrain else [])} - set(times))
    if missing:
        raise ValueError(f"no measured step times for {missing}")
    dense = times["dense"] if pretrain else None
    ratio = w.pretrain_steps / w.finetune_steps
    evals = math.ceil(w.finetune_steps / w.eval_every) + 1
    fixed_s = {
        "pretrain_evals": (w.pretrain_evals + 1) * dense.validation if dense else 0.0,
        "finetune_evals": sum(evals * times[v].validation for v in runs),
        "fvd_sampling": sum(w.fvd_forwards() * times[v].forward for v in runs),
        "reserve": RESERVE_S,
    }
    available = remaining_s * (1 - MARGIN) - sum(fixed_s.values())
    finetune_step_s = sum(times[v].train for v in runs)

    if finetune and "finetune_steps" not in fixed:
        pretrain_fixed = pretrain and "pretrain_steps" in fixed
        per_step = finetune_step_s + (ratio * dense.train if pretrain and not pretrain_fixed else 0.0)
        left = available - (w.pretrain_steps * dense.train if pretrain_fixed else 0.0)
        finetune_steps = min(w.finetune_steps, math.floor(left / per_step)) if left > 0 else 0
        pretrain_steps = (w.pretrain_steps if pretrain_fixed or not pretrain
                          else min(w.pretrain_steps, max(1, round(ratio * finetune_steps))))
        need = per_step + sum(fixed_s.values()) + (w.pretrain_steps * dense.train if pretrain_fixed else 0.0)
    elif pretrain and "pretrain_steps" not in fixed:
        finetune_steps = w.finetune_steps
        left = available - (finetune_steps * finetune_step_s if finetune else 0.0)
        pretrain_steps = min(w.pretrain_steps, math.floor(left / dense.train)) if left > 0 else 0
        need = dense.train + sum(fixed_s.values()) + (finetune_steps * finetune_step_s if finetune else 0.0)
    else:
        pretrain_steps, finetune_steps, need = w.pretrain_steps, w.finetune_steps, 0.0
    if (finetune and finetune_steps < 1) or (pretrain and pretrain_steps < 1):
        raise ValueError(f"the time budget leaves {remaining_s:.0f} s, but one step of each phase with its "
                         f"evaluations needs about {need / (1 - MARGIN):.0f} s: give a larger --time-budget or "
                         "fewer variants / smaller sizes")
    predicted = dict(fixed_s)
    if pretrain:
        predicted["pretrain"] = pretrain_steps * dense.train
    if finetune:
        predicted["finetune"] = finetune_steps * finetune_step_s
    # keep the number of evaluation points of the preset when the steps shrink
    pretrain_eval_every = eval_every_for(pretrain_steps, w.pretrain_evals)
    finetune_eval_every = eval_every_for(finetune_steps, evals - 1)
    scaled = pretrain_steps < w.pretrain_steps or finetune_steps < w.finetune_steps
    return Schedule(pretrain_steps, finetune_steps, pretrain_eval_every, finetune_eval_every,
                    {k: round(v, 2) for k, v in predicted.items()}, scaled)
