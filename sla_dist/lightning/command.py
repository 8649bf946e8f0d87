"""``sla-dist train RECIPE [key=value ...]``, ``sla-dist export CKPT OUT`` and ``sla-dist recipe show RECIPE``."""

from __future__ import annotations

import argparse

TRAIN_DESCRIPTION = """\
Train from a recipe YAML (see recipes/); key=value overrides follow it, e.g.
  sla-dist train recipes/tiny_cpu.yaml trainer.max_steps=50 sla.topk=0.1
  sla-dist train recipes/tiny_cpu.yaml output_dir=runs/dense sparsity.enabled=false   # a dense baseline
Everything goes to output_dir: checkpoints/, logs/ (CSV, TensorBoard), samples/, recipe.yaml, loss.png.
Rerunning the same command resumes from the newest complete checkpoint in output_dir/checkpoints, after checking
the recipe against output_dir/recipe.yaml (changes are listed; a different model shape, seed, ZeRO stage or number
of processes is refused); a separate run needs its own output_dir=..., or --no-resume."""


def register(subparsers) -> None:
    from .recipe_docs import recipe_keys_help

    train = subparsers.add_parser("train", help="train a DiT with SLA from a recipe (resumes when rerun)",
                                  description=TRAIN_DESCRIPTION, epilog=recipe_keys_help(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", help="recipe YAML (see recipes/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields (keys below)")
    train.add_argument("--no-resume", action="store_true",
                       help="start from step 0; the earlier run's checkpoints and recipe.yaml are moved aside to "
                            "output_dir/checkpoints.before-<time>/ (logs go to a new version)")
    train.set_defaults(func=_train)

    export = subparsers.add_parser("export", help="consolidate a (ZeRO) checkpoint into one safetensors file")
    export.add_argument("checkpoint", help="checkpoint file or DeepSpeed directory (e.g. RUN/checkpoints/last.ckpt)")
    export.add_argument("out", help="output .safetensors path")
    export.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(func=_export)

    recipe = subparsers.add_parser("recipe", help="print a resolved recipe with every key documented",
                                   description="sla-dist recipe show RECIPE [key=value ...]: the recipe merged with "
                                               "the schema defaults and the overrides, as YAML with a comment per "
                                               "key (copy it into a file to start a new recipe).")
    actions = recipe.add_subparsers(dest="action", metavar="{show}", required=True)
    show = actions.add_parser("show", help="print the resolved recipe with field docs")
    show.add_argument("recipe", nargs="?", default=None, help="recipe YAML (default: the schema defaults)")
    show.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields")
    show.set_defaults(func=_show_recipe)


def _show_recipe(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .recipe_docs import recipe_yaml_with_docs

    print(recipe_yaml_with_docs(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .run import train

    train(load_recipe(args.recipe, args.overrides), resume=not args.no_resume)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import export_safetensors

    path = export_safetensors(args.checkpoint, args.out, ema=args.ema, force=args.force)
    print(f"wrote {path}")
    return 0
