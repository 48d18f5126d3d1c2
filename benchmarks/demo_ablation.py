"""Ablation of the project's VIF defaults on the demo: each new ingredient removed one at a time.

Reuses a finished ``vif demo`` output folder (its data and base model) and trains extra VIF arms
from the same base with the same seeds, recipe and data order as the demo's arms, through the
demo's own :func:`vif.demo.pipeline.run_arm` (training, greedy-generation scoring, map on target).

    .venv/bin/python benchmarks/demo_ablation.py --demo demo-out [--seeds 0 1 2] [--workers 2]

Prints a table (with the command that made it) and writes ``<demo>/ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from vif.demo.pipeline import WIRING, ArmJob, DemoSettings, run_arm

# Each variant: the project default (`compact` preset, the demo's recipe) with one ingredient set
# back. Keys starting with "_" change the demo's recipe instead of the VIFConfig: "_warmup", the
# steps of the VIF-only first stage; "_vif_lr", the VIF module's learning rate.
VARIANTS: dict[str, dict] = {
    "project default": {},
    "- VIF-only first stage (_warmup 0)": {"_warmup": 0},
    "- alpha 0.8 (alpha 0.5)": {"alpha": 0.5},
    "- VIF lr 3e-3 (_vif_lr 1e-3)": {"_vif_lr": 1e-3},
    "- log-sum-exp reader (evidence_reader 'tokens')": {"evidence_reader": "tokens"},
    "- distilled salience (salience 'evidence')": {"salience": "evidence"},
    "- floor 0.25 token (min_sigma 0.5)": {"min_sigma": 0.5},
    "- answer-evidence head (evidence_weight 0)": {"evidence_weight": 0.0},
    "- attention centres (centers linear)": {"centers": "linear", "evidence_pool": "map"},
    "- sigma floor in tokens (min_sigma 0.105 of the image)": {"min_sigma_unit": "image", "min_sigma": 0.105},
    "- detached attender input": {"detach_input": False},
    "- image embeddings in the attender": {"vision_features": "extraction"},
    "- per-token evidence reader (pooled)": {"evidence_reader": "pooled"},
    "- evidence salience (salience 'tokens')": {"salience": "tokens"},
}


def _run(job: ArmJob) -> dict:
    return run_arm(job, threads=1, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("demo-out"), help="a finished `vif demo` folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "FIELD=VALUE"),
        help="an extra variant: its name, then VIFConfig fields (JSON values), e.g. "
        "--variant 'alpha 0.8' alpha=0.8; repeatable",
    )
    args = parser.parse_args(argv)

    metrics = json.loads((args.demo / "metrics.json").read_text())
    settings = DemoSettings.full()
    settings = replace(
        settings,
        arm_steps=metrics["steps"]["arm"],
        warmup_steps=metrics["steps"].get("warmup", {}),  # demos made before the stage had none
        seeds=tuple(args.seeds),
    )
    extra = {}
    for name, *fields in args.variant:
        try:
            extra[name] = {k: json.loads(v) for k, v in (f.split("=", 1) for f in fields)}
        except ValueError as error:
            parser.error(f"--variant {name!r}: fields must be FIELD=JSON-VALUE ({error})")
    known = {**VARIANTS, **extra}
    variants = {
        k: v
        for k, v in known.items()
        if (args.only is None and not extra) or k in (args.only or []) or k in extra
    }
    # The default is the demo's own `vif` arm (same preset, wiring, seeds and data order): reuse its
    # runs for the seeds it has instead of training them again.
    demo_seeds = metrics["seeds"]
    reuse_default = "project default" in variants and set(args.seeds) <= set(demo_seeds)
    out = args.demo / "ablation"
    jobs, names = [], {}
    for name, change in variants.items():
        if name == "project default" and reuse_default:
            continue
        arm = "v-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        fields = {k: v for k, v in change.items() if not k.startswith("_")}
        arm_settings = replace(
            settings,
            arms={**settings.arms, arm: {"preset": "compact", **WIRING, **fields}},
            warmup_steps={arm: change.get("_warmup", settings.warmup_steps.get("vif", 0))},
            vif_lr=change.get("_vif_lr", settings.vif_lr),
        )
        for seed in args.seeds:
            job = ArmJob(
                arm,
                seed,
                arm_settings,
                str(args.demo / "models" / "base"),
                str(args.demo / "data" / "train.json"),
                str(args.demo / "data" / "test.json"),
                str(out),
                "cpu",
            )
            jobs.append(job)
            names[(arm, seed)] = name
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_run, jobs))

    if reuse_default:
        pick = [demo_seeds.index(seed) for seed in args.seeds]
        for seed, i in zip(args.seeds, pick):
            results.append(
                {
                    "arm": "vif",
                    "seed": seed,
                    "accuracy": metrics["vif"]["accuracy_per_seed"][i],
                    "importance_on_target": metrics["vif"]["importance_on_target_per_seed"][i],
                }
            )
            names[("vif", seed)] = "project default"
    control = metrics["control"]["accuracy_per_seed"]
    control_by_seed = dict(zip(metrics["seeds"], control))
    rows = []
    for name in variants:
        runs = [r for r in results if names[(r["arm"], r["seed"])] == name]
        acc = [r["accuracy"] for r in runs]
        on = [r["importance_on_target"] for r in runs]
        gain = [r["accuracy"] - control_by_seed[r["seed"]] for r in runs if r["seed"] in control_by_seed]
        rows.append(
            {
                "variant": name,
                "seeds": [r["seed"] for r in runs],
                "accuracy": float(np.mean(acc)),
                "accuracy_per_seed": acc,
                "gain_over_control": float(np.mean(gain)) if gain else None,
                "importance_on_target": float(np.mean(on)),
                "importance_on_target_per_seed": on,
                "per_seed_by_answer": [r.get("importance_on_target_by_answer") for r in runs],
            }
        )
    command = shlex.join(["python", *sys.argv])
    print(f"# {command}")
    control_here = [control_by_seed[seed] for seed in args.seeds if seed in control_by_seed]
    print(f"control: {100 * float(np.mean(control_here)):.1f} % over seeds {args.seeds}")
    print("| variant | accuracy (per seed) | gain over control | map on target (per seed) |")
    print("|---|---|---|---|")
    for row in rows:
        per = " / ".join(f"{100 * a:.1f}" for a in row["accuracy_per_seed"])
        on = " / ".join(f"{100 * a:.1f}" for a in row["importance_on_target_per_seed"])
        gain = "-" if row["gain_over_control"] is None else f"{100 * row['gain_over_control']:+.1f}"
        print(
            f"| {row['variant']} | {100 * row['accuracy']:.1f} ({per}) | {gain} | "
            f"{100 * row['importance_on_target']:.1f} ({on}) |"
        )
    # Runs of other variants (earlier invocations with --only) are kept in ablation.json.
    path = args.demo / "ablation.json"
    previous = json.loads(path.read_text()) if path.exists() else {"rows": [], "commands": []}
    merged = {row["variant"]: row for row in previous["rows"]}
    merged.update({row["variant"]: row for row in rows})
    ordered = [merged[name] for name in known if name in merged]
    ordered += [row for name, row in merged.items() if name not in known]
    commands = [*previous.get("commands", [previous["command"]] if "command" in previous else []), command]
    path.write_text(json.dumps({"commands": commands, "rows": ordered}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
