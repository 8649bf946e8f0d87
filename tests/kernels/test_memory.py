"""Peak extra memory of the SLA layer's forward+backward on its kernel path, counted on a CPU with the Triton
launches as no-ops (benchmarks/memory_account.py): every buffer is allocated with the shape and dtype it has on a
GPU, so the peak is the GPU's, up to the caching allocator's rounding."""

import sys
from pathlib import Path

import pytest
import torch

from tests.utils import HAS_CUDA

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory_account  # noqa: E402


@pytest.mark.skipif(HAS_CUDA, reason="counts CPU allocations; on a GPU benchmarks/memory_layer.py measures them")
def test_layer_peak_is_below_dense_attention_training(monkeypatch):
    """Dense attention (cuDNN) at this shape takes about 6 q-sized tensors beyond its inputs for a forward+backward
    (output, dq, dk, dv, a float32 dq accumulator): 580 MiB at [1, 12, 32768, 128] bf16. The SLA layer's output, the
    three gradients and O_l are 5 of them; with summary chunks of a quarter of q's and k's bytes the linear branch's
    summaries and their gradients, up to twice q per (batch, head) pair, must fit in the rest. Before chunking it
    took 11.2 q."""
    from sla_dist.kernels import op

    monkeypatch.setattr(op, "SUMMARY_CHUNK_FRACTION", 0.25)
    L, H, D = 2048, 12, 128
    q_bytes = H * L * D * torch.bfloat16.itemsize
    peak = memory_account.layer_peak_extra(L, H, D)
    assert peak <= 6 * q_bytes, f"peak extra {peak / q_bytes:.2f} x q"
