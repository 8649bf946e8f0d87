"""Caption files: which caption belongs to which video.

Accepted formats, by suffix:

- ``.json``: an object ``{"VIDEO": "caption", ...}`` or a list of ``{"video": "VIDEO", "caption": "..."}``;
- ``.jsonl``: one ``{"video": "VIDEO", "caption": "..."}`` object per line;
- ``.csv``: a header row with columns ``video`` and ``caption``.

``VIDEO`` may be the path relative to the ``--videos`` directory (or as written in the ``--videos`` list file), the
file name, or the file name without its suffix; a video is looked up in that order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def load_captions(path: str | Path) -> dict[str, str]:
    """Read a caption file into ``{key: caption}`` (ValueError naming the file and entry on malformed content)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--captions {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(path.read_text())
        entries = list(data.items()) if isinstance(data, dict) else [_pair(path, i, e) for i, e in enumerate(data)]
    elif suffix == ".jsonl":
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        entries = [_pair(path, i, json.loads(ln)) for i, ln in enumerate(lines)]
    elif suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        entries = [_pair(path, i, row) for i, row in enumerate(rows)]
    else:
        raise ValueError(f"--captions {str(path)!r}: suffix {suffix!r} is not one of .json, .jsonl, .csv")
    captions = {}
    for key, caption in entries:
        if not isinstance(key, str) or not isinstance(caption, str):
            raise ValueError(f"--captions {str(path)!r}: entry {key!r}: {caption!r} must map a string to a string")
        captions[key] = caption
    return captions


def _pair(path: Path, i: int, entry) -> tuple[str, str]:
    if not isinstance(entry, dict) or "video" not in entry or "caption" not in entry:
        raise ValueError(f"--captions {str(path)!r}: entry {i} ({entry!r}) needs 'video' and 'caption'")
    return entry["video"], entry["caption"]


def caption_for(video: str, root: str | Path, captions: dict[str, str]) -> str | None:
    """The caption of ``video`` (a path from the input list under ``root``), or None if it has none."""
    path = Path(video)
    try:
        relative = str(path.relative_to(root))
    except ValueError:
        relative = str(path)
    for key in (relative, path.name, path.stem):
        if key in captions:
            return captions[key]
    return None
