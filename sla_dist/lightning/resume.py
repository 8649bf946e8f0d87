"""How a run starts in its ``output_dir``: resume the newest complete checkpoint, after comparing the recipe with the
one saved beside the checkpoints, or start fresh. Everything here runs before anything is written or spawned.

On resume, settings that the checkpoint cannot follow are refused in one line (the model's parameter shapes, which
layers carry SLA's ``proj_l``, the seed of the data order, and the ZeRO layout: strategy, stage and, for ZeRO
shards, the world size); every other change (``sla.topk``, ``trainer.max_steps`` ...) is reported and accepted.
``recipe.yaml`` always describes the newest checkpoint: a fresh run writes it at the start, and ``StepCheckpoints``
rewrites it as each checkpoint is committed, so a resumed run that crashes before its first checkpoint leaves it as
it was.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from .recipe import Recipe, load_recipe, recipe_to_yaml
from .rotation import checkpoint_dir, resume_checkpoint

RECIPE_FILE = "recipe.yaml"
# DiTConfig fields that change behaviour but not the parameters: a checkpoint can follow a change of them
_SHAPE_FREE = ("checkpoint_blocks", "tile_size")


def start(recipe: Recipe, resume: bool = True) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after refusing incompatible settings.

    With ``resume=False`` an earlier run's checkpoints and recipe are moved aside (never deleted) to
    ``checkpoints.before-<time>/``, so that neither a later resume nor this run's rotation mixes the two runs."""
    out = Path(recipe.output_dir)
    if not resume:
        _move_aside(out)
        return None
    ckpt = resume_checkpoint(out)
    if ckpt is None:
        return None
    _check_world_size(ckpt, recipe)
    saved_path = out / RECIPE_FILE
    if not saved_path.is_file():
        rank_zero_info(f"resuming from {ckpt}; no {RECIPE_FILE} beside it, so settings are not compared")
        return ckpt
    try:
        saved = load_recipe(saved_path)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"cannot compare with the run's saved recipe ({exc}); fix or remove {str(saved_path)!r} "
                         "to resume") from None
    refused = incompatible(saved, recipe)
    if refused:
        raise ValueError(f"cannot resume {str(ckpt)!r} with this recipe: {'; '.join(refused)}. Start a separate run "
                         f"(output_dir=... or --no-resume) or keep the saved settings ({str(saved_path)!r})")
    changes = changed_settings(saved, recipe)
    rank_zero_info(f"resuming from {ckpt}" + (f" with changed settings: {', '.join(changes)}" if changes else ""))
    return ckpt


def changed_settings(saved: Recipe, new: Recipe) -> list[str]:
    """``key: old -> new`` for every recipe value that differs (but ``output_dir``: a run may have been moved)."""
    a, b = _flat(dataclasses.asdict(saved)), _flat(dataclasses.asdict(new))
    keys = sorted((a.keys() | b.keys()) - {"output_dir"})
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def incompatible(saved: Recipe, new: Recipe) -> list[str]:
    """Why a checkpoint written under ``saved`` cannot continue under ``new`` (empty: it can)."""
    why = []
    old_shape, new_shape = (_without(dataclasses.asdict(r.dit), _SHAPE_FREE) for r in (saved, new))
    if old_shape != new_shape:
        diff = ", ".join(f"{k} {old_shape[k]} -> {new_shape[k]}" for k in old_shape if old_shape[k] != new_shape[k])
        why.append(f"the model's parameters differ (model.name {saved.model.name!r} -> {new.model.name!r}: {diff})")
    for key in ("sparsity.enabled", "sparsity.skip_first", "seed", "parallel.strategy", "parallel.zero_stage"):
        old, now = _get(saved, key), _get(new, key)
        if old != now:
            why.append(f"{key} {old!r} -> {now!r} ({_REASONS[key]})")
    return why


_REASONS = {
    "sparsity.enabled": "which layers have SLA parameters",
    "sparsity.skip_first": "which layers have SLA parameters",
    "seed": "the data order and noise of the resumed steps",
    "parallel.strategy": "the checkpoint format",
    "parallel.zero_stage": "how ZeRO partitioned the optimizer state",
}


def zero_shards(ckpt: Path) -> int:
    """Ranks that wrote ZeRO optimizer shards into a DeepSpeed checkpoint directory (0: none, e.g. a file)."""
    return len(list(ckpt.glob("*/zero_pp_rank_*_mp_rank_00_optim_states.pt"))) if ckpt.is_dir() else 0


def _check_world_size(ckpt: Path, recipe: Recipe) -> None:
    """ZeRO partitions the optimizer state over every rank; DeepSpeed resumes it only at the same world size."""
    saved, t = zero_shards(ckpt), recipe.trainer
    world = t.devices * t.num_nodes
    if saved and saved != world:
        raise ValueError(f"{str(ckpt)!r} holds ZeRO shards of {saved} process{'es' if saved > 1 else ''}, this run "
                         f"has {world} (trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes}); resume "
                         f"with {saved}, or start a separate run with output_dir=... or --no-resume")


@rank_zero_only
def _move_aside(out: Path) -> None:
    directory = checkpoint_dir(out)
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    aside = directory.with_name(f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(directory, aside)
    if (out / RECIPE_FILE).is_file():
        os.rename(out / RECIPE_FILE, aside / RECIPE_FILE)
    rank_zero_info(f"--no-resume: moved the earlier run's checkpoints and recipe to {aside}")


def write_recipe(recipe: Recipe) -> None:
    """``output_dir/recipe.yaml``, atomically (global rank 0 only)."""
    path = Path(recipe.output_dir) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECIPE_FILE}.tmp")
    tmp.write_text(recipe_to_yaml(recipe))
    os.replace(tmp, path)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value
    return flat


def _without(tree: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in tree.items() if k not in keys}


def _get(recipe: Recipe, key: str):
    value = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value
