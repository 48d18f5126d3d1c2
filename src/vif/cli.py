"""The ``vif`` command line. Each subcommand lives in its own module and is imported on use.

A user's mistake (a bad path, option, recipe or data file; see :mod:`vif.errors`) is
printed as one line, ``error: <message>``, with exit status 2; ``--debug`` shows the
traceback instead. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). The module provides add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vif.demo", "generate data, train a tiny model with and without VIF, compare, report"),
    "train": ("vif.training.cli", "train VIF (full or LoRA) from a YAML/JSON recipe"),
    "eval": ("vif.eval.cli", "evaluate a model (optionally + VIF adapter) on a local benchmark file"),
    "diagnose": ("vif.diagnostics.cli", "per-layer visual attention ratio, entropy, violins and heatmaps"),
    "convert-authors": (
        "vif.convert",
        "convert a checkpoint of the authors' released code into a vif adapter",
    ),
}


def _version() -> str:
    import torch
    import transformers

    from . import __version__

    return f"vif {__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="vif", description="Variational Information Flow for multimodal LLMs."
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # --debug is accepted after the subcommand too (`vif train r.yaml --debug`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not err.name or not module_name.startswith(err.name):
                raise
            continue  # not part of this installation
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text, parents=[common]))
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    from .errors import user_error_types

    try:
        return int(modules[args.command].run(args) or 0)
    except user_error_types() as err:
        if args.debug:
            raise
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
