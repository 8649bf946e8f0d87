"""The ``sla-dist`` command line: ``sla-dist train | export | eval | preprocess | recipe ...``.

Each subcommand lives beside the code it drives, in a module exposing ``register(subparsers)``; it adds its parser
and sets ``func`` (called with the parsed namespace, returning an exit code). Modules are imported only when the
command line names them, so ``sla-dist --help`` stays fast and optional dependencies stay optional.

User errors (a bad recipe value, a missing or unreadable file: ValueError / FileNotFoundError, whose messages name
the offending value) are printed as one line, ``sla-dist COMMAND: error: ...``, with exit code 2, as argparse does
for bad options.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that registers it
COMMANDS = {
    "train": "sla_dist.lightning.command",
    "export": "sla_dist.lightning.command",
    "eval": "sla_dist.eval.command",
    "preprocess": "sla_dist.data.command",
    "recipe": "sla_dist.lightning.command",
}
SUMMARIES = {
    "train": "train a DiT with SLA from a recipe (resumes when rerun)",
    "export": "consolidate a (ZeRO) checkpoint into one safetensors file",
    "eval": "evaluate checkpoints: samples, flow loss, FVD, CLIP score, attention fidelity",
    "preprocess": "encode videos + captions into latent shards for training",
    "recipe": "print a resolved recipe with every key documented",
}
"""One line per subcommand for ``sla-dist --help``, which imports none of the modules."""


def build_parser(names: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sla-dist", description="Train video DiTs with Sparse-Linear Attention.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    registered: set[str] = set()
    for name in names:
        module = COMMANDS[name]
        if module in registered:
            continue
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
            sub.add_parser(name, help=f"(not available: {module} is not installed)")
        registered.add(module)
    for name in COMMANDS:
        if name not in sub.choices:
            sub.add_parser(name, help=SUMMARIES[name])
    for command in [parser, *sub.choices.values()]:
        command.add_argument("--verbose", action="store_true",
                             help="show library messages (DeepSpeed, Lightning tips and deprecation warnings)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = [a for a in argv[:1] if a in COMMANDS] or []
    parser = build_parser(wanted)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from .quiet import configure_output

    configure_output(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message's layout
        print(f"sla-dist {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
