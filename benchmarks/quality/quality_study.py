"""SLA quality study at small scale: does SLA keep the quality of dense attention after fine-tuning?

Reproduces the paper's central claim (arXiv 2509.24006, Table 1) on the built-in synthetic text-to-video set:

1. pretrain a DiT with dense attention;
2. fine-tune copies for the same number of steps with (a) dense attention, twice with different seeds (data order
   and noise: the noise floor), (b) SLA at 95% sparsity, (c) sparse-only at 95% (``linear_scope='none'``: no linear
   branch), (d) linear-only (pure normalised linear attention, the feature map of SLA's linear branch, with a
   learnable output projection starting at identity);
3. report each fine-tune's validation flow-matching loss (held-out clips, fixed noise levels) over the fine-tune,
   FVD of sampled videos against held-out videos (the seeded random 3D-conv extractor for every variant and, given
   ``--i3d``, the I3D detector, which needs >= 10 frames), and the per-layer attention error: each layer's output
   against full attention on the same q, k, v, for fresh SLA / sparse-only / linear-only layers on the pretrained
   model and for each fine-tuned model on its own.

Expected ordering (paper): SLA ~ dense > sparse-only > linear-only. The verdict (study_report.py) checks SLA's final
loss within 1 % of dense, its FVD inside the dense seeds' spread, and the other two worse by more than that spread.

The loop is deliberately plain (one process, AdamW, bf16 autocast on GPU: SLA runs its Triton kernels, dense runs
SDPA) and uses DiTModule's objective (``DiTModule.losses``) without a Trainer, so every variant sees identical
batches and noise for one seed.

``--scene textured`` trains on clips whose background is a panning procedural texture instead of a flat colour
(``sla_dist.lightning.synthetic``): on the flat set the pretrained model's attention is diffuse (at 95 % sparsity the
kept blocks hold 8-35 % of the softmax mass, 2026-11-30-quality-attention-mass-cpu.md), so no 95 %-sparse map can
keep its outputs; textured, panning frames ask for local and cross-frame attention, as real video does. The default,
``plain``, is the scene of every result before it. A pretrained checkpoint records its scene, and the phases and
tools that read it run on that scene (``--scene`` may repeat it; another one is refused).

    PYTHONPATH=$PWD python3 benchmarks/quality/quality_study.py --preset gpu --out $OUT/quality   # one H200, ~7.5 min
    python benchmarks/quality/quality_study.py --preset cpu --cpu               # 2 CPU cores, ~1 hour
    python benchmarks/quality/quality_study.py --preset tiny --cpu --out /tmp/q # smoke test, seconds

The ``gpu`` preset (issue #15) and its time on one H200
--------------------------------------------------------
A VideoDiT of 8 layers, dim 384, 6 heads of 64, FFN 1536 (20.4 M parameters, 39 MiB in bf16) on clips of 16 x 48 x
48 latents = 9216 tokens per clip, 144 key blocks of 64: topk 0.05 keeps 7 critical blocks per query block (95.1 %
block sparsity). Batch 8, so a step trains on 73,728 tokens.

Estimate from first principles per clip and layer, forward + backward (a calibration run on the device replaces it;
the ``--time-budget`` plan below uses measured times, not these):

* dense attention: 3.5 x 4 L^2 d = 457 GFLOP at ~400 TFLOP/s (cuDNN at head dim 64; the 2026-11-29 H200 table has
  ~560 TFLOP/s at head dim 128): 1.14 ms;
* projections and MLP: 6 x 14 d^2 per token = 114 GFLOP at ~400 TFLOP/s: 0.29 ms;
* norms, RoPE, adaLN, GELU (memory-bound, ~180 kB per token at 4 TB/s): ~0.5 ms;

so ~2.0 ms x 64 clip-layers = 125 ms, plus ~25 ms per step of noise drawn on the CPU (DiTModule draws 4.7 M normals
on the host and copies them, a synchronising copy) and the optimizer: **dense ~0.15 s/step**. SLA replaces the 9.1
ms of dense attention per layer and step with ~4.3 ms (the scaling model's per-head fit, 0.134 ms at head dim 128,
taken as ~0.09 ms at 64, x 48 heads; its ~3.9 ms of host time per layer overlaps the GPU work of the rest): **SLA
~0.11 s/step, sparse-only ~0.10, linear-only ~0.085** (its float32 reference feature map, ~0.8 ms per layer). One
fine-tune step of each of the five runs: ~0.60 s. A no-grad forward of a batch ~0.05 s, so a validation pass (32
clips x 4 noise levels: 16 forwards, plus ~0.4 s of noise drawn on the host) ~1.2 s and the FVD sampling (64 clips x
12 Euler steps = 96 forwards) ~4.5 s per variant.

Phases of one call (``--phase all``), estimated: imports and CUDA start ~10 s; rendering 1344 clips on 8 worker
processes ~3 s (0.01 s a clip); the probe ~60 s (Triton compiles the SLA and sparse-only kernels with fixed launch
settings, ~50 s; then 3 timed steps, 3 forwards and a validation pass per variant); the plan then has ~370 s left,
keeps 8 % as margin and 66 s for evaluations (pretrain 6, fine-tunes 28), FVD sampling (22) and a 10 s reserve, and
fills the rest with training at 4 pretrain steps per fine-tune step: **~920 pretrain steps (~140 s) and ~230
fine-tune steps per variant (~140 s)**; about 420 s in all. The preset caps the steps at 1600 / 400; ``time_budget =
450`` s (from process start) lets ``plan_steps`` size them from the probe's measured times, so a faster or slower GPU
than estimated changes the step counts, not the wall time. Explicit ``--pretrain-steps`` / ``--finetune-steps`` are
kept as given (the other count is planned); ``--time-budget 0`` runs the caps.

Between calls: ``--phase pretrain`` writes the pretrained state as shards of <= 15 MiB (``pretrained-<i>-of-<n>.pt``;
``--phase all`` writes them too): the weights, AdamW's moments, the step count and the pretrain record
(study_checkpoint.py; the gpu preset's ``compact`` encoding, bf16 weights and a float8 second moment, makes 4 shards,
59 MiB, so that with the 3 report files they come back from one device call: at most 8 files, 64 MiB). ``--phase
finetune --resume-from DIR`` fine-tunes the weights; ``--phase pretrain --resume-from DIR`` continues the pretraining
where it stopped: weights, AdamW state, and the global step, on which the data order, the noise and the warm-up
depend, so two calls of N steps do what one call of 2N does (bit for bit with the ``exact`` encoding of the tiny and
cpu presets; with ``compact``, up to the bf16 rounding of the weights and the first moment restarting at zero, which
it averages over ~10 steps). Its ``--pretrain-steps`` counts the steps of this call, on top of the checkpoint's; left
out, the budget plans them from this call's probe as for a fresh pretrain (at most the preset's 1600 per call). The
results and the report show the total and each call's steps and validation curve. Files are read with
``torch.load(weights_only=True)``.

A longer pretrain over several device calls (each call at most ~9 minutes; ``--time-budget 510`` fills one with
~1600 dense steps at the 0.23 s/step measured on the H200). The device returns ``$OUT``; copy what came back into a
folder of the checkout that git ignores (e.g. ``.quality-ckpt``, listed in ``.git/info/exclude``) and carry it to
the next call:

    # call 1: pretrain from scratch; carry back $OUT/ckpt as .quality-ckpt
    python benchmarks/quality/quality_study.py --phase pretrain --time-budget 510 --out $OUT/ckpt
    # call 2 (carry .quality-ckpt): ~1600 more steps; carry back $OUT/ckpt as .quality-ckpt2
    python benchmarks/quality/quality_study.py --phase pretrain --resume-from .quality-ckpt --time-budget 510 \\
        --out $OUT/ckpt
    # call 3 (carry .quality-ckpt2): fine-tune dense, SLA and sparse-only 700 steps each (~450 s on the H200)
    python benchmarks/quality/quality_study.py --phase finetune --resume-from .quality-ckpt2 --time-budget 0 \\
        --finetune-steps 700 --dense-seeds 0 --baselines sparse_only --proj-lr-scale 10 --out $OUT/quality

``--proj-lr-scale X`` trains SLA's proj_l (zero at the start) and linear-only's projection at X times the fine-tune
lr (a second AdamW param group): at 1e-4 proj_l learned nothing measurable in 700 steps (2026-11-30 H200 run), at
1e-3 neither (393 steps, from a 1600-step pretrain). ``--calibrate-clips N`` starts SLA's fine-tune from proj_l
fitted by least squares to the dense model's attention on N training clips (``sla_dist.calibrate_projections``):
``attention_mass.py`` found that fit far below the sparse branch's error on the pretrained model, but on an
H200 the fine-tune from it ended behind sparse-only (results/2026-11-30-quality-study-h200-calibrated.md).
``linear_branch.py`` shows why neither helps: with the softmax feature map O_l is mostly one vector per head and
clip, and the proj_l that lowers one clip's attention error raises another's (2026-11-30-quality-linear-branch-cpu.md).
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # before the heavy imports below: the time budget counts from process start

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from datetime import date  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from sla_dist.eval.fvd import I3D_MIN_FRAMES, I3DFeatures, RandomVideoFeatures, VideoFVD  # noqa: E402
from sla_dist.lightning.module import DiTModule  # noqa: E402
from sla_dist.lightning.recipe import OptimSection  # noqa: E402
from sla_dist.lightning.synthetic import SCENES  # noqa: E402
from sla_dist.models import DiTConfig, VideoDiT, dit_config  # noqa: E402
from study_attention import candidate_errors, own_errors  # noqa: E402
from study_budget import Clock, Schedule, default_schedule, plan_steps  # noqa: E402
from study_checkpoint import Checkpoint, decoded, load_meta, load_pretrained, save_pretrained  # noqa: E402
from study_config import BASELINES, PRESETS, StudyConfig, checkpoint_scene, saved_config  # noqa: E402
from study_report import markdown_report, plot, verdict  # noqa: E402
from study_train import (  # noqa: E402
    VARIANTS, Data, Trainer, calibrate_sla, convert, fresh_core, fvd_scores, module_for, probe,
)

__all__ = ["PHASES", "PRESETS", "VARIANTS", "Study", "StudyConfig", "Trainer", "convert", "fresh_core", "main",
           "module_for", "pretrain_record", "run"]

PHASES = ("all", "pretrain", "finetune")
BLOCK = 64
"""Tokens per key block of the SLA layers (SLAConfig's default block_k)."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def fine_tune_runs(config: StudyConfig) -> list[tuple[str, str, int]]:
    """(name, variant, seed) of each fine-tune, most needed first: a run cut by a time limit keeps dense, SLA and
    the dense seed spread before the two baselines."""
    dense = [(f"dense_seed{s}", "dense", s) for s in config.dense_seeds]
    baselines = [(name, name, 0) for name in BASELINES if name in config.baselines]
    return [dense[0], ("sla", "sla", 0), *dense[1:], *baselines]


RESUME_FIELDS = ("scene", "frames", "size", "text_len", "train_samples", "val_samples", "fvd_videos")
"""StudyConfig fields a checkpoint must share with the run that reads it: the data (and the model, compared too)."""
PRETRAIN_FIELDS = ("batch_size", "pretrain_lr", "warmup_steps")
"""And with a run that continues its pretraining: the batches (data order) and the lr schedule."""


def _check_resumable(checkpoint: Checkpoint, config: StudyConfig, dit: DiTConfig, pretrain: bool) -> None:
    """The checkpoint's model and data (and, to continue pretraining, its optimizer settings and state) must be this
    run's: name every field that differs."""
    meta = checkpoint.meta
    saved, saved_model = saved_config(meta), meta["model"]
    here = asdict(config)
    fields = RESUME_FIELDS + (PRETRAIN_FIELDS if pretrain else ())
    diffs = [f"{k}: checkpoint {saved[k]!r}, this run {here[k]!r}" for k in fields if saved[k] != here[k]]
    model = json.loads(json.dumps(asdict(dit)))  # tuples as lists, as the checkpoint stores them
    diffs += [f"model.{k}: checkpoint {saved_model[k]!r}, this run {model[k]!r}" for k in model
              if json.loads(json.dumps(saved_model[k])) != model[k]]
    if diffs:
        raise ValueError("the pretrained checkpoint does not match this run: " + "; ".join(diffs))
    if pretrain and not checkpoint.optimizer:
        raise ValueError("the checkpoint holds no optimizer state (weights only, written before resumable "
                         "pretraining): it can be fine-tuned (--phase finetune) but not pretrained further")


def pretrain_record(previous: dict | None, info: dict) -> dict:
    """The pretraining across calls: the total steps, every call's steps, speed and validation curve (a resumed call
    starts with an evaluation of the weights as loaded) and the curves joined; train_s / eval_s / s_per_step are
    this call's. ``previous``: the record of the checkpoint resumed from (None for a fresh pretrain)."""
    call = {k: info[k] for k in ("start", "steps", "s_per_step", "train_s", "eval_s", "val_curve")}
    calls = []
    if previous is not None:
        # a record written before resumable pretraining is one call from step 0
        calls = previous.get("calls") or [{"start": 0, **{k: previous[k] for k in call if k != "start"}}]
    calls.append(call)
    return {"steps": info["start"] + info["steps"], "val_curve": [p for c in calls for p in c["val_curve"]],
            "calls": calls, **{k: info[k] for k in ("s_per_step", "train_s", "eval_s")}}


class Study:
    """One run of the study: phases, timings and the results written after every step that finishes."""

    def __init__(self, config: StudyConfig, device: torch.device, out: Path, phase: str, command: str,
                 started: float, i3d: str | None = None, fixed: frozenset[str] = frozenset()) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} is not one of {PHASES}")
        self.config, self.device, self.out, self.phase, self.fixed = config, device, out, phase, fixed
        self.clock = Clock(started, config.time_budget)
        self.dit = dit_config(config.model, **config.model_overrides)
        if i3d is not None and config.frames < I3D_MIN_FRAMES:
            raise ValueError(f"--i3d needs >= {I3D_MIN_FRAMES} frames; this study renders {config.frames}")
        self.i3d = i3d
        grid = (config.frames // self.dit.patch_size[0], config.size // self.dit.patch_size[1],
                config.size // self.dit.patch_size[2])
        tokens = math.prod(grid)
        self.results: dict = {
            "status": "running", "phase": phase, "command": command, "date": date.today().isoformat(),
            "device": "CPU" if device.type == "cpu" else None,  # named once the clips are rendered
            "torch": torch.__version__, "triton": _version("triton"),
            "sla_backend": ("Triton kernels, bf16 autocast" if device.type == "cuda"
                            else "PyTorch reference (CPU, float32)"),
            "config": asdict(config), "model": asdict(self.dit), "parameters": None, "tokens_per_clip": tokens,
            "key_blocks": math.ceil(tokens / BLOCK), "budget_s": config.time_budget,
            "schedule": default_schedule(config.workload()).as_dict(), "step_times": {}, "pretrain": None,
            "attention_before": None, "variants": {}, "timings": {}, "verdict": {}}

    def log(self, message: str) -> None:
        self.clock.log(message)

    def run(self, resume_from: Path | None = None) -> dict:
        c, timings = self.config, self.results["timings"]
        self.log(f"quality study, phase {self.phase}, on {self.device}: {self.results['tokens_per_clip']} tokens per "
                 f"clip ({self.results['key_blocks']} key blocks of {BLOCK}), sparsity {c.sparsity}")
        checkpoint = None if resume_from is None else load_pretrained(resume_from)
        if checkpoint is not None:
            _check_resumable(checkpoint, c, self.dit, pretrain=self.phase != "finetune")
            self.results["pretrain"] = checkpoint.meta["pretrain"]
            self.log(f"loaded the pretrained checkpoint {resume_from} ({checkpoint.meta['pretrain']['steps']} steps"
                     + (", with optimizer state)" if checkpoint.optimizer else ")"))
        self.data = Data(c, self.dit.in_channels, self.dit.text_dim, self.device)
        if self.device.type == "cuda":
            # asked only now: the render workers fork before this process touches CUDA
            self.results["device"] = torch.cuda.get_device_name(self.device)
        self.extractors = {"random": VideoFVD(RandomVideoFeatures().to(self.device), self.data.reference)}
        if self.i3d is not None:
            self.extractors["i3d"] = VideoFVD(I3DFeatures(self.i3d).to(self.device), self.data.reference)
        init = checkpoint.state if checkpoint is not None else DiTModule(self.dit, seed=0).model.state_dict()
        self.results["parameters"] = sum(v.numel() for v in init.values())
        timings["setup_s"] = self.clock.elapsed()
        self.log(f"data rendered on {self.results['device']}, {self.results['parameters'] / 1e6:.1f} M parameters")

        schedule = self._schedule(init)
        if self.phase == "finetune":
            schedule.pretrain_steps = checkpoint.meta["pretrain"]["steps"]
            state = checkpoint.state
        self.results["schedule"] = schedule.as_dict()
        if self.phase != "finetune":
            state = self._pretrain(schedule, checkpoint)
            if self.phase == "pretrain":
                return self._finish("pretrained")
        t0 = time.monotonic()
        self._attention_before(state)
        self._write()
        for name, variant, seed in fine_tune_runs(c):
            self._fine_tune(name, variant, seed, state, schedule)
            self._write()
        timings["finetune_s"] = time.monotonic() - t0
        return self._finish("complete")

    def _schedule(self, init: dict) -> Schedule:
        c = self.config
        if c.time_budget is None:
            return default_schedule(c.workload())
        t0 = time.monotonic()
        pretrain, finetune = self.phase != "finetune", self.phase != "pretrain"
        runs = [v for _, v, _ in fine_tune_runs(c)] if finetune else []
        variants = [v for v in VARIANTS if v in runs or (v == "dense" and pretrain)]
        times = probe(self.dit, init, variants, self.data, c, self.device, self.clock)
        self.results["step_times"] = {k: asdict(v) for k, v in times.items()}
        self.results["timings"]["probe_s"] = time.monotonic() - t0
        schedule = plan_steps(c.workload(), times, runs, self.clock.remaining(), pretrain=pretrain,
                              finetune=finetune, fixed=self.fixed)
        planned = ([f"pretrain {schedule.pretrain_steps} steps (cap {c.pretrain_steps})"] if pretrain else []) + (
            [f"fine-tune {schedule.finetune_steps} steps per variant (cap {c.finetune_steps})"] if finetune else [])
        total, left = sum(schedule.predicted_s.values()), self.clock.remaining()
        self.log(f"plan: {', '.join(planned)}; predicted seconds {schedule.predicted_s}, total {total:.0f} of the "
                 f"{left:.0f} left" + (" -- OVER BUDGET (steps fixed on the command line)" if total > left else ""))
        return schedule

    def _pretrain(self, schedule: Schedule, checkpoint: Checkpoint | None) -> dict:
        """Pretrain ``schedule.pretrain_steps`` steps, from scratch or on from ``checkpoint``; save the weights and
        AdamW's state; return the weights as a checkpoint loads them."""
        c = self.config
        init = None if checkpoint is None else checkpoint.state
        module = DiTModule(self.dit, OptimSection(lr=c.pretrain_lr), seed=0, init_state=init).to(self.device)
        trainer = Trainer(module, self.data, c.pretrain_lr, 0, c, warmup=c.warmup_steps)
        start, previous = 0, None
        if checkpoint is not None:
            previous = checkpoint.meta["pretrain"]
            start = previous["steps"]
            trainer.load_moments(checkpoint.optimizer, checkpoint.meta["optimizer_step"])
        info = trainer.run(schedule.pretrain_steps, schedule.pretrain_eval_every, self.clock, "pretrain", start)
        self.results["timings"]["pretrain_s"] = info["train_s"] + info["eval_s"]
        self.results["pretrain"] = pretrain_record(previous, info)
        meta = {"config": asdict(c), "model": asdict(self.dit), "pretrain": self.results["pretrain"],
                "optimizer_step": start + info["steps"], "checkpoint": c.checkpoint}
        paths = save_pretrained(self.out, module.model.state_dict(), meta, trainer.moments(), c.checkpoint)
        self.log(f"pretrained checkpoint ({c.checkpoint}, {start + info['steps']} steps in all) saved: "
                 f"{', '.join(p.name for p in paths)}")
        self._write()
        # every fine-tune starts from the weights as saved, so a split run fine-tunes the same model
        return decoded(module.model.state_dict(), c.checkpoint)

    def _attention_before(self, state: dict) -> None:
        c, dit = self.config, self.dit
        model = VideoDiT(dit).to(self.device)
        model.load_state_dict(state)
        latents, text = (t[:c.attention_samples] for t in self.data.held_out)
        candidates = {v: (lambda device, v=v: fresh_core(v, dit.head_dim, c, device)) for v in VARIANTS[1:]}
        self.results["attention_before"] = candidate_errors(model, latents, text, candidates)
        summary = {v: round(sum(r["error"]) / len(r["error"]), 4)
                   for v, r in self.results["attention_before"].items()}
        self.log(f"attention error before fine-tuning (mean relative L2 over layers): {summary}")

    def _fine_tune(self, name: str, variant: str, seed: int, state: dict, schedule: Schedule) -> None:
        c = self.config
        t0 = time.monotonic()
        module = module_for(self.dit, variant, seed, state, c.finetune_lr, c, self.device)
        calibration = None
        if variant == "sla" and c.calibrate_clips:
            latents, text = (t[:c.calibrate_clips] for t in self.data.train)
            calibration = calibrate_sla(module.model, latents, text, c.batch_size)
            self.log(f"{name}: proj_l calibrated on {c.calibrate_clips} clips, mean attention error "
                     f"{calibration['sparse_error']:.4f} -> {calibration['calibrated_error']:.4f}")
        trainer = Trainer(module, self.data, c.finetune_lr, seed, c, proj_lr_scale=c.proj_lr_scale)
        info = trainer.run(schedule.finetune_steps, schedule.finetune_eval_every, self.clock, name)
        if calibration is not None:
            info["calibration"] = calibration
        t1 = time.monotonic()
        scores = fvd_scores(module.model, self.data, c, self.extractors)
        info["sampling_s"] = time.monotonic() - t1
        if variant != "dense":
            latents, text = (t[:c.attention_samples] for t in self.data.held_out)
            info["attention_after"] = own_errors(module.model, latents, text)
        self.results["variants"][name] = {"variant": variant, "seed": seed, **info, **scores,
                                          "val_loss": info["val_curve"][-1][1], "seconds": time.monotonic() - t0}
        self.log(f"{name} done: val loss {info['val_curve'][-1][1]:.4f}, "
                 + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    def _write(self) -> None:
        self.results["timings"]["total_s"] = self.clock.elapsed()
        self.results["verdict"] = verdict(self.results)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "quality-study.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "quality-study.md").write_text(markdown_report(self.results, "quality-study.png"))

    def _finish(self, status: str) -> dict:
        self.results["status"] = status
        self._write()
        plot(self.results, self.out / "quality-study.png")
        self.log(f"done ({status}): {self.out / 'quality-study.md'}")
        print((self.out / "quality-study.md").read_text(), flush=True)
        return self.results


def run(config: StudyConfig, device: torch.device, out: Path, *, phase: str = "all",
        resume_from: Path | None = None, i3d: str | None = None, fixed: frozenset[str] = frozenset(),
        command: str = "", started: float | None = None) -> dict:
    """Run the study (see the module docstring); returns the results also written to ``out``."""
    study = Study(config, device, out, phase, command, _STARTED if started is None else started, i3d, fixed)
    return study.run(resume_from)


def main(argv: list[str] | None = None) -> int:
    workflow = __doc__[__doc__.index("A longer pretrain over several device calls"):]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=workflow,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu",
                        help="sizes and schedule: gpu (default, one H200 in ~7.5 min), cpu (about an hour on 2 "
                             "cores), tiny (smoke test)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (SLA uses its PyTorch reference)")
    parser.add_argument("--phase", choices=PHASES, default="all",
                        help="all (default); pretrain: pretrain (from scratch, or on from --resume-from) and save "
                             "the weights and optimizer state to --out; finetune: fine-tune the weights of "
                             "--resume-from")
    parser.add_argument("--resume-from", type=Path,
                        help="folder holding a pretrain phase's pretrained-*.pt shards: --phase finetune fine-tunes "
                             "its weights, --phase pretrain continues its pretraining (weights, AdamW state, step "
                             "count: data order and lr schedule go on where it stopped)")
    parser.add_argument("--i3d", help="I3D TorchScript detector for the standard FVD")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"), help="output directory")
    parser.add_argument("--pretrain-steps", type=int,
                        help="fixed pretrain steps of this call (not planned from the budget); with --phase pretrain "
                             "--resume-from: this many MORE steps, on top of the checkpoint's (the results record "
                             "the total). Without it the budget plans this call's steps, at most the preset's cap")
    parser.add_argument("--finetune-steps", type=int, help="fixed fine-tune steps (not planned from the budget)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds from process start to fit the run in (plans the steps from measured step "
                             "times); 0 turns the preset's budget off (the gpu preset's caps, 1600 + 5 x 400 "
                             "steps, then take ~11 min by the docstring's estimate: more than one device call)")
    parser.add_argument("--scene", choices=SCENES,
                        help="background of the synthetic clips: plain (default: flat, the earlier results) or "
                             "textured (a panning procedural texture, as real video). With --resume-from: the "
                             "checkpoint's scene (another one is refused)")
    parser.add_argument("--sparsity", type=float, help="block sparsity of the SLA variants (default 0.95)")
    parser.add_argument("--proj-lr-scale", type=float,
                        help="fine-tune lr of SLA's proj_l and linear-only's projection, as a multiple of the "
                             "fine-tune lr (default 1; a positive finite number)")
    parser.add_argument("--calibrate-clips", type=int,
                        help="fit SLA's proj_l to the dense model's attention on this many training clips before "
                             "its fine-tune (least squares; default 0: proj_l starts at zero)")
    parser.add_argument("--feature-map", choices=("softmax", "elu", "relu"), help="phi of the linear branch")
    parser.add_argument("--teacher-weight", type=float,
                        help="distillation weight towards the dense pretrained model in the non-dense fine-tunes")
    parser.add_argument("--dense-seeds", type=int, nargs="+", help="seeds of the dense fine-tunes (default 0 1)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES,
                        help="baseline fine-tunes besides dense and SLA (default: sparse_only linear_only)")
    parser.add_argument("--autotune", action="store_true",
                        help="autotune the SLA kernels (compiles every launch setting: minutes; default: fixed)")
    args = parser.parse_args(argv)
    if args.phase == "finetune" and args.resume_from is None:
        parser.error("--phase finetune needs --resume-from (the folder of a pretrain phase's weights)")
    if args.phase == "all" and args.resume_from is not None:
        parser.error("--resume-from is for --phase pretrain or finetune, not --phase all")
    overrides = {k: v for k, v in (("pretrain_steps", args.pretrain_steps), ("finetune_steps", args.finetune_steps),
                                   ("sparsity", args.sparsity), ("feature_map", args.feature_map),
                                   ("proj_lr_scale", args.proj_lr_scale), ("calibrate_clips", args.calibrate_clips),
                                   ("teacher_weight", args.teacher_weight), ("dense_seeds", args.dense_seeds),
                                   ("baselines", args.baselines), ("scene", args.scene)) if v is not None}
    if args.time_budget is not None:
        overrides["time_budget"] = args.time_budget or None
    try:
        if args.resume_from is not None:
            overrides["scene"] = checkpoint_scene(load_meta(args.resume_from), args.scene)
        config = dataclasses.replace(PRESETS[args.preset], **overrides)
    except ValueError as err:
        parser.error(str(err))
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu (with --preset cpu or tiny) to run on CPU")
    if not args.autotune:
        os.environ.setdefault("SLA_DIST_AUTOTUNE", "0")
    device = torch.device("cpu" if args.cpu else "cuda")
    command = shlex.join(["python", "benchmarks/quality/quality_study.py", *(sys.argv[1:] if argv is None else argv)])
    fixed = frozenset(k for k in ("pretrain_steps", "finetune_steps") if k in overrides)
    run(config, device, args.out, phase=args.phase, resume_from=args.resume_from, i3d=args.i3d, fixed=fixed,
        command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
