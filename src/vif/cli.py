"""The ``vif`` command line. Each subcommand lives in its own module and is imported on use."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vif", description="Variational Information Flow for multimodal LLMs."
    )
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
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
