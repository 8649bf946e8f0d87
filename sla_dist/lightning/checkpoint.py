"""Checkpoints: safe loading, and export of a consolidated single-file safetensors (``rotation.py`` writes them).

A run's checkpoints live in ``<output_dir>/checkpoints``; ``last.ckpt`` links to the newest. Under SLAStrategy each is
a DeepSpeed directory (ZeRO shards per rank, Lightning's loop / callback / datamodule state as client state); with
the plain strategy a single file. Every pickle read here goes through ``torch.load(weights_only=True)``, with only
the DeepSpeed bookkeeping types allow-listed, so a checkpoint cannot run code when it is loaded.

Export writes the trainable DiT weights (``model.*`` of DiTModule, or its EMA with ``ema=True``) in float32 under
the plain VideoDiT names, so the file loads into ``VideoDiT`` (after ``apply_sla`` when it has SLA's ``proj_l``)
whatever the training layout was. Sequence parallelism leaves the parameter names alone (the attention cores stay in
place), so checkpoints also resume across SP sizes; names from checkpoints of older versions, which registered the
SLA layer under an SP wrapper (``self_attn.core.attention.``), are mapped back on export and load.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from pathlib import Path

import torch

from ..files import save_safetensors

_SP_WRAPPER = re.compile(r"(self_attn\.core)\.attention\.")
"""The SP wrapper level of checkpoints written before sequence parallelism kept the cores' names."""

_TORCH_LOAD = torch.load
"""The real ``torch.load``, also while ``weights_only_loads`` replaces it."""


def canonical_name(name: str) -> str:
    """A DiTModule / DeepSpeed parameter name -> the plain VideoDiT name (``model.`` dropped, and the SP wrapper
    level of older checkpoints)."""
    name = name.removeprefix("module.").removeprefix("_forward_module.").removeprefix("model.")
    return _SP_WRAPPER.sub(r"\1.", name)


def _safe_globals() -> list:
    """The non-tensor types DeepSpeed and Lightning pickle into checkpoints (all plain data holders)."""
    import argparse
    import collections

    found: list = [argparse.Namespace, collections.OrderedDict, collections.defaultdict, dict, set]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        found += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return found


def _unreadable(path: object, exc: BaseException) -> ValueError | None:
    """The one-line error for a checkpoint file ``torch.load`` refused or could not read; None for other errors."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return ValueError(f"{str(path)!r} holds a pickled object that is not plain data{what}; refusing to load "
                          "it, since unpickling it could run code")
    # what torch.load raises for empty, truncated or foreign files
    if isinstance(exc, (EOFError, KeyError, pickle.UnpicklingError)) or "PytorchStreamReader" in text:
        empty = Path(str(path)).is_file() and Path(str(path)).stat().st_size == 0
        return ValueError(f"{str(path)!r} is " + ("empty" if empty else "truncated or not a torch checkpoint file"))
    return None


def safe_torch_load(path: str | Path, **kwargs):
    """``torch.load(path, weights_only=True)`` with the allow-list, raising ValueError naming the file when it holds
    code-running pickles or cannot be read."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return _TORCH_LOAD(path, **{**kwargs, "weights_only": True})
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError) as exc:
        error = _unreadable(path, exc)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def weights_only_loads():
    """Within the block every ``torch.load`` (also DeepSpeed's own, which asks for ``weights_only=False``) is
    ``safe_torch_load``."""
    original = torch.load

    def safe_load(f, *args, **kwargs):
        if args:  # map_location given positionally
            kwargs["map_location"] = args[0]
        return safe_torch_load(f, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a plain torch file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = safe_torch_load(path, map_location="cpu")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    if any(k.startswith("model.") for k in state):  # a DiTModule checkpoint: keep the DiT, drop teacher and others
        state = {k: v for k, v in state.items() if k.startswith("model.")}
    return {canonical_name(k): v for k, v in state.items()}


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file (by name, or by its header: a little-endian length, then JSON)."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _client_state(ckpt: Path) -> dict:
    """Lightning's part of a checkpoint (a file, or a DeepSpeed directory's model-states file)."""
    if ckpt.is_file():
        if is_safetensors(ckpt):
            raise ValueError(f"{str(ckpt)!r} is a safetensors weights file (an export?), not a training checkpoint")
        state = safe_torch_load(ckpt, map_location="cpu")
        if not isinstance(state, dict) or "state_dict" not in state:
            raise ValueError(f"{str(ckpt)!r} is not a Lightning checkpoint (it has no 'state_dict'); export takes "
                             "a training checkpoint")
        return state
    files = sorted(ckpt.glob("checkpoint/*model_states.pt"))
    if not files:
        raise ValueError(f"{str(ckpt)!r} is neither a checkpoint file nor a DeepSpeed checkpoint directory")
    return safe_torch_load(files[0], map_location="cpu")


def consolidated_state_dict(ckpt: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full float32 DiT weights of a checkpoint (ZeRO shards merged), under VideoDiT names."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise ValueError(f"checkpoint {str(ckpt)!r} does not exist")
    if ema:
        state = _client_state(ckpt).get("ema")
        if state is None:
            raise ValueError(f"checkpoint {str(ckpt)!r} has no EMA weights (train with optim.ema_decay > 0)")
        full = {f"model.{k}": v for k, v in state["shadow"].items()}
    elif ckpt.is_file():
        full = _client_state(ckpt)["state_dict"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():
            full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="checkpoint")
    return {canonical_name(k): v.float().contiguous() for k, v in full.items() if k.startswith("model.")}


def export_safetensors(ckpt: str | Path, out: str | Path, ema: bool = False, metadata: dict | None = None,
                       force: bool = False) -> Path:
    """Write the consolidated DiT weights of ``ckpt`` to one safetensors file ``out`` (an existing ``out`` only with
    ``force``; the file appears complete or not at all)."""
    out = Path(out)
    if out.is_dir() or (out.exists() and not force):
        raise ValueError(f"export target {str(out)!r} exists; refusing to overwrite it"
                         + ("" if out.is_dir() else " (pass --force to replace it)"))
    state = consolidated_state_dict(ckpt, ema=ema)
    if not state:
        raise ValueError(f"checkpoint {str(ckpt)!r} holds no DiT weights (keys starting with 'model.')")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source": str(ckpt), "weights": "ema" if ema else "model"}
    meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()})
    tmp = out.with_name(f".{out.name}.tmp")
    save_safetensors(state, tmp, metadata=meta)
    os.replace(tmp, out)
    return out
