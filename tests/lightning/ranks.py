"""Training ranks as independent processes, the way torchrun or SLURM start them on separate nodes.

Each rank is a forked process that sets up its own process group through the strategy (``env://``) and writes its
output to its own log. Unlike ``run_distributed`` (whose join terminates every process once one fails), nothing
here stops a rank because another failed: a test sees whether each rank ends by itself, and how."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class RankResult:
    exitcode: int | None
    """None: still running at the deadline (then killed)."""
    log: str


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world_size: int, port: int, log: Path, fn: Callable, args: tuple) -> None:
    out = open(log, "w", buffering=1)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out  # pytest's capture objects were inherited
    torch.set_num_threads(1)  # two CI cores shared by all ranks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    fn(rank, *args)


def run_ranks(fn: Callable, world_size: int, logs: Path, deadline_s: float, *args) -> list[RankResult]:
    """Call ``fn(rank, *args)`` in ``world_size`` forked processes (Lightning sees them as launched externally);
    wait until all have ended or ``deadline_s`` has passed, kill what is left, return each rank's exit code and
    output."""
    ctx = multiprocessing.get_context("fork")
    port = _port()
    paths = [logs / f"rank{rank}.log" for rank in range(world_size)]
    procs = [ctx.Process(target=_rank, args=(rank, world_size, port, paths[rank], fn, args))
             for rank in range(world_size)]
    end = time.monotonic() + deadline_s
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
