"""The pretrained state of the quality study, saved between its phases (and between pretrain calls) as shards of at
most 15 MiB.

The device machine may be a fresh one at every call, returns at most 8 files of 16 MiB (64 MiB together) and takes
at most 64 MiB of working tree, so a pretrain phase writes ``pretrained-<i>-of-<n>.pt`` files small enough to come
back, and a later call reads them from the folder they were carried to: the fine-tune phase takes the weights, a
resumed pretrain phase the weights and AdamW's moments (the step count and the pretrain record are in ``meta``).

Two encodings (``StudyConfig.checkpoint``):

* ``exact``: float32 weights and both AdamW moments, so a resumed pretrain continues bit for bit (the tiny and cpu
  presets; 12 bytes per parameter);
* ``compact`` (the gpu preset: 20.5 M parameters must fit in ~60 MiB, 3 bytes per parameter): weights in bfloat16
  (the study trains under bf16 autocast), the square root of the second moment in float8 e4m3 with a float32 scale
  per row (at most 6.25 % relative rounding in the normal range; values below its range round up to its smallest,
  never to 0, so no weight gets a larger step than it would have), and no first moment: it restarts at zero (it
  averages over ~1 / (1 - beta1) = 10 steps; the second moment, over ~1000 steps, must be kept). Measured on the tiny
  preset (CPU, warm-up 5), 100 + 100 steps against 200 in one go: final validation loss 0.5086 against 0.5033, weights
  0.69 % apart (relative L2); with the first moment kept in float32 it would be 0.5032 and 0.27 %, but at one more
  byte per parameter (78 MiB in all) the gpu preset's checkpoint would no longer fit a device transfer.

Every fine-tune starts from the weights as decoded from the checkpoint, also when both phases run in one call, so a
split run and a whole one fine-tune the same model. Files are read with ``torch.load(weights_only=True)``: a
checkpoint holds tensors and plain values, never code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "sla-dist-quality-pretrained/1"
SHARD_BYTES = 15 * 2**20
ENCODINGS = ("exact", "compact")
_NAME = re.compile(r"pretrained-(\d+)-of-(\d+)\.pt")
_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_FP8).max  # 448
_FP8_TINY = 2.0**-9  # its smallest subnormal

Moments = dict[str, tuple[torch.Tensor | None, torch.Tensor]]
"""Per parameter name: AdamW's (exp_avg, exp_avg_sq); exp_avg None where the checkpoint does not store it."""


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    """Model weights in float32, as the encoding left them."""
    meta: dict
    optimizer: Moments
    """Empty when the checkpoint holds weights only."""


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"checkpoint encoding {encoding!r} is not one of {ENCODINGS}")


def rounded(state: dict[str, torch.Tensor], encoding: str = "compact") -> dict[str, torch.Tensor]:
    """The weights as the checkpoint stores them, on the CPU: floating tensors in bfloat16 (compact) or float32."""
    _check_encoding(encoding)
    dtype = torch.bfloat16 if encoding == "compact" else torch.float32
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in state.items()}


