"""The SLA layer captured in CUDA graphs (``torch.cuda.make_graphed_callables``).

At sequences up to ~16K tokens the layer is bound by host time (Python, ~10 Triton launches and ~40 small ops per
forward; see benchmarks/host_overhead.py), which a replayed graph skips. Capture works only for code with no host
synchronisation and no per-call host state; a replay must read the inputs of that call (not the capture's) and give
the eager layer's output and gradients, the projection's weight gradient included."""

import pytest
import torch

from sla_dist import SparseLinearAttention
from tests.utils import DEVICE, HAS_CUDA

from .harness import layer_step, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")]


def _inputs(L: int, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v, grad = (torch.randn(2, 3, L, 64, generator=g, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
    return q, k, v, grad


@pytest.mark.parametrize("L", [1000, 4096])
def test_graphed_layer_replays_eager_results(L):
    torch.manual_seed(0)
    layer = SparseLinearAttention(64, topk=0.1, BLKQ=128).to(DEVICE)
    torch.nn.init.normal_(layer.proj_l.weight, std=0.1)
    first, second = _inputs(L, seed=1), _inputs(L, seed=2)
    want = [layer_step(layer, *first), layer_step(layer, *second)]

    sample = tuple(t.clone().requires_grad_() for t in first[:3])
    graphed = torch.cuda.make_graphed_callables(layer, sample)
    # Replays on both input sets, in the opposite order: a graph that kept the capture's inputs would fail one.
    for inputs, expected in ((second, want[1]), (first, want[0])):
        got = layer_step(graphed, *inputs)
        for name, g, w in zip(("out", "dq", "dk", "dv", "dproj_w"), got, expected):
            assert torch.isfinite(g).all(), name
            assert relative_error(g, w.double()) < 1e-2, (name, relative_error(g, w.double()))
    # The two input sets give clearly different results, so the check above can tell them apart.
    assert relative_error(want[0][0], want[1][0].double()) > 0.5
