"""A digest of this package's kernel modules, passed to the differentiable custom ops under torch.compile.

AOTAutograd's cache (torch.compile's, on by default) keys a compiled forward + backward on the forward graph that
Dynamo captured. It counts every custom op as cacheable and does not read the Python that an op's registered
backward runs (op._gradients, backward_ops.compiled_backward and the fakes they trace), so after an upgrade of
sla_dist that changed that Python a warm cache would replay the backward that the old version traced: e.g. one that
calls an op under a contract it no longer has. The ops ``sla_dist::sla_forward``, ``sla_projected_forward`` and
``norm_rope`` take :data:`REVISION` as their last argument: a literal in the captured graph, so a changed package
compiles anew. The kernels ignore it. Computed once at import (a module constant, which Dynamo reads as one; it
cannot trace the hashing).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def digest(folder: Path = Path(__file__).parent) -> str:
    """The first 16 hex digits of a SHA-256 over the names and bytes of the .py files in ``folder`` (by default the
    kernel modules'), in name order: it changes with any change there, and only then."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


REVISION = digest()
