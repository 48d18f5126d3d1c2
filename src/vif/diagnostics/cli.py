"""``vif diagnose``: visual-attention diagnostics of a saved model on a LLaVA-format data file.

vif diagnose --model llava-1.5-7b-hf --data val.json --image-folder images/ --output-dir diag/
vif diagnose --model runs/vif --data ... --adapter runs/vif/vif    # the model with VIF attached
vif diagnose --model runs/vif --data ... --compare runs/vif/vif    # base vs base + VIF, side by side

Everything that needs no weights (the data file and its images, layers, model config,
adapter, device, dtype, output folder) is checked before the model loads.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..eval.cli import add_placement_arguments, check_model_options, load_options


def parse_layers(text: str | None, option: str, num_layers: int | None = None) -> list[int] | None:
    """``"0,8,16"`` (commas or spaces) -> ``[0, 8, 16]``, each checked against ``num_layers``."""
    if not text:
        return None
    layers = []
    for piece in text.replace(",", " ").split():
        try:
            layers.append(int(piece))
        except ValueError:
            raise UsageError(
                f"{option} {text!r}: {piece!r} is not a layer number; give decoder layer indices separated "
                "by commas, e.g. 0,8,16."
            ) from None
    if num_layers is not None:
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise UsageError(
                f"{option} {text!r}: {bad} out of range; the language model has {num_layers} decoder layers "
                f"(0..{num_layers - 1})."
            )
    return layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved Hugging Face model folder (with its processor)")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON / JSONL file")
    parser.add_argument(
        "--image-folder", default=None, help="root of the data's image paths (default: its folder)"
    )
    vif_group = parser.add_mutually_exclusive_group()
    vif_group.add_argument(
        "--adapter", default=None, help="VIF adapter folder or hub id: diagnose the model with VIF attached"
    )
    vif_group.add_argument(
        "--compare", default=None, metavar="ADAPTER", help="VIF adapter folder or hub id: base vs base + VIF"
    )
    parser.add_argument("--output-dir", default=None, help="output folder (default: diagnostics)")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)  # deprecated spelling of --output-dir
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="use a non-empty --output-dir, replacing the files diagnose writes there (nothing else)",
    )
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
    parser.add_argument(
        "--image-aspect",
        default="pad",
        choices=["pad", "resize", "keep"],
        help="pad to square (LLaVA-1.5, vif train's default) | resize | keep; use what the adapter was trained with",
    )
    add_placement_arguments(parser)
    parser.add_argument(
        "--route",
        default="probe",
        choices=["probe", "attentions"],
        help="probe: fast rows-only path on SDPA; attentions: eager output_attentions reference",
    )
    parser.add_argument("--alpha", type=float, default=None, help="override the adapter's injection alpha")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (samples, loading)")


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


def _check_data(args: argparse.Namespace) -> None:
    """The data file parses and the images of the samples that will be used are readable."""
    from ..data.llava_format import LlavaFormatDataset, check_image

    if not Path(args.data).is_file():
        raise UsageError(f"--data {args.data} is not a file (a LLaVA-format JSON / JSONL).")
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        raise UsageError(f"--image-folder {args.image_folder} is not a folder.")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples must be >= 1, got {args.max_samples}.")
    dataset = LlavaFormatDataset(args.data, args.image_folder)  # parses and validates every sample
    used = dataset.samples[: args.max_samples] if args.max_samples else dataset.samples
    bad = [
        (sid, p, reason) for sid, _, paths in used for p in paths if (reason := check_image(p)) is not None
    ]
    if bad:
        sid, path, reason = bad[0]
        raise UsageError(
            f"{len(bad)} image(s) of {args.data} cannot be read, e.g. sample {sid!r}: {str(path)!r} ({reason}). "
            "Fix or remove the files (or their samples), or point --image-folder at the image root."
        )


def run(args: argparse.Namespace) -> int:
    from ..loading import disable_progress_bars, load_model
    from ..model import VIFModel
    from ..outputs import check_output_folder, clear_owned
    from .api import OUTPUT_FILES, compare, diagnose

    if args.out is not None:
        if args.output_dir is not None:
            raise UsageError("--out is the old name of --output-dir; give one of them.")
        warnings.warn("vif diagnose --out is deprecated; use --output-dir", FutureWarning, stacklevel=1)
    output_dir = args.output_dir or args.out or "diagnostics"
    if args.no_progress:
        disable_progress_bars()
    # Everything that needs no weights, before the (possibly minutes-long) model load.
    _check_data(args)
    adapter = args.adapter or args.compare
    overrides = {} if args.alpha is None else {"alpha": args.alpha}
    config = check_model_options(args, adapter, overrides)
    text = getattr(config, "text_config", None) or config
    layers = parse_layers(args.layers, "--layers", int(text.num_hidden_layers))
    heatmap_layers = parse_layers(args.heatmap_layers, "--heatmap-layers", int(text.num_hidden_layers))
    check_output_folder(output_dir, OUTPUT_FILES, args.overwrite, "--output-dir")

    attn = "sdpa" if args.route == "probe" else "eager"
    model, processor = load_model(args.model, attn_implementation=attn, **load_options(args))
    options = dict(
        samples=args.data,
        out_dir=output_dir,
        rows=args.rows,
        layers=layers,
        heatmap_layers=heatmap_layers,
        processor=processor,
        image_folder=args.image_folder,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        n_heatmaps=args.n_heatmaps,
        route=args.route,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
        image_aspect=args.image_aspect,
    )
    clear_owned(output_dir, OUTPUT_FILES)
    if args.compare:
        summary = compare(model, args.compare, **options, **overrides)
    elif args.adapter:
        vmodel = VIFModel.from_pretrained(model, args.adapter, **overrides)
        summary = diagnose(vmodel, **options)
    else:
        summary = diagnose(model, **options)
    _print_table(summary)
    print(f"report: {Path(output_dir) / 'index.html'}")
    print(f"numbers: {Path(output_dir) / 'summary.json'}")
    return 0
