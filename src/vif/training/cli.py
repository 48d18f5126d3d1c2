"""``vif train RECIPE [--set key=value ...] [--resume [CHECKPOINT]] [--check] [--json]``.

Single process::

    vif train recipes/llava-1.5-7b-vif.yaml --set output_dir=runs/a

Several GPUs (DeepSpeed ZeRO-2)::

    accelerate launch --config_file recipes/accelerate_zero2.yaml -m vif.cli train recipes/llava-1.5-7b-vif.yaml

Logs and progress go to stderr; stdout gets what the run wrote (``model:`` / ``adapter:``
lines), or with ``--json`` only one JSON object, for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

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
        help="continue from the last complete checkpoint in output_dir (or from CHECKPOINT), same data order",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="resume even though the recipe differs from the one the run started with",
    )
    parser.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=...")
    parser.add_argument(
        "--check",
        action="store_true",
        help="run every check that needs no weights (data, images, model config, VIF values, Trainer "
        "arguments, output folder), print the validated recipe as JSON, and exit",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the result as one JSON object on stdout"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (training, weight loading, downloads); log lines still go to stderr",
    )


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set schedule.max_steps=10")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def run(args: argparse.Namespace) -> int:
    from ..loading import disable_progress_bars
    from .api import check, train

    overrides = parse_overrides(args.overrides)
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.resume is not None:
        overrides["resume"] = args.resume
    if args.no_progress:
        disable_progress_bars()
        overrides["disable_tqdm"] = True  # a TrainingArguments field, passed through
        logging.getLogger("transformers").setLevel(logging.WARNING)
    out = sys.stdout
    if args.check:
        checked = check(args.recipe, force=args.force, **overrides)
        if not args.json:
            print(checked.summary(), file=sys.stderr)
            print("check passed: nothing was trained", file=sys.stderr)
        print(json.dumps(checked.recipe.to_dict(), indent=None if args.json else 2), file=out)
        return 0
    # Everything the libraries print (the Trainer's log dicts, bars) goes to stderr; stdout is
    # left to the result below.
    with contextlib.redirect_stdout(sys.stderr):
        result = train(args.recipe, force=args.force, **overrides)
    summary = {k: v for k, v in result.to_dict().items() if k != "log_history"}
    if args.json:
        print(json.dumps(summary), file=out)
    else:
        print(f"model: {result.model_path}", file=out)
        if result.vif_adapter is not None:
            print(f"adapter: {result.vif_adapter}", file=out)
        loss = result.metrics.get("loss", result.metrics.get("train_loss"))
        print(f"steps: {result.global_step}" + ("" if loss is None else f"; loss: {loss:.4f}"), file=out)
    return 0
