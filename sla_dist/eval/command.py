"""``sla-dist eval CKPT [CKPT ...] [--recipe R [R ...]] [--reference DIR] [--i3d PATH] [--clip DIR]``.

Several checkpoints (e.g. the dense and the SLA fine-tune of one model) are evaluated with the same prompts, seeds,
noise and reference set, and reported side by side in one ``report.md``. Each checkpoint is built with its own
run's ``recipe.yaml`` (model shape, SLA settings); ``--recipe`` is for checkpoints that have none.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate checkpoints: samples, flow loss, FVD, CLIP score, attention fidelity",
        description="Sample videos from each checkpoint and write report.json, report.md, fidelity.png and "
                    "per-checkpoint videos (mp4 with PyAV, exact .safetensors, grid.png) to --out.")
    parser.add_argument("checkpoints", nargs="+", help="DeepSpeed checkpoint directories, Lightning .ckpt files or "
                                                       "exported .safetensors; several are compared side by side")
    parser.add_argument("--recipe", nargs="+", default=[],
                        help="recipe YAML (one, or one per checkpoint) for checkpoints without a saved run recipe; "
                             "a checkpoint under RUN/checkpoints/ is evaluated with RUN/recipe.yaml")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides applied to every checkpoint's recipe")
    parser.add_argument("--out", help="output directory (default: <first recipe's output_dir>/eval)")
    parser.add_argument("--names", nargs="+", help="a name per checkpoint for the report")
    parser.add_argument("--reference", help="directory of reference videos for FVD (.mp4 / .safetensors); "
                                            "default: held-out synthetic videos")
    parser.add_argument("--i3d", help="I3D TorchScript detector file for the standard FVD (default: a random "
                                      "3D-conv extractor; torch.jit.load runs code from the file: trust it)")
    parser.add_argument("--clip", help="local CLIP directory (CLIPModel + CLIPProcessor save_pretrained) for the "
                                       "CLIP score")
    parser.add_argument("--num-videos", type=int, default=16, help="videos sampled per checkpoint")
    parser.add_argument("--reference-videos", type=int, default=64, help="held-out synthetic reference videos")
    parser.add_argument("--val-samples", type=int, default=32, help="held-out samples of the validation loss")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="videos per model call (default: the recipe's data.batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="ODE steps")
    parser.add_argument("--solver", choices=("euler", "heun"), default="euler")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and probe noise")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95],
                        help="sparsities of the attention-fidelity probe")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights of Lightning checkpoints")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    """Run the evaluation; user errors (missing files, bad directories or settings) print one line, exit code 2."""
    import sys
    from pathlib import Path

    import torch

    from ..lightning.recipe import load_recipe
    from .evaluate import EvalConfig, evaluate
    from .fidelity import FidelityConfig
    from ..sampling import SamplerConfig

    try:
        config = EvalConfig(
            checkpoints=args.checkpoints, recipes=args.recipe, out_dir=args.out or "", names=args.names,
            overrides=args.override, reference=args.reference, i3d=args.i3d, clip=args.clip,
            num_videos=args.num_videos, reference_videos=args.reference_videos, val_samples=args.val_samples,
            batch_size=args.batch_size,
            sampler=SamplerConfig(steps=args.steps, solver=args.solver, guidance=args.guidance, seed=args.seed),
            fidelity=FidelityConfig(sparsities=args.sparsities, seed=args.seed), ema=args.ema,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if not args.out:
            config.out_dir = str(Path(load_recipe(config.recipe_paths()[0], args.override).output_dir) / "eval")
        report = evaluate(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sla-dist eval: error: {exc}", file=sys.stderr)
        return 2
    for name, run in report["checkpoints"].items():
        clip = "" if run["clip_score"] is None else f"  CLIP {run['clip_score']:.3f}"
        print(f"{name}: val flow loss {run['val_loss']:.4f}  FVD {run['fvd']:.3f}{clip}")
    print(f"wrote {Path(config.out_dir) / 'report.md'}")
    return 0
