"""Run a test body on several processes: gloo on CPU, NCCL (one GPU per process) when the device is CUDA."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sla_dist import SparseLinearAttention
from sla_dist.parallel import SequenceParallelConfig, SequenceParallelGroups, SequenceParallelSLA, SequenceShard


TIMEOUT = timedelta(seconds=120)
"""The default process group's collective timeout in every test process (torch's default for new groups: 30 min)."""


def device_params(world_size: int) -> list:
    """pytest params for the device a distributed test runs on: CPU always, CUDA (marked gpu) when enough GPUs."""
    return [
        "cpu",
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
            torch.cuda.device_count() < world_size, reason=f"needs {world_size} CUDA GPUs")]),
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, device: str, args: tuple) -> None:
    # Two CI cores shared by up to four processes: more intra-op threads only oversubscribe.
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=TIMEOUT)
    try:
        fn(torch.device(device, rank) if device == "cuda" else torch.device("cpu"), *args)
        # Rank 0 hosts the store that group creation talks to: it must not exit while others still use it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, device: str, *args) -> None:
    """Call ``fn(device, *args)`` on ``world_size`` fresh processes; an exception in any of them fails the test."""
    mp.start_processes(_worker, args=(fn, world_size, _free_port(), device, args), nprocs=world_size, join=True, start_method="fork" if device == "cpu" else "spawn")


def make_sla(head_dim: int, device: torch.device, seed: int, **kwargs) -> SparseLinearAttention:
    """An SLA layer with a random (not zero-initialised) proj_l, so the linear branch and its gradients count."""
    torch.manual_seed(seed)
    attn = SparseLinearAttention(head_dim, **kwargs).to(device)
    with torch.no_grad():
        attn.proj_l.weight.normal_(std=head_dim**-0.5)
        attn.proj_l.bias.normal_(std=0.1)
    return attn


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Max error relative to the largest expected magnitude: 1e-5 in float32 on CPU; the CUDA module runs the
    kernels in bfloat16, where summation order alone moves results by a few bf16 ulps."""
    tol = 1e-5 if expected.device.type == "cpu" else 2e-2
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} exceeds {tol} x {scale:.3e}"


def check_matches_single_process(device: torch.device, config: SequenceParallelConfig, *, batch: int, heads: int,
                                 seq_len: int, head_dim: int = 64, seed: int = 0, exchange: str = "fused",
                                 **sla_kwargs) -> None:
    """Sequence-parallel SLA on shards equals single-process SLA on the full sequence: outputs, q/k/v gradients and
    proj_l gradients (each rank holds the part from its heads; their sum over the SP group is the full one).
    ``exchange``: SequenceParallelSLA's Ulysses all-to-all."""
    groups = SequenceParallelGroups.build(config)
    attn = make_sla(head_dim, device, seed, **sla_kwargs)
    torch.manual_seed(seed + 1)
    q, k, v, grad_out = (torch.randn(batch, heads, seq_len, head_dim, device=device) for _ in range(4))

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attn(*full)
    out.backward(grad_out)
    ref_proj = [None if p.grad is None else p.grad.clone() for p in attn.proj_l.parameters()]
    attn.zero_grad()

    shard = SequenceShard.for_group(seq_len, groups.sp_group)
    local = [shard.split(x, dim=2).requires_grad_() for x in (q, k, v)]
    sp_out = SequenceParallelSLA(attn, groups, exchange)(*local, seq_len=seq_len)
    sp_out.backward(shard.split(grad_out, dim=2))

    valid = shard.num_valid
    assert sp_out.shape == local[0].shape
    assert_close(sp_out, shard.split(out.detach(), 2), "output")
    if valid < shard.local_len:
        assert sp_out[:, :, valid:].abs().max().item() == 0, "padded positions must have zero output"
    for name, x, x_local in zip("qkv", full, local):
        assert_close(x_local.grad, shard.split(x.grad, 2), f"d{name}")
    for name, p, ref in zip(("weight", "bias"), attn.proj_l.parameters(), ref_proj):
        if ref is None:  # linear_scope 'none': proj_l is unused
            assert p.grad is None, f"proj_l.{name} got a gradient although it is unused"
            continue
        dist.all_reduce(p.grad, group=groups.sp_group)
        assert_close(p.grad, ref, f"proj_l.{name} grad")
