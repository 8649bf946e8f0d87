"""The pretrained weights of the quality study, saved between its phases as bfloat16 shards of at most 15 MiB.

The device machine may be a fresh one at every call and returns at most 16 MiB per file, so the pretrain phase
writes ``pretrained-<i>-of-<n>.pt`` files small enough to come back, and the fine-tune phase of a later call reads
them from the folder they were carried to. Weights are stored in bfloat16 (half the bytes; the study trains under
bf16 autocast) and every fine-tune starts from these rounded weights, also when both phases run in one call, so a
split run and a whole one fine-tune the same model. Files are read with ``torch.load(weights_only=True)``: a
checkpoint can hold tensors and plain values, never code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

FORMAT = "sla-dist-quality-pretrained/1"
SHARD_BYTES = 15 * 2**20
_NAME = re.compile(r"pretrained-(\d+)-of-(\d+)\.pt")


def rounded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state as the checkpoint stores it: floating tensors rounded to bfloat16, on the CPU."""
    return {k: (v.detach().to("cpu", torch.bfloat16) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in state.items()}


def widened(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors back to float32, the dtype the study trains its weights in."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def save_pretrained(folder: Path, state: dict[str, torch.Tensor], meta: dict) -> list[Path]:
    """Write ``state`` (rounded to bfloat16) and ``meta`` (plain values) as shards of at most ``SHARD_BYTES`` of
    tensor data into ``folder`` (a larger tensor gets a shard of its own); an earlier checkpoint there is replaced.
    Returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in rounded(state).items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for old in folder.glob("pretrained-*-of-*.pt"):
        old.unlink()
    paths = []
    for i, shard in enumerate(shards):
        path = folder / f"pretrained-{i}-of-{len(shards)}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"format": FORMAT, "shard": i, "shards": len(shards), "meta": meta if i == 0 else None,
                    "state": shard}, tmp)
        tmp.replace(path)
        paths.append(path)
    return paths


def load_pretrained(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state in float32, meta) from the shards in ``folder``; ValueError when shards are missing or foreign."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--resume-from {folder} is not a folder (it should hold pretrained-<i>-of-<n>.pt files)")
    found = {}
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match:
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    if len(found) != 1:
        counts = sorted(found) or "none"
        raise ValueError(f"{folder} must hold one set of pretrained-<i>-of-<n>.pt shards; found sets of n = {counts}")
    (count, paths), = found.items()
    missing = sorted(set(range(count)) - set(paths))
    if missing:
        raise ValueError(f"{folder} lacks shards {missing} of pretrained-*-of-{count}.pt")
    state, meta = {}, None
    for i in range(count):
        shard = torch.load(paths[i], map_location="cpu", weights_only=True)
        if not isinstance(shard, dict) or shard.get("format") != FORMAT or shard.get("shard") != i:
            raise ValueError(f"{paths[i]} is not shard {i} of a quality-study checkpoint ({FORMAT})")
        state.update(widened(shard["state"]))
        meta = shard["meta"] if i == 0 else meta
    return state, meta
