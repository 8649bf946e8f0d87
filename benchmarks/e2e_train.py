"""End to end on the path a user takes: ``launch/torchrun.sh`` trains the recipe at SP = 1 (one process) and SP = 2
(two), the SP = 2 run is resumed once by rerunning its command with more steps, and ``sla-dist export`` turns its
last checkpoint into a safetensors file that must load into the recipe's VideoDiT.

    python benchmarks/e2e_train.py --out $OUT/e2e_train    # 2 GPUs: wan1.3b, 12 steps + 6 resumed, 5-7 min
    python benchmarks/e2e_train.py --cpu                    # tiny recipe, gloo, 4 + 2 steps (what the CPU test runs)
    python benchmarks/e2e_train.py --preset wan14b-sp4      # 4 GPUs: the 14B recipe's shape at SP = 4, ZeRO-3
    python benchmarks/e2e_train.py --preset wan14b-sp2dp2   # 4 GPUs: the same at SP = 2 x DP = 2, 4 steps

A preset (PRESETS) fixes the recipe, steps and per-phase limits and the runs: one per SP size (``--sizes``), each
``--dp`` data-parallel replicas wide, the last one resumed and exported; the default ``gpu`` preset is the 2-GPU
run described here. ``--sizes``, ``--dp`` and ``--limit NAME=SECONDS`` change a preset's runs and limits.

The SP = 2 run saves every 6 steps (the resume starts from its step-12 save), SP = 1 only after its last step. On
GPUs the runs go one after the other; with --cpu the SP = 1 and SP = 2 runs overlap (CPU timings mean nothing, and
this keeps the test short).

Every phase runs under its own time limit (a timed-out phase is killed with its process group and reported as
rc 124). Checked: each run ends with its ``step{N}.ckpt`` linked as ``last.ckpt`` and finite losses; the resumed
session starts at the step the first one ended on and logs each step exactly once (a restart from 0 would log the
early steps twice); the export loads, without unpickling (safetensors), into ``VideoDiT`` with the recipe's SLA
layers, every key and shape matching, every value finite.

Measured, from the run's own CSV log (``trainer.log_every_n_steps=1``, so SLACallback's per-step sparsity
measurement, one block-map prediction per layer, is in every step; the recipe does it every 10th): the median
``train/step_time`` and ``train/tokens_per_sec`` (tokens of all data-parallel replicas) over the session's steps
after the first ``warmup`` ones (compilation, autotuning) and without the steps that saved a checkpoint; the SLA topk
those steps ran (``sparsity.anneal_steps=0``: the recipe's target from step 0). Peak memory per rank is the highest
``memory.used`` nvidia-smi reported for the rank's GPU while the phase ran (allocator cache and CUDA context
included: what must fit), not measured on CPU.

On the GPU machines deepspeed and omegaconf come from wheels: carry ``.whl`` and start the device command with the
install line ``../shared/tools/device-wheels`` prints (see ``benchmarks/gpu_suite.sh``, part ``e2e``).
Writes <out>.json and <out>.md (default: benchmarks/results/<date>-e2e-train-<card>) and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from results_io import save_results  # this script's folder is on sys.path when it runs

ROOT = Path(__file__).resolve().parents[1]
TIMED_OUT = 124
"""The exit code of a phase killed at its time limit (as coreutils' ``timeout`` reports it)."""


@dataclass(frozen=True)
class Preset:
    """What the phases run: the recipe, its shortening overrides, step counts, per-phase time limits (s) and the
    runs' layout: one training run per SP size in ``sizes`` (one after the other on GPUs), each ``dp`` data-parallel
    replicas wide (sizes x dp processes); the last one is resumed for ``resume_steps`` more (0: not resumed) and,
    with ``export``, exported."""

    recipe: str
    steps: int
    every: int
    resume_steps: int
    warmup: int
    limits: dict
    overrides: tuple[str, ...]
    sizes: tuple[int, ...] = (1, 2)
    dp: int = 1
    export: bool = True

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1 or self.dp < 1:
            raise ValueError(f"sizes={self.sizes} and dp={self.dp} must be positive (at least one size)")
        if len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes={self.sizes}: each SP size runs once (its runs share a directory name)")
        if self.steps < 1 or self.every < 1 or self.resume_steps < 0 or self.warmup < 0:
            raise ValueError(f"steps={self.steps} and every={self.every} must be >= 1, resume_steps="
                             f"{self.resume_steps} and warmup={self.warmup} >= 0")
        missing = [name for name in self.phases if name not in self.limits]
        if missing:
            raise ValueError(f"no time limit for phase(s) {missing} (limits: {self.limits}); give --limit NAME=SECONDS")

    def run_name(self, sp: int) -> str:
        """``sp{sp}``, with ``dp{dp}`` appended when the runs are data parallel too."""
        return f"sp{sp}" + (f"dp{self.dp}" if self.dp > 1 else "")

    @property
    def phases(self) -> list[str]:
        return ([self.run_name(sp) for sp in self.sizes] + (["resume"] if self.resume_steps else [])
                + (["export"] if self.export else []))


SHORTEN = ("trainer.log_every_n_steps=1", "trainer.progress_bar=false", "sample.enabled=false",
           "sparsity.dense_steps=0", "sparsity.anneal_steps=0", "model.checkpoint_blocks=true")
PRESETS = {
    # ~5 min of phases on 2 H200s after the wheel install; the limits add up to 470 s (suite part e2e: 500 s).
    # SP = 1 is the longest: the first run compiles and autotunes the kernels (Triton caches both on disk).
    "gpu": Preset("recipes/wan1.3b_sla_finetune.yaml", steps=12, every=6, resume_steps=6, warmup=3,
                  limits={"sp1": 170, "sp2": 120, "resume": 100, "export": 80}, overrides=SHORTEN),
    # A CI run on a busy 2-core machine hit the earlier 60 s limits in the SP = 1 and SP = 2 phases: room for slow
    # machines (a phase that hangs still ends at its limit).
    "cpu": Preset("recipes/tiny_cpu.yaml", steps=4, every=2, resume_steps=2, warmup=1,
                  limits={"sp1": 240, "sp2": 240, "resume": 180, "export": 120},
                  overrides=SHORTEN + ("trainer.accelerator=cpu", "data.batch_size=2", "data.num_workers=0")),
    # Issue #16, 4 GPUs: recipes/wan14b_sla_sp8.yaml at its full width (dim 5120, 40 heads, 75600 tokens a sample)
    # with 4 of its 40 blocks, ZeRO-3, activation checkpointing (gpu_suite.sh adds fixed kernel launch settings,
    # SLA_DIST_AUTOTUNE=0). The depth is cut for the disk and the 10-minute call: a full-depth ZeRO-3 checkpoint
    # (bf16 weights + fp32 master, m, v: 14 B x 14.3e9 parameters = 200 GB) would not fit twice on the 4-GPU
    # machine's 235 GB disk, and building 14.3e9 parameters on the CPU takes ~11 ns each (one thread on the
    # project's CPU machine: 6.5 s for the 0.58e9 of one block and the embeddings), ~160 s a rank before DeepSpeed
    # sees the model. Four blocks: 1.64e9 parameters, 23 GB a checkpoint (the 1.3B's 20 GB saved in ~15 s on 2
    # H200s), ~18 s to build; scaling_model.py predicts ~1 s a step. SP 4: 6 steps saving every 3, resumed for 3
    # more, exported; the limits add up to 460 s (suite part wan14b-sp4: 520 s, in a 600 s call with the install).
    "wan14b-sp4": Preset("recipes/wan14b_sla_sp8.yaml", steps=6, every=3, resume_steps=3, warmup=1,
                         limits={"sp4": 210, "resume": 160, "export": 90},
                         overrides=SHORTEN + ("model.num_layers=4",), sizes=(4,)),
    # The same model at SP 2 x DP 2 (ZeRO-3 over all 4 ranks): 4 steps, one save at the end, neither resumed nor
    # exported (wan14b-sp4 covers those).
    "wan14b-sp2dp2": Preset("recipes/wan14b_sla_sp8.yaml", steps=4, every=4, resume_steps=0, warmup=1,
                            limits={"sp2dp2": 240}, overrides=SHORTEN + ("model.num_layers=4",), sizes=(2,), dp=2,
                            export=False),
}


@dataclass
class Phase:
    """One launched command and what was read back from it."""

    name: str
    procs: int
    rc: int | None = None
    wall_s: float = 0.0
    steps: tuple[int, int] | None = None
    """(first, end) optimizer steps of this session."""
    step_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    topk: float | None = None
    peak_gib: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.problems


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_limited(cmd: list[str], log: Path, limit: float, env: dict) -> tuple[int, float]:
    """Run ``cmd`` in its own process group with stdout + stderr to ``log``; (exit code, seconds). At ``limit``
    seconds the whole group (torchrun and its workers) gets SIGTERM, then SIGKILL, and the code is TIMED_OUT."""
    start = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            rc = TIMED_OUT
    return rc, time.perf_counter() - start


def parse_smi_line(line: str) -> tuple[int, float] | None:
    """(GPU index, MiB used) from a line of ``nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,
    nounits``; None for anything else (nvidia-smi's warnings)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    try:
        return int(parts[0]), float(parts[1])
    except ValueError:
        return None


class GpuMemory:
    """Highest ``memory.used`` of each GPU while the ``with`` block runs, from nvidia-smi polled every 200 ms."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.peak_mib: dict[int, float] = {}
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuMemory:
        if self.enabled and shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used",
                                           "--format=csv,noheader,nounits", "-lms", "200"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_smi_line(line)
            if sample is not None:
                self.peak_mib[sample[0]] = max(self.peak_mib.get(sample[0], 0.0), sample[1])

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=5)

    def peak_gib(self, ranks: int) -> list[float]:
        """Peaks of the first ``ranks`` visible GPUs (rank r uses visible GPU r under torchrun), in GiB."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        indices = [int(i) for i in visible.split(",")] if re.fullmatch(r"\d+(,\d+)*", visible) else range(ranks)
        return [self.peak_mib[i] / 1024 for i in list(indices)[:ranks] if i in self.peak_mib]


def session_rows(output_dir: Path) -> list[dict]:
    """The rows of the run's newest CSV log version that hold ``train/step_time``, in file order."""
    versions = sorted((output_dir / "logs" / "csv").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        return []
    with versions[-1].open(newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("train/step_time")]


def steady_steps(first: int, end: int, warmup: int, every: int) -> list[int]:
    """The steps of a session [first, end) that time training alone: not its first ``warmup`` ones and not those
    that saved a checkpoint (the logged row of step s is the (s+1)-th optimizer step, whose end saves when s + 1 is
    a multiple of ``every`` or the last step)."""
    return [s for s in range(first + warmup, end) if (s + 1) % every and s + 1 != end]


def _median(rows: dict[int, dict], steps: list[int], key: str) -> float | None:
    values = [float(rows[s][key]) for s in steps if s in rows and rows[s].get(key)]
    return statistics.median(values) if values else None


def read_session(phase: Phase, output_dir: Path, log: Path, first: int, end: int, warmup: int, every: int) -> None:
    """Check that the session ran steps [first, end) once each and saved ``step{end}.ckpt``; fill in the medians."""
    summary = re.findall(r"this session: (\d+) -> (\d+)", log.read_text(errors="replace"))
    phase.steps = tuple(map(int, summary[-1])) if summary else None
    if phase.steps != (first, end):
        phase.problems.append(f"the session ran steps {phase.steps}, not ({first}, {end})")
    rows = session_rows(output_dir)
    logged = [int(r["step"]) for r in rows]
    if logged != list(range(end)):
        phase.problems.append(f"logged steps {logged} are not 0..{end - 1} once each")
    by_step = {int(r["step"]): r for r in rows}
    losses = [float(by_step[s]["train/loss"]) for s in range(first, end) if by_step.get(s, {}).get("train/loss")]
    if len(losses) != end - first or not all(map(math.isfinite, losses)):
        phase.problems.append(f"losses of steps {first}..{end - 1}: {losses}")
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_symlink() or os.readlink(last) != f"step{end}.ckpt":
        phase.problems.append(f"{last} does not link to step{end}.ckpt")
    steady = steady_steps(first, end, warmup, every)
    phase.step_s = _median(by_step, steady, "train/step_time")
    phase.tokens_per_s = _median(by_step, steady, "train/tokens_per_sec")
    phase.mfu = _median(by_step, steady, "train/mfu")
    phase.topk = _median(by_step, steady, "sla/topk")
    phase.note = f"median of steps {steady}"


def check_export(phase: Phase, path: Path, recipe_file: Path) -> None:
    """The exported file is a safetensors file (loading it unpickles nothing) that loads into the VideoDiT of the
    run's recipe with its SLA layers (eval's loader: strict keys and shapes) and holds finite values."""
    from sla_dist.eval.checkpoints import load_model, sla_layers
    from sla_dist.lightning.checkpoint import is_safetensors
    from sla_dist.lightning.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    if not is_safetensors(path):
        phase.problems.append(f"{path} is not a safetensors file")
        return
    try:
        model = load_model(path, recipe)
    except (ValueError, FileNotFoundError) as exc:
        phase.problems.append(str(exc))
        return
    state = model.state_dict()
    bad = [name for name, value in state.items() if not math.isfinite(float(value.float().sum()))]  # NaN, inf
    if bad:
        phase.problems.append(f"non-finite values in {bad[:5]}")
    layers = sla_layers(state)
    if recipe.sparsity.enabled and not layers:
        phase.problems.append("the export has no SLA layer (no proj_l)")
    params = sum(v.numel() for v in state.values())
    phase.note = f"loaded: {len(state)} tensors, {params / 1e6:.1f} M values, SLA in {len(layers)} layers"


@dataclass(frozen=True)
class TrainRun:
    """One ``launch/torchrun.sh`` command: ``procs`` processes training ``output_dir`` over steps [first, end),
    saving every ``every`` steps and after the last."""

    name: str
    procs: int
    output_dir: Path
    overrides: tuple[str, ...]
    first: int
    end: int
    every: int


def train_phase(run: TrainRun, recipe: str, preset: Preset, env: dict, gpus: bool, logs: Path) -> Phase:
    phase = Phase(run.name, run.procs)
    log = logs / f"{run.name}.log"
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), recipe, f"output_dir={run.output_dir}", *run.overrides,
           f"trainer.checkpoint_every={run.every}", f"trainer.max_steps={run.end}"]
    limit = preset.limits[run.name]
    print(f"[{run.name}] NPROC={run.procs} {' '.join(cmd)}  (limit {limit} s, log {log})", flush=True)
    with GpuMemory(enabled=gpus) as memory:
        phase.rc, phase.wall_s = run_limited(cmd, log, limit, {**env, "NPROC": str(run.procs),
                                                               "MASTER_PORT": str(_port())})
    phase.peak_gib = memory.peak_gib(run.procs)
    if phase.rc == 0:
        read_session(phase, run.output_dir, log, run.first, run.end, preset.warmup, run.every)
    _report_failure(phase, log)
    return phase


