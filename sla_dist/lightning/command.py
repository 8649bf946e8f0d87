"""``sla-dist train RECIPE [key=value ...]`` and ``sla-dist export CKPT OUT``."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a DiT with SLA from an omegaconf recipe",
                                  description="Train from a recipe YAML; key=value overrides follow it, e.g. "
                                              "trainer.max_steps=50 sla.topk=0.1. Resumes from "
                                              "<output_dir>/checkpoints/last.ckpt when it exists.")
    train.add_argument("recipe", help="recipe YAML (see recipes/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields")
    train.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    train.set_defaults(func=_train)

    export = subparsers.add_parser("export", help="consolidate a (ZeRO) checkpoint into one safetensors file")
    export.add_argument("checkpoint", help="checkpoint file or DeepSpeed directory (e.g. RUN/checkpoints/last.ckpt)")
    export.add_argument("out", help="output .safetensors path")
    export.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    export.set_defaults(func=_export)


def _train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .run import train

    train(load_recipe(args.recipe, args.overrides), resume=not args.no_resume)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import export_safetensors

    path = export_safetensors(args.checkpoint, args.out, ema=args.ema)
    print(f"wrote {path}")
    return 0
