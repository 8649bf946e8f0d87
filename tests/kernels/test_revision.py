"""The differentiable custom ops carry revision.REVISION into a compiled graph (AOTAutograd's cache keys on that
graph, so a changed sla_dist does not replay a backward that an older one traced), and the digest follows the kernel
modules' sources."""

from __future__ import annotations

import shutil

import torch

from sla_dist import SparseLinearAttention
from sla_dist.kernels import revision
from sla_dist.kernels.norm_rope import norm_rope
from tests.utils import DEVICE


def _captured_code(fn, *args) -> str:
    """The code of the graph Dynamo captures for ``fn(*args)`` (fullgraph)."""
    codes = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return "\n".join(codes)


def test_captured_graph_holds_the_revision():
    q, k, v = (torch.randn(1, 2, 256, 64, device=DEVICE) for _ in range(3))
    layer = SparseLinearAttention(64, topk=0.25, BLKQ=64, BLKK=64, backend="triton").to(DEVICE)
    code = _captured_code(layer, q, k, v)
    assert "sla_dist.sla_projected_forward" in code and repr(revision.REVISION) in code, code
    x = torch.randn(1, 16, 2 * 32, device=DEVICE)
    tables = [torch.randn(16, 16, device=DEVICE) for _ in range(2)]
    code = _captured_code(lambda x: norm_rope(x, torch.ones(64, device=DEVICE), *tables, 2, 1e-6, fused=True), x)
    assert "sla_dist.norm_rope" in code and repr(revision.REVISION) in code, code


def test_digest_follows_the_sources(tmp_path):
    kernels = revision.Path(revision.__file__).parent
    for path in kernels.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    assert revision.digest(tmp_path) == revision.REVISION == revision.digest()
    (tmp_path / "op.py").write_text((tmp_path / "op.py").read_text() + "\n")
    changed = revision.digest(tmp_path)
    assert changed != revision.REVISION
    (tmp_path / "extra.py").write_text("")
    assert revision.digest(tmp_path) not in (changed, revision.REVISION)
