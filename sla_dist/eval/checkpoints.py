"""A VideoDiT built from a recipe and loaded from a checkpoint: a ZeRO directory, a Lightning file or an export.

Reading goes through :mod:`sla_dist.lightning.checkpoint` (``weights_only=True`` pickles, or safetensors). Whether
the model has SLA comes from the weights, not the recipe: a checkpoint trained with SLA carries each converted
layer's ``proj_l``, and exactly those layers are converted (with the recipe's ``sla`` settings) before loading.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..lightning.checkpoint import consolidated_state_dict, load_weights
from ..lightning.recipe import Recipe
from ..models import PatchConfig, VideoDiT, apply_sla

_PROJ_L = re.compile(r"^blocks\.(\d+)\.self_attn\.core\.proj_l\.weight$")


def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """VideoDiT-named weights of a DeepSpeed checkpoint directory, a Lightning ``.ckpt``, or an exported
    ``.safetensors`` / torch state-dict file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir() and not any(path.iterdir()):
        raise ValueError(f"checkpoint directory {str(path)!r} is empty")
    checkpoint = path.is_dir() or path.suffix == ".ckpt"
    if ema and not checkpoint:
        raise ValueError(f"--ema needs a training checkpoint (a DeepSpeed directory or a Lightning .ckpt), which "
                         f"keeps the EMA weights beside the model's; {str(path)!r} is an exported weights file "
                         "holding one set of weights (for EMA weights export with 'sla-dist export --ema', then "
                         "evaluate that file without --ema)")
    if checkpoint:
        state = consolidated_state_dict(path, ema=ema)
    else:
        state = load_weights(path)
    if not state:
        raise ValueError(f"checkpoint {str(path)!r} holds no DiT weights")
    return state


def sla_layers(state: dict[str, torch.Tensor]) -> list[int]:
    """Indices of the blocks whose self-attention is SLA in these weights (they carry ``proj_l``)."""
    return sorted(int(m.group(1)) for m in map(_PROJ_L.match, state) if m)


def load_model(path: str | Path, recipe: Recipe, ema: bool = False, device: str | torch.device = "cpu") -> VideoDiT:
    """``VideoDiT(recipe.dit)``, converted to SLA where the weights say so, with the checkpoint loaded, in eval mode.

    Raises ValueError naming the missing / unexpected keys when the weights do not fit the recipe's model."""
    state = read_state_dict(path, ema=ema)
    model = VideoDiT(recipe.dit)
    layers = sla_layers(state)
    if layers:
        apply_sla(model, PatchConfig(sla=recipe.sla, layers=layers))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit model {recipe.model.name!r} of the recipe: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"checkpoint {str(path)!r} does not fit model {recipe.model.name!r}: {exc}") from exc
    return model.to(device).eval()
