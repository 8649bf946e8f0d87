"""Where and how benchmark scripts save results: ``benchmarks/results/<date>-<name>-<card>[-tiny].{json,md}``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def save_results(name: str, card: str, meta: dict, results: list, title: str, preamble: str, table: str,
                 out: Path | None = None, tiny: bool = False) -> Path:
    """Write ``meta`` + ``results`` as JSON and ``title``, ``preamble`` and ``table`` as markdown; returns the path
    stem. ``out`` overrides the dated default under benchmarks/results."""
    stamp = time.strftime("%Y-%m-%d")
    slug = card.replace("NVIDIA ", "").replace(" ", "-").lower()
    out = out or Path("benchmarks/results") / f"{stamp}-{name}-{slug}{'-tiny' if tiny else ''}"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(card=card, date=stamp, torch=torch.__version__, **meta)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    out.with_suffix(".md").write_text(f"# {title} ({card}, {stamp})\n\n{preamble}\n\n{table}\n")
    print(f"wrote {out.with_suffix('.json')} and .md\n")
    return out
