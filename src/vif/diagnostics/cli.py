"""``vif diagnose``: visual-attention diagnostics of a saved model on a LLaVA-format data file.

vif diagnose --model llava-1.5-7b-hf --data val.json --image-folder images/ --out diag/
vif diagnose --model ... --data ... --adapter runs/vif      # the model with VIF attached
vif diagnose --model ... --data ... --compare runs/vif      # base vs base + VIF, side by side
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..loading import DTYPES


def _layers(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.replace(",", " ").split()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved Hugging Face model folder (with its processor)")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON / JSONL file")
    parser.add_argument(
        "--image-folder", default=None, help="root of the data's image paths (default: its folder)"
    )
    vif_group = parser.add_mutually_exclusive_group()
    vif_group.add_argument(
        "--adapter", default=None, help="VIF adapter folder: diagnose the model with VIF attached"
    )
    vif_group.add_argument(
        "--compare", default=None, metavar="ADAPTER", help="VIF adapter folder: base vs base + VIF"
    )
    parser.add_argument("--out", default="diagnostics", help="output folder (default: %(default)s)")
    parser.add_argument("--max-samples", type=int, default=None, help="use the first N samples")
    parser.add_argument(
        "--rows",
        default="auto",
        choices=["auto", "answer", "last", "generated"],
        help="query rows: answer tokens, last prompt token, or greedily generated tokens (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="for --rows generated")
    parser.add_argument(
        "--layers", default=None, help="decoder layers to analyse, e.g. '0,8,16' (default: all)"
    )
    parser.add_argument(
        "--heatmap-layers", default=None, help="layers drawn in the heatmaps (default: a spread)"
    )
    parser.add_argument("--n-heatmaps", type=int, default=4, help="heatmap figures for the first N samples")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, else float32"
    )
    parser.add_argument(
        "--route",
        default="probe",
        choices=["probe", "attentions"],
        help="probe: fast rows-only path on SDPA; attentions: eager output_attentions reference",
    )
    parser.add_argument("--alpha", type=float, default=None, help="override the adapter's injection alpha")


def _num(x: float | None) -> str:
    return "n/a (no deep layer analysed)" if x is None else f"{x:.4f}"


def _print_table(summary: dict[str, Any]) -> None:
    runs = [summary] if "per_layer" in summary else [summary["base"], summary["vif"]]
    head = "layer" + "".join(f" | ratio {s['label']:>5} | entropy {s['label']:>5}" for s in runs)
    print(head)
    print("-" * len(head))
    for rows in zip(*(s["per_layer"] for s in runs)):
        print(
            f"{rows[0]['layer']:>5}"
            + "".join(f" | {r['ratio']:>11.4f} | {r['entropy']:>13.4f}" for r in rows)
        )
    for s in runs:
        print(
            f"{s['label']}: deep-layer entropy {_num(s['deep_entropy'])} nats (max {_num(s['max_entropy'])}), "
            f"deep-layer visual ratio {_num(s['deep_ratio'])}, {s['n_samples']} samples"
        )


def run(args: argparse.Namespace) -> int:
    from ..loading import default_device, load_model, resolve_dtype
    from ..model import VIFModel
    from .api import compare, diagnose

    # Fail on paths before the (possibly minutes-long) model load.
    if not Path(args.data).is_file():
        raise SystemExit(f"vif diagnose: --data {args.data} is not a file (a LLaVA-format JSON / JSONL).")
    adapter = args.adapter or args.compare
    if adapter and not (Path(adapter) / "vif_config.json").is_file():
        raise SystemExit(
            f"vif diagnose: {adapter} has no vif_config.json; point --adapter / --compare at a folder "
            "written by VIFModel.save_pretrained."
        )
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    attn = "sdpa" if args.route == "probe" else "eager"
    model, processor = load_model(args.model, device, dtype, attn_implementation=attn)
    options = dict(
        samples=args.data,
        out_dir=args.out,
        rows=args.rows,
        layers=_layers(args.layers),
        heatmap_layers=_layers(args.heatmap_layers),
        processor=processor,
        image_folder=args.image_folder,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        n_heatmaps=args.n_heatmaps,
        route=args.route,
        max_new_tokens=args.max_new_tokens,
    )
    overrides = {} if args.alpha is None else {"alpha": args.alpha}
    if args.compare:
        summary = compare(model, args.compare, **options, **overrides)
    elif args.adapter:
        vmodel = VIFModel.from_pretrained(model, args.adapter, **overrides)
        summary = diagnose(vmodel, **options)
    else:
        summary = diagnose(model, **options)
    _print_table(summary)
    print(f"report: {Path(args.out) / 'index.html'}")
    print(f"numbers: {Path(args.out) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="vif diagnose")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
