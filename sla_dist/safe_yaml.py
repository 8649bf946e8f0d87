"""Reading user YAML (recipes) with omegaconf, safely: syntax errors become one-line ValueErrors naming the file and
line, and only the file's own interpolations (``${data.batch_size}``) are allowed.

Resolvers (``${oc.env:HOME}``, ``${oc.decode:...}``, any registered ``${name:...}``) are refused before anything is
resolved: they would pull the environment into a run (and into error messages) or run registered code, and a
recipe must mean the same on every machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

# "${" then a name then ":" is a resolver call; a node interpolation has no ":" (nested "${" counts too)
_RESOLVER = re.compile(r"\$\{\s*[^\s{}$:]*\s*:")


def load_yaml(path: str | Path, what: str = "recipe") -> DictConfig:
    """The mapping in the YAML file ``path``, its interpolations checked (see ``refuse_resolvers``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{what} {str(path)!r} holds a {type(loaded).__name__}, not a mapping of settings")
    refuse_resolvers(loaded, f"{what} {str(path)!r}")
    return loaded


def refuse_resolvers(config: DictConfig, source: str) -> None:
    """Raise ValueError naming the key when any value of ``config`` (unresolved) calls a resolver."""
    for key, value in _leaves(OmegaConf.to_container(config, resolve=False)):
        if isinstance(value, str) and _RESOLVER.search(value):
            raise ValueError(f"{source}: {key}={value!r} calls a resolver; only interpolations of the recipe's own "
                             "keys (like ${data.batch_size}) are allowed")


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, node
