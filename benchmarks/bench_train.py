"""Training throughput of a recipe under SLAStrategy: tokens/s, step time and peak memory per sequence-parallel size.

For each SP size P it launches ``torchrun --nproc_per_node P`` on this script (worker mode), which trains the recipe
for --steps optimizer steps with sp_size = P (one SP group: data parallel 1) and times the steps after --warmup.

    python benchmarks/bench_train.py                                   # wan1.3b recipe shape, SP = 2 and 4, GPUs
    python benchmarks/bench_train.py --sizes 2 --cpu --recipe recipes/tiny_cpu.yaml   # CPU / gloo smoke test

Prints a table last and writes JSON to --out.

With ``--profile``, torch.profiler (CPU + CUDA) records the --profile-steps steps right after --warmup on every rank
(train_profile.py), and step_profile.py splits each step's wall time: GPU kernel time by category (SLA kernels,
GEMMs, the Ulysses all-to-all, ZeRO's reduce-scatter / reduce / all-gather / all-reduce, optimizer, copies,
elementwise), compute vs exposed collectives vs idle, and the CPU ranges of Lightning's hooks and the DeepSpeed
engine. Per rank: ``<out stem>-profile-sp<P>-rank<r>.json`` / ``.md`` beside --out, and rank 0's Chrome trace of
those steps (``...-trace-rank0.json.gz``, kept below 30 MB gzipped); the tables are printed last. The profiled steps
are left out of step_s (the profiler slows them), so --steps must leave at least one step after them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch

    from sla_dist.lightning.callback import SLACallback
    from sla_dist.lightning.recipe import load_recipe
    from sla_dist.lightning.run import train
    from train_profile import ProfileSteps  # this script's folder is on sys.path when it runs

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.eager: list[bool] = []  # per step: compiled code forced eager by SLACallback (see its docstring)
            self.tokens = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()
            lat = batch["latents"]
            grid = pl_module.model.token_grid(lat.shape)
            self.tokens = lat.shape[0] * grid[0] * grid[1] * grid[2]

        def on_before_backward(self, trainer, pl_module, loss) -> None:  # mid-step: after every batch-start hook
            self.eager.append(any(isinstance(c, SLACallback) and c.runs_eagerly for c in trainer.callbacks))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)

    sp = int(os.environ["WORLD_SIZE"])
    # No log row (so no SLACallback measurement, which runs compiled models eagerly) unless the overrides ask for one.
    overrides = [f"output_dir={args.workdir}", f"trainer.max_steps={args.steps}", f"trainer.devices={sp}",
                 f"parallel.sp_size={sp}", "trainer.progress_bar=false", "sample.enabled=false",
                 f"trainer.checkpoint_every={10 * args.steps}", f"trainer.log_every_n_steps={10 * args.steps}",
                 *args.overrides]
    if args.cpu:
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    recipe = load_recipe(args.recipe, overrides)
    timer = Timer()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    callbacks: list[pl.Callback] = [timer]
    profiled = args.profile_steps if args.profile_prefix else 0
    if profiled:  # last: the other callbacks' batch-end work then falls inside the step it belongs to
        meta = {"sp": sp, "device": device, "recipe": str(args.recipe), "overrides": args.overrides}
        callbacks.append(ProfileSteps(args.warmup, profiled, Path(args.profile_prefix), Path(args.workdir) /
                                      "profile", meta))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(recipe, resume=False, extra_callbacks=callbacks)
    if int(os.environ["RANK"]) == 0:
        first = args.warmup + profiled
        timed = slice(first if len(timer.times) > first else 0, None)  # all steps when none is left after warm-up
        steps = sorted(timer.times[timed])
        step = steps[len(steps) // 2]
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        result = {"sp": sp, "tokens_per_step": timer.tokens, "step_s": step, "tokens_per_s": timer.tokens / step,
                  "peak_mem_gib": mem, "device": device, "timed_steps": len(steps),
                  "eager_timed_steps": sum(timer.eager[timed]), "compiled": recipe.model.compile,
                  "recipe": str(args.recipe), "overrides": args.overrides}
        Path(args.result).write_text(json.dumps(result))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "wan1.3b_sla_finetune.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4], help="SP sizes (= processes) to run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--cpu", action="store_true", help="CPU processes with gloo")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_train.json"))
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over the --profile-steps after --warmup; per-rank breakdown beside --out")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps profiled with --profile")
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides, e.g. model.num_layers=8")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile-prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    if args.profile and not 1 <= args.profile_steps <= args.steps - args.warmup - 1:
        parser.error(f"--profile needs 1 <= --profile-steps <= --steps - --warmup - 1 (a timed step after the "
                     f"profiled ones, and the last step saves a checkpoint); got --profile-steps "
                     f"{args.profile_steps} with --steps {args.steps} --warmup {args.warmup}")
    out = Path(args.out)

    results = []
    for sp in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            prefix = out.with_name(f"{out.stem}-profile-sp{sp}")
            profile = ["--profile-prefix", str(prefix), "--profile-steps", str(args.profile_steps)]
            for stale in prefix.parent.glob(f"{prefix.name}-*") if args.profile else ():  # would pass as this run's
                stale.unlink()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(sp), "--master_port",
                   str(_port()), __file__, "--worker", "--workdir", str(Path(tmp) / "run"), "--result", str(result),
                   "--recipe", args.recipe, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   *(["--cpu"] if args.cpu else []), *(profile if args.profile else []), *args.overrides]
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            if rc != 0 or not result.exists():
                results.append({"sp": sp, "error": f"exit code {rc}"})
                continue
            results.append(json.loads(result.read_text()))
            if args.profile:
                results[-1]["profile"] = [str(p) for p in sorted(prefix.parent.glob(f"{prefix.name}-rank*.json"))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    for r in results:
        for path in r.get("profile", []):
            print("\n" + Path(path).with_suffix(".md").read_text(), end="")
    print(f"\n{'SP':>3} {'tokens/step':>13} {'step (s)':>9} {'tokens/s':>10} {'peak GiB':>9} {'eager':>7}  device")
    for r in results:
        if "error" in r:
            print(f"{r['sp']:>3}  failed: {r['error']}")
        else:
            eager = f"{r['eager_timed_steps']}/{r['timed_steps']}" if r["compiled"] else "-"
            print(f"{r['sp']:>3} {r['tokens_per_step']:>13} {r['step_s']:>9.3f} {r['tokens_per_s']:>10.0f} "
                  f"{r['peak_mem_gib']:>9.2f} {eager:>7}  {r['device']}")
    if any(r.get("compiled") and r["eager_timed_steps"] for r in results):
        print("warning: a compiled run timed steps that SLACallback ran eagerly (annealing, a log row's measurement "
              "or calibration): raise trainer.log_every_n_steps or the sparsity.* schedule above --steps")


if __name__ == "__main__":
    main()
