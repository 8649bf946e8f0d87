"""Package layering: training (``sla_dist.lightning``) does not reach up into evaluation (``sla_dist.eval``), which
builds on it, and no two modules of ``sla_dist.models`` import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sla_dist"


def _imports(path: Path) -> set[str]:
    """Absolute names of the sla_dist modules imported anywhere in ``path`` (also inside functions)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" for a in node.names] if not node.module else [prefix]
            found.update(n for n in names if n.startswith("sla_dist"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sla_dist"))
    return found


def test_lightning_does_not_import_eval():
    offenders = {str(p.relative_to(PACKAGE)): sorted(i for i in _imports(p) if i.startswith("sla_dist.eval"))
                 for p in (PACKAGE / "lightning").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_models_have_no_import_cycles():
    modules = {f"sla_dist.models.{p.stem}": p for p in (PACKAGE / "models").glob("*.py") if p.stem != "__init__"}
    edges = {name: {i for i in _imports(path) if i in modules} for name, path in modules.items()}
    cycles = sorted((a, b) for a in edges for b in edges[a] if a in edges.get(b, ()))
    assert cycles == []
