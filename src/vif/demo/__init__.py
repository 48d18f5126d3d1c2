"""``vif demo``: the project's main job, end to end, on a fresh CPU machine in a few minutes.

1. generate TinyFind (:mod:`vif.data.tinyfind`): cluttered images, one small target, questions
   whose answer depends on a handful of pixels;
2. build a tiny LLaVA-architecture checkpoint (:func:`vif.tiny.build_tiny_llava`) and train it on
   the training split without VIF (the "base" model);
3. continue training the base for the same number of steps twice, with the same data order and
   learning rate: once without VIF (the control arm) and once with VIF;
4. score both arms on the test split by greedy generation + exact match;
5. run the attention diagnostics on both (per-layer visual attention ratio and entropy,
   heatmaps with VIF's importance map);
6. write ``report.md``, ``report.html`` and ``metrics.json`` into the output folder.

    vif demo                      # full run (about 5 minutes on 2 CPU cores)
    vif demo --quick --output-dir /tmp/x   # CI-sized run (well under a minute)

See docs/demo.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .pipeline import DemoSettings, run_demo

__all__ = ["DemoSettings", "add_arguments", "run", "run_demo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir",
        "--out",
        dest="out",
        type=Path,
        default=Path("demo-out"),
        help="output folder [demo-out]",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized run: tiny data, few steps (numbers are not meaningful)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda [cpu]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and training [0]")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 0 = torch's default [1: the model is tiny]"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings.quick() if args.quick else DemoSettings.full()
    metrics = run_demo(
        args.out,
        settings,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        threads=args.threads or None,
    )
    control, vif = metrics["control"], metrics["vif"]
    print(
        f"\naccuracy on {metrics['n_test']} test questions: control {control['accuracy']:.3f}, "
        f"VIF {vif['accuracy']:.3f}; deep-layer visual attention entropy: control "
        f"{control['deep_entropy']:.3f}, VIF {vif['deep_entropy']:.3f} nats "
        f"({metrics['seconds']:.0f} s)\nreport: {Path(args.out) / 'report.html'}"
    )
    return 0