def export_phase(run_dir: Path, preset: Preset, env: dict, logs: Path) -> Phase:
    """``sla-dist export`` of the run's last checkpoint, then :func:`check_export` of the file."""
    phase = Phase("export", 1)
    target, log = run_dir / "model.safetensors", logs / "export.log"
    cmd = [sys.executable, "-m", "sla_dist.cli", "export", str(run_dir / "checkpoints" / "last.ckpt"), str(target)]
    print(f"[export] {' '.join(cmd)}  (limit {preset.limits['export']} s)", flush=True)
    phase.rc, phase.wall_s = run_limited(cmd, log, preset.limits["export"], env)
    if phase.rc == 0:
        start = time.perf_counter()
        check_export(phase, target, run_dir / "recipe.yaml")
        phase.note += f"; the check took {time.perf_counter() - start:.0f} s"
    _report_failure(phase, log)
    return phase


def _limit(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = 0.0
    if not sep or not name or value <= 0:
        raise argparse.ArgumentTypeError(f"--limit {text!r} is not NAME=SECONDS with positive seconds")
    return name, value


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The named preset (``cpu`` with --cpu) with --sizes, --dp and --limit applied."""
    preset = PRESETS["cpu" if args.cpu else args.preset]
    changes: dict = {}
    if args.sizes is not None:
        changes["sizes"] = tuple(args.sizes)
    if args.dp is not None:
        changes["dp"] = args.dp
    if args.limit:
        changes["limits"] = {**preset.limits, **dict(args.limit)}
    return dataclasses.replace(preset, **changes)


def plan(preset: Preset, work: Path, extra: tuple[str, ...] = ()) -> list[TrainRun]:
    """The training runs in order: one per SP size, then the resume of the last one. The resumed run saves every
    ``preset.every`` steps, the others only after their last step (one save each is enough to check)."""
    end, runs = preset.steps, []
    for i, sp in enumerate(preset.sizes):
        name, last = preset.run_name(sp), i == len(preset.sizes) - 1
        runs.append(TrainRun(name, sp * preset.dp, work / name, (f"parallel.sp_size={sp}", *preset.overrides, *extra),
                             0, end, preset.every if last else end))
    if preset.resume_steps:
        runs.append(dataclasses.replace(runs[-1], name="resume", first=end, end=end + preset.resume_steps))
    return runs


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Preset]:
    """The command line and the preset it selects, with its changes applied (a bad one exits with its message)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="the tiny recipe on CPU processes with gloo; the first runs all run at the same time")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu",
                        help="recipe, steps, time limits and runs (default: gpu; --cpu picks cpu)")
    parser.add_argument("--recipe", help="recipe to run instead of the preset's")
    parser.add_argument("--sizes", type=int, nargs="+", help="SP sizes of the training runs instead of the preset's "
                        "(the last one is resumed and exported); a size the preset has no limit for needs --limit")
    parser.add_argument("--dp", type=int, help="data-parallel replicas of every run (processes: SP size x dp)")
    parser.add_argument("--limit", type=_limit, action="append", default=[], metavar="NAME=SECONDS",
                        help="time limit of a phase (sp4, sp2dp2, resume, export, ...), repeatable")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary directory, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' checkpoints and directories")
    parser.add_argument("--out", help="results stem: <out>.json and <out>.md")
    parser.add_argument("overrides", nargs="*",
                        help="more recipe key=value overrides for every run (not of the steps or checkpoint interval)")
    args = parser.parse_args(argv)
    try:
        return args, preset_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    args, preset = parse(argv)
    recipe = str(Path(args.recipe).resolve()) if args.recipe else preset.recipe  # the runs start in ROOT
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sla_e2e_")).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if args.cpu:
        env["OMP_NUM_THREADS"] = "1"
    runs = plan(preset, work, tuple(args.overrides))
    first, resume = runs[:len(preset.sizes)], runs[len(preset.sizes):]
    train = functools.partial(train_phase, recipe=recipe, preset=preset, env=env, gpus=not args.cpu, logs=logs)
    if args.cpu:  # the CPU timings mean nothing: overlap the first runs to keep the CI test short
        with ThreadPoolExecutor(len(first)) as pool:
            phases = list(pool.map(train, first))
    else:  # one after the other: each run has the GPUs alone
        phases = []
        for run in first:
            phases.append(train(run))
            if run is not first[-1] and not args.keep:  # free its checkpoint (~20 GB for wan1.3b) before the next
                shutil.rmtree(run.output_dir / "checkpoints", ignore_errors=True)  # run: only its logs are read
    for run in resume:
        phases.append(train(run) if phases[-1].ok else _skipped(run.name, run.procs, f"the {phases[-1].name} run"))
    if preset.export:  # the resumed run's checkpoint; the first run's when the resume failed (a device call's worth)
        trained = phases[len(first) - 1]
        if phases[-1].ok or trained.ok:
            phases.append(export_phase(first[-1].output_dir, preset, env, logs))
            if not phases[-2].ok:
                phases[-1].note += f"; exported {trained.name}'s step{trained.steps[1]}.ckpt: {phases[-2].name} failed"
        else:
            phases.append(_skipped("export", 1, f"the {trained.name} run"))
    _save(phases, preset, recipe, args)
    failed = [p.name for p in phases if not p.ok]
    print(f"e2e_train: {len(phases) - len(failed)} phases passed, {len(failed)} failed {failed or ''}".rstrip())
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(p.ok for p in phases) else 1


