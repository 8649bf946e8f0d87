"""Training ranks as independent processes, the way torchrun or SLURM start them on separate nodes.

Each rank is a process of its own that sets up its own process group through the strategy (``env://``) and writes
its output to its own log. Unlike ``run_distributed`` (whose join terminates every process once one fails), nothing
here stops a rank because another failed: a test sees whether each rank ends by itself, and how.

The ranks run on a device, 'cpu' or 'cuda' (``tests.parallel.dist_utils.device_params`` gives the pytest params):
``backend_overrides`` puts a recipe on it and ``run_ranks`` starts the processes accordingly."""

from __future__ import annotations

import multiprocessing
import os
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CUDA_START_S = 180
"""Seconds a CUDA run gets on top of its test's deadline: its spawned ranks import everything afresh, initialise
CUDA and NCCL and compile the SLA kernels (Triton) before their first step, where forked gloo ranks start at once."""


@dataclass
class RankResult:
    exitcode: int | None
    """None: still running at the deadline (then killed); negative: ended by that signal (-6: NCCL's watchdog
    aborted the process)."""
    log: str


def backend_overrides(device: str) -> list[str]:
    """Recipe overrides that run recipes/tiny_cpu.yaml's ranks on ``device``: the CPU (gloo), or one GPU per rank
    (NCCL; Lightning gives each rank cuda:LOCAL_RANK, which ``run_ranks`` sets to the rank). The recipe's precision,
    32-true, holds on both: on CUDA the SLA kernels run float32 inputs in bfloat16 and cast back."""
    _check_device(device)
    return [f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"]


def rank_device(device: str, rank: int) -> str:
    """The torch device ``rank`` must train on when its recipe has ``backend_overrides(device)``: its own GPU, or
    the CPU."""
    return f"cuda:{rank}" if device == "cuda" else "cpu"


def describe(results: list[RankResult], tail: int = 3000) -> str:
    """Each rank's exit code and the end of its log, for an assertion message."""
    return "\n".join(f"--- rank {i} (exit {r.exitcode}):\n{r.log[-tail:]}" for i, r in enumerate(results))


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'cpu' or 'cuda'")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world_size: int, port: int, log: Path, device: str, fn: Callable, args: tuple) -> None:
    out = open(log, "w", buffering=1)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out  # pytest's capture objects were inherited
    torch.set_num_threads(1)  # two CI cores shared by all ranks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    if device == "cuda":
        # torch's default (3: on a failed or timed-out collective the watchdog aborts the communicators and ends
        # the process), fixed here so that an outer setting cannot turn a dead peer into a hang until the deadline
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"
        # that end is an abort (SIGABRT): no core file of a process with a CUDA context, slow to write and unread
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    fn(rank, device, *args)


def run_ranks(fn: Callable, device: str, world_size: int, logs: Path, deadline_s: float,
              *args) -> list[RankResult]:
    """Call ``fn(rank, device, *args)`` in ``world_size`` processes (Lightning sees them as launched externally);
    wait until all have ended or the deadline has passed, kill what is left, return each rank's exit code and
    output.

    'cpu' ranks are forked. 'cuda' ranks are spawned: a child forked from a process that has initialised CUDA
    cannot use it, and on a GPU machine pytest's conftest has (``tests.utils`` picks a GPU), so ``fn`` and ``args``
    must pickle (a module-level function of the test module); their deadline is ``deadline_s + CUDA_START_S``."""
    _check_device(device)
    ctx = multiprocessing.get_context("spawn" if device == "cuda" else "fork")
    port = _port()
    paths = [logs / f"rank{rank}.log" for rank in range(world_size)]
    procs = [ctx.Process(target=_rank, args=(rank, world_size, port, paths[rank], device, fn, args))
             for rank in range(world_size)]
    end = time.monotonic() + deadline_s + (CUDA_START_S if device == "cuda" else 0)
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [RankResult(code, path.read_text()) for code, path in zip(codes, paths)]