def widened(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors back to float32, the dtype the study trains its weights in."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def encode_optimizer(moments: Moments, encoding: str) -> dict[str, torch.Tensor]:
    """Flat ``{'<param>/<field>': tensor}`` of AdamW's moments in ``encoding`` (module docstring), on the CPU."""
    _check_encoding(encoding)
    out = {}
    for name, (avg, avg_sq) in moments.items():
        if encoding == "exact":
            out[f"{name}/exp_avg"] = avg.detach().to("cpu", torch.float32).contiguous()
            out[f"{name}/exp_avg_sq"] = avg_sq.detach().to("cpu", torch.float32).contiguous()
            continue
        root = _rows(avg_sq.detach().to("cpu", torch.float32)).sqrt()
        scale = root.amax(dim=1, keepdim=True) / _FP8_MAX  # 0 for a row of zeros, which then decodes to zeros
        scaled = root / scale.clamp_min(torch.finfo(torch.float32).tiny)
        out[f"{name}/sqrt_exp_avg_sq"] = scaled.clamp(_FP8_TINY, _FP8_MAX).to(_FP8).reshape(avg_sq.shape)
        out[f"{name}/scale"] = scale
    return out


def decode_optimizer(stored: dict[str, torch.Tensor]) -> Moments:
    """The moments of ``encode_optimizer``'s output, in float32 (a first moment not stored comes back as None)."""
    names = {key.rsplit("/", 1)[0] for key in stored}
    moments = {}
    for name in sorted(names):
        if f"{name}/exp_avg_sq" in stored:
            moments[name] = (stored[f"{name}/exp_avg"].float(), stored[f"{name}/exp_avg_sq"].float())
        else:
            root = stored[f"{name}/sqrt_exp_avg_sq"]
            avg_sq = (_rows(root.float()) * stored[f"{name}/scale"]).square().reshape(root.shape)
            moments[name] = (None, avg_sq)
    return moments


def encoded(state: dict[str, torch.Tensor], moments: Moments | None, encoding: str) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint stores, keyed 'state/<name>' and 'optimizer/<param>/<field>'."""
    tensors = {f"state/{k}": v for k, v in rounded(state, encoding).items()}
    tensors.update({f"optimizer/{k}": v for k, v in encode_optimizer(moments or {}, encoding).items()})
    return tensors


def plan_shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in order, cut into shards of at most ``SHARD_BYTES`` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_pretrained(folder: Path, state: dict[str, torch.Tensor], meta: dict, moments: Moments | None = None,
                    encoding: str = "compact") -> list[Path]:
    """Write ``state``, AdamW's ``moments`` (if any) in ``encoding`` and ``meta`` (plain values) as shards into
    ``folder``; an earlier checkpoint there is replaced. Returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(encoded(state, moments, encoding))
    for old in folder.glob("pretrained-*-of-*.pt"):
        old.unlink()
    paths = []
    for i, shard in enumerate(shards):
        path = folder / f"pretrained-{i}-of-{len(shards)}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"format": FORMAT, "shard": i, "shards": len(shards), "meta": meta if i == 0 else None,
                    "tensors": shard}, tmp)
        tmp.replace(path)
        paths.append(path)
    return paths


def decoded(state: dict[str, torch.Tensor], encoding: str) -> dict[str, torch.Tensor]:
    """The float32 weights a checkpoint of ``state`` in ``encoding`` loads as."""
    return widened(rounded(state, encoding))


def _shard_paths(folder: Path) -> list[Path]:
    """The paths of the checkpoint's shards in ``folder``, in order; ValueError when shards are missing."""
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
    return [paths[i] for i in range(count)]


def _load_shard(path: Path, i: int) -> dict:
    shard = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(shard, dict) or shard.get("format") != FORMAT or shard.get("shard") != i:
        raise ValueError(f"{path} is not shard {i} of a quality-study checkpoint ({FORMAT})")
    return shard


def load_meta(folder: Path) -> dict:
    """The ``meta`` of the checkpoint in ``folder`` (its first shard alone is read)."""
    return _load_shard(_shard_paths(folder)[0], 0)["meta"]


def load_pretrained(folder: Path) -> Checkpoint:
    """The checkpoint in ``folder``; ValueError when shards are missing or foreign."""
    tensors, meta = {}, None
    for i, path in enumerate(_shard_paths(folder)):
        shard = _load_shard(path, i)
        # shards written before resumable pretraining hold the weights alone, under 'state'
        tensors.update(shard["tensors"] if "tensors" in shard else {f"state/{k}": v for k, v in shard["state"].items()})
        meta = shard["meta"] if i == 0 else meta
    state = widened({k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")})
    optimizer = decode_optimizer({k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")})
    return Checkpoint(state, meta, optimizer)