def _skipped(name: str, procs: int, failed: str) -> Phase:
    return Phase(name, procs, problems=[f"skipped: {failed} failed"])


def _report_failure(phase: Phase, log: Path) -> None:
    if phase.ok:
        return
    print(f"[{phase.name}] FAILED (rc {phase.rc}): {'; '.join(phase.problems)}\n--- last lines of {log}:")
    print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), flush=True)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(phases: list[Phase], sizes: tuple[int, ...] = (1, 2)) -> str:
    """The phases' rows; with more than one SP size, each larger size's tokens/s against the smallest's scaled by
    the ratio of their sizes (``phases`` starts with one run per size, in ``sizes``' order)."""
    lines = ["| phase | procs | rc | wall s | steps | step s | tokens/s | MFU | peak GiB / rank | topk | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        steps = "-" if p.steps is None else f"{p.steps[0]} -> {p.steps[1]}"
        peak = " / ".join(f"{g:.1f}" for g in p.peak_gib) or "-"
        failed = f"timed out after {p.wall_s:.0f} s" if p.rc == TIMED_OUT else f"exit code {p.rc}"
        check = "ok" if p.ok else "; ".join(p.problems) or failed
        lines.append(f"| {p.name} | {p.procs} | {p.rc} | {p.wall_s:.0f} | {steps} | {_fmt(p.step_s, '.3f')} | "
                     f"{_fmt(p.tokens_per_s, '.0f')} | {_fmt(p.mfu and 100 * p.mfu, '.1f')} | {peak} | "
                     f"{_fmt(p.topk, '.3g')} | {check}{f' ({p.note})' if p.note else ''} |")
    base, small = phases[0], sizes[0]
    for size, p in zip(sizes[1:], phases[1:len(sizes)]):
        if base.tokens_per_s and p.tokens_per_s:
            ratio = size / small
            lines.append(f"\nSP = {size} tokens/s over {ratio:g} x SP = {small}: "
                         f"{p.tokens_per_s / (ratio * base.tokens_per_s):.0%}")
    return "\n".join(lines)


def _card(cpu: bool) -> str:
    if cpu or not shutil.which("nvidia-smi"):
        return "cpu"
    names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True).stdout.split("\n")
    return names[0].strip() or "gpu"


