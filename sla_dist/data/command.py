"""``sla-dist preprocess``: encode videos and captions into latent shards (see sla_dist/data/preprocess.py).

Options come from the command line, optionally on top of the ``preprocess:`` section of a recipe (``--recipe``;
keys are PreprocessConfig's field names). Rank and world size come from ``--rank/--world-size``, else from
torchrun's ``RANK``/``WORLD_SIZE``, else 0 and 1; no process group is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# command-line option -> PreprocessConfig field; every option defaults to None so a recipe value survives
OPTIONS = {
    "--videos": ("videos", str, "directory of videos (searched recursively) or a text file listing them"),
    "--captions": ("captions", str, "caption file: .json, .jsonl or .csv (see sla_dist/data/captions.py)"),
    "--out": ("out", str, "output dataset directory"),
    "--vae": ("vae", str, "local diffusers VAE directory, or a diffusers pipeline root with vae/"),
    "--text-encoder": ("text_encoder", str, "local T5/umT5 encoder directory, or a pipeline root with text_encoder/"),
    "--tokenizer": ("tokenizer", str, "tokenizer directory (default: beside the text encoder or ../tokenizer)"),
    "--fps": ("fps", float, "frame rate clips are sampled at (default 16)"),
    "--clips-per-video": ("clips_per_video", int, "clips per video, spread over its length (default 1)"),
    "--shard-size": ("shard_size", int, "videos per shard (default 64)"),
    "--text-len": ("text_len", int, "tokenizer length; training pads to it (default 512)"),
    "--text-batch": ("text_batch", int, "captions per text-encoder call (default 16)"),
    "--device": ("device", str, "encoder device (default cuda:LOCAL_RANK if available, else cpu)"),
    "--dtype": ("dtype", str, "encoder dtype: float32, bfloat16, float16 (default bf16 on CUDA, fp32 on CPU)"),
    "--save-dtype": ("save_dtype", str, "stored dtype (default bfloat16)"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("preprocess", help="encode videos + captions into latent shards for training",
                                   description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (dest, kind, text) in OPTIONS.items():
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    parser.add_argument("--clip-shape", dest="clip_shapes", action="append", default=None, metavar="FxHxW",
                        help="clip bucket, repeatable (default 81x480x832); each video takes the closest aspect "
                             "ratio it is long enough for")
    parser.add_argument("--recipe", default=None, help="YAML file whose 'preprocess:' section gives defaults")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (default $RANK or 0)")
    parser.add_argument("--world-size", type=int, default=None, help="processes sharing the work (default "
                        "$WORLD_SIZE or 1)")
    parser.set_defaults(func=main)


def recipe_section(path: str) -> dict:
    """The keys set in the ``preprocess:`` section of a YAML recipe (a training recipe may carry one; its other
    sections are not read here), typed and checked by the recipe schema's PreprocessSection."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from sla_dist.data.preprocess import PreprocessSection
    from sla_dist.safe_yaml import load_yaml

    section = OmegaConf.to_container(load_yaml(path, "--recipe")).get("preprocess") or {}
    unknown = set(section) - {f.name for f in dataclasses.fields(PreprocessSection)}
    if unknown:
        raise ValueError(f"--recipe {path!r}: preprocess section has unknown keys {sorted(unknown)}")
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PreprocessSection), section))
    except OmegaConfBaseException as exc:
        raise ValueError(f"--recipe {path!r}: preprocess section: {exc}") from exc
    return typed.values()


def rank_and_world(args: argparse.Namespace) -> tuple[int, int]:
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world})")
    return rank, world


def main(args: argparse.Namespace) -> int:
    from sla_dist.data.preprocess import PreprocessConfig, run

    # user errors (ValueError, FileNotFoundError) become one line and exit code 2 in sla_dist.cli
    values = recipe_section(args.recipe) if args.recipe else {}
    fields = [dest for dest, _, _ in OPTIONS.values()] + ["clip_shapes"]
    values.update({k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    rank, world = rank_and_world(args)
    summary = run(PreprocessConfig(**values), rank, world)
    print(f"rank {rank}/{world}: wrote shards {summary.shards_written}, kept finished shards "
          f"{summary.shards_present}, {summary.clips} clips, skipped {len(summary.skipped)} videos; "
          + ("index.json written" if summary.index_written else "index.json waits for the other ranks' shards"))
    return 0
