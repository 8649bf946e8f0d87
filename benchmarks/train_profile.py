"""``bench_train.py --profile``: torch.profiler over chosen training steps, analysed on each rank by step_profile.py.

:class:`ProfileSteps` starts the profiler when ``first`` optimizer steps are done and stops it ``count`` steps
later. At each step boundary it synchronizes the device and emits a zero-length :data:`step_profile.BOUNDARY`
range, so a window between two markers holds everything the loop did for that step (data loading, every
callback's hooks before this one's, forward, backward, the optimizer step). It must be the last callback in the
Trainer's list (bench_train.py appends it last) so that the other callbacks' ``on_train_batch_end`` work falls in
the step it belongs to.

While it is installed, Lightning's hook timings become ``record_function`` ranges (``[Strategy]...``,
``[LightningModule]...``, ``[Callback]...``; Lightning only calls its profiler, which does nothing by default) and
the DeepSpeed engine's ``backward`` / ``step`` and its ZeRO optimizer's ``step`` get ranges of their own.
"""

from __future__ import annotations

import functools
import gzip
import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.profilers import Profiler
from typing_extensions import override

import step_profile

TRACE_LIMIT_MB = 30.0
"""Rank 0's gzipped trace is kept only below this size."""


class RecordFunctionProfiler(Profiler):
    """Lightning's profiler interface, each action a torch.profiler ``record_function`` range."""

    def __init__(self) -> None:
        super().__init__()
        self._open: dict[str, list] = {}

    @override
    def start(self, action_name: str) -> None:
        scope = torch.profiler.record_function(action_name)
        scope.__enter__()
        self._open.setdefault(action_name, []).append(scope)

    @override
    def stop(self, action_name: str) -> None:
        scopes = self._open.get(action_name)
        if scopes:
            scopes.pop().__exit__(None, None, None)


def _annotate(obj, method: str, label: str) -> None:
    """Wrap ``obj.method`` (on this instance only) in a record_function range named ``label``."""
    fn = getattr(obj, method, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    setattr(obj, method, wrapped)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ProfileSteps(pl.Callback):
    """Profile optimizer steps ``first`` .. ``first + count - 1`` (0-based) and write, per rank,
    ``<prefix>-rank<r>.json`` / ``.md`` (and rank 0's ``<prefix>-trace-rank0.json.gz`` when under
    :data:`TRACE_LIMIT_MB`)."""

    def __init__(self, first: int, count: int, prefix: Path, scratch: Path, meta: dict) -> None:
        if first < 0 or count < 1:
            raise ValueError(f"ProfileSteps needs first >= 0 and count >= 1, got first={first}, count={count}")
        self.first, self.count, self.prefix, self.scratch, self.meta = first, count, Path(prefix), Path(scratch), meta
        self._prof: torch.profiler.profile | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer.profiler = RecordFunctionProfiler()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"--profile times optimizer steps of one batch; accumulate_grad_batches is "
                             f"{trainer.accumulate_grad_batches}")
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:
            _annotate(engine, "backward", "[DeepSpeedEngine]backward")
            _annotate(engine, "step", "[DeepSpeedEngine]step")
            _annotate(getattr(engine, "optimizer", None), "step", "[DeepSpeedEngine]optimizer.step")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        done = trainer.global_step
        if not self.first <= done <= self.first + self.count:
            return
        _sync()
        if done == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()
        with torch.profiler.record_function(step_profile.BOUNDARY):
            pass
        if done == self.first + self.count:
            self._prof.stop()
            self._report(trainer.global_rank)
            # ranks export and analyse at different speeds; leave together so the next (timed) step waits on none
            trainer.strategy.barrier("ProfileSteps.report")

    def _report(self, rank: int) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        raw = self.scratch / f"trace-rank{rank}.json"
        self._prof.export_chrome_trace(str(raw))
        steps, avg = step_profile.profile_trace(step_profile.read_trace(raw))
        meta = dict(self.meta, rank=rank, profiled_steps=list(range(self.first, self.first + self.count)))
        if rank == 0:
            meta["trace"] = self._keep_trace(raw)
        Path(f"{self.prefix}-rank{rank}.json").write_text(json.dumps(step_profile.to_json(steps, avg, **meta),
                                                                     indent=1))
        title = f"SP = {meta.get('sp')}, rank {rank}: steps {meta['profiled_steps']} ({meta.get('device', '')})"
        Path(f"{self.prefix}-rank{rank}.md").write_text(step_profile.markdown(avg, title, len(steps)))
        raw.unlink()

    def _keep_trace(self, raw: Path) -> str:
        """Gzip ``raw`` next to the results; the path, or why it was left out."""
        dest = Path(f"{self.prefix}-trace-rank0.json.gz")
        with raw.open("rb") as src, gzip.open(dest, "wb", compresslevel=6) as out:
            shutil.copyfileobj(src, out)
        mb = dest.stat().st_size / 2**20
        if mb >= TRACE_LIMIT_MB:
            dest.unlink()
            return f"left out: {mb:.0f} MB gzipped (limit {TRACE_LIMIT_MB:.0f})"
        return str(dest)