def _save(phases: list[Phase], preset: Preset, recipe: str, args: argparse.Namespace) -> None:
    card = _card(args.cpu)
    text = table(phases, preset.sizes)
    gpus = max(sp * preset.dp for sp in preset.sizes)
    meta = dict(recipe=recipe, preset=dataclasses.asdict(preset), overrides=args.overrides, gpus=gpus)
    last = f"SP = {preset.sizes[-1]}" + (f" x DP = {preset.dp}" if preset.dp > 1 else "")
    runs = ", ".join(f"SP = {sp}" for sp in preset.sizes) + (f", each x DP = {preset.dp}" if preset.dp > 1 else "")
    then = ([f"resumed for {preset.resume_steps} more at {last}"] if preset.resume_steps else []) + (
        ["then `sla-dist export`"] if preset.export else [])
    preamble = (f"`python benchmarks/e2e_train.py {' '.join(sys.argv[1:])}`: `launch/torchrun.sh {recipe}` with "
                f"`{' '.join(preset.overrides + tuple(args.overrides))}`, {runs}, {preset.steps} steps ({last}: "
                f"checkpoint every {preset.every}){''.join(', ' + t for t in then)}. Step time and tokens/s: "
                f"medians of the run's logged values without the first {preset.warmup} steps of a session and "
                "without checkpoint steps; peak memory: nvidia-smi's memory.used per GPU.")
    save_results("e2e-train", card, meta, [dataclasses.asdict(p) | {"ok": p.ok} for p in phases],
                 "End-to-end training", preamble, text, out=Path(args.out) if args.out else None, tiny=args.cpu)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
