"""``vif train RECIPE [--set key=value ...] [--resume [CHECKPOINT]]``.

Single process::

    vif train recipes/llava-1.5-7b-vif.yaml --set output_dir=runs/a

Several GPUs (DeepSpeed ZeRO-2)::

    accelerate launch --config_file recipes/accelerate_zero2.yaml -m vif.cli train recipes/llava-1.5-7b-vif.yaml
"""

from __future__ import annotations

import argparse
import json

import yaml

from .recipe import RecipeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML or JSON training recipe (see docs/training.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value by dotted key, e.g. --set schedule.max_steps=10 (VALUE is read as YAML)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the last checkpoint in output_dir (or from CHECKPOINT), same data order",
    )
    parser.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=...")
    parser.add_argument("--check", action="store_true", help="only load and validate the recipe, then exit")


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set schedule.max_steps=10")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def run(args: argparse.Namespace) -> int:
    from .api import train
    from .recipe import load_recipe

    overrides = parse_overrides(args.overrides)
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.resume is not None:
        overrides["resume"] = args.resume
    recipe = load_recipe(args.recipe, **overrides)
    if args.check:
        print(json.dumps(recipe.to_dict(), indent=2))
        return 0
    result = train(recipe)
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "log_history"}, indent=2))
    return 0
