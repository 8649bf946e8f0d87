"""A resolved recipe as commented YAML (``sla-dist recipe show``) and the list of recipe keys (``train --help``).

The documentation of each field is its attribute docstring in the schema's source (the string literal under the
field), read with ``ast``, so the schema stays the one place where a key is described.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap

import yaml

from .recipe import Recipe


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring, whitespace collapsed} of a dataclass (and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (e.g. a frozen install): no docs
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


def _scalar(value) -> str:
    """One YAML flow value."""
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n...\n").strip()


def _lines(obj, indent: int, width: int) -> list[str]:
    docs = field_docs(type(obj))
    out: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        pad = "  " * indent
        if dataclasses.is_dataclass(value):
            doc = (inspect.getdoc(type(value)) or "").split("\n")[0].replace("``", "")
            out.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
            out.extend(_lines(value, indent + 1, width))
            continue
        entry = f"{pad}{f.name}: {_scalar(value)}"
        doc = docs.get(f.name)
        out.append(f"{entry:<{width}}  # {doc}" if doc else entry)
    return out


def recipe_yaml_with_docs(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every key commented with its documentation (still loadable YAML)."""
    return "\n".join(_lines(recipe, 0, 36)) + "\n"


def recipe_keys_help() -> str:
    """Every overridable key, section by section, for ``train --help``."""
    defaults = Recipe()
    lines = ["recipe keys (override any as KEY=VALUE; 'sla-dist recipe show RECIPE' prints them resolved and "
             "documented):"]
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            keys = ", ".join(sub.name for sub in dataclasses.fields(value))
            lines.append(f"  {f.name}.{{{keys}}}")
        else:
            lines.append(f"  {f.name}")
    return "\n".join(lines)
