"""Test-wide setup: Triton runs in its interpreter on machines without a GPU, and `gpu` tests skip there.

TRITON_INTERPRET must be set before any Triton kernel is defined; sla_dist defines its kernels lazily on first
launch, and this file is imported before any test module.
"""

import os

import pytest
import torch.distributed as dist

from tests.utils import HAS_CUDA

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Fill every kernel output with NaN before launch, so an element the kernel forgets to write fails the test."""
    from sla_dist.kernels import layout

    monkeypatch.setattr(layout, "POISON_OUTPUTS", True)
    yield


@pytest.fixture
def block_map_kernels(monkeypatch):
    """Predict block maps with the Triton kernels on any device, as on a GPU (by default only CUDA tensors take
    them; on CPU they run in the interpreter)."""
    from sla_dist.kernels import block_map

    on_kernels = block_map._on_kernels
    monkeypatch.setattr(block_map, "_on_kernels",
                        lambda x, kernels: on_kernels(x, True if kernels is None else kernels))
    yield


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """Destroy the default process group a test leaves behind: an in-process Lightning / DeepSpeed run (devices=1)
    initialises one and never destroys it, and every later test that forks its ranks (``run_distributed``) would
    inherit it and fail with "trying to initialize the default process group twice"."""
    initialized_before = dist.is_available() and dist.is_initialized()
    yield
    if not initialized_before and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
