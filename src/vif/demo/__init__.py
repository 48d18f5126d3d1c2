"""``vif demo``: the project's main job, end to end, on a fresh CPU machine in under 10 minutes.

1. generate TinyFind (:mod:`vif.data.tinyfind`): cluttered images, one small target, questions
   whose answer depends on a handful of pixels;
2. build a tiny LLaVA-architecture checkpoint (:func:`vif.tiny.build_tiny_llava`) and train it on
   the training split without VIF (the "base" model);
3. continue training the base with the same steps, data order and learning rate in four arms:
   no VIF (control), VIF with the paper's recipe, VIF with the project's defaults, and the
   ground-truth map (upper bound); each arm once per seed, in parallel worker processes;
4. score every run on the test split by greedy generation + exact match, and measure how much of
   each VIF map lands on the target;
5. run the attention diagnostics on the first seed's control and VIF arms (per-layer visual
   attention ratio and entropy, heatmaps with VIF's importance map);
6. write ``report.md``, ``report.html`` and ``metrics.json`` into the output folder.

    vif demo                               # full run
    vif demo --quick --output-dir /tmp/x   # CI-sized run (well under a minute)

See docs/demo.md.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .pipeline import ARMS, LABELS, DemoSettings, run_demo

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
    parser.add_argument(
        "--workers", type=int, default=2, help="processes that train the arms side by side [2]"
    )
    parser.add_argument("--seeds", type=int, default=None, help="runs per arm, seeds 0..N-1 [3; --quick: 1]")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings.quick() if args.quick else DemoSettings.full()
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("error: --seeds must be >= 1")
        settings = replace(settings, seeds=tuple(range(args.seeds)))
    metrics = run_demo(
        args.out,
        settings,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        threads=args.threads or None,
        workers=args.workers,
    )
    lines = [f"\naccuracy on {metrics['n_test']} test questions, mean over seeds {metrics['seeds']}:"]
    for arm in ARMS:
        if arm in metrics:
            m = metrics[arm]
            on = m.get("importance_on_target")
            lines.append(
                f"  {LABELS[arm]:<32} {100 * m['accuracy']:5.1f} %"
                + ("" if on is None else f"   map on target {100 * on:5.1f} %")
            )
    lines.append(f"({metrics['seconds']:.0f} s) report: {Path(args.out) / 'report.html'}")
    print("\n".join(lines))
    return 0
