"""``vif eval``: a saved model (+ optional VIF adapter) on a local benchmark file.

    vif eval --model llava-folder --benchmark bench.jsonl --metric vqa
    vif eval --model runs/vif --adapter runs/vif/vif --benchmark bench.jsonl --metric vqa
    vif eval --model runs/vif --compare runs/vif/vif --benchmark bench.jsonl --metric vqa

Writes ``predictions_<run>.jsonl`` and ``summary.json`` to ``--output-dir`` and prints a
table of the runs. The benchmark file format is described in :mod:`vif.eval.benchmark`
and docs/eval.md. Everything that needs no weights (the file and its images, model config,
adapter, device, dtype, output folder) is checked before the model loads.
"""

from __future__ import annotations

import argparse

from ..loading import DTYPE_CHOICES
from .metrics import METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder (save_pretrained) or hub id")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="VIF adapter folder or hub id: evaluate base + VIF only")
    which.add_argument(
        "--compare", metavar="ADAPTER", help="VIF adapter folder or hub id: evaluate base AND base + VIF"
    )
    parser.add_argument(
        "--benchmark", required=True, help="benchmark file, JSON list or JSONL (see docs/eval.md)"
    )
    parser.add_argument("--metric", required=True, help=f"one of: {', '.join(sorted(METRICS))}")
    parser.add_argument("--image-folder", help="folder the image paths are relative to (default: the file's)")
    parser.add_argument("--output-dir", default="eval-out", help="where predictions and summary.json go")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="use a non-empty --output-dir, replacing the predictions / summary files there (nothing else)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="samples per generation batch (left-padded)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--instruction",
        help="text appended to every question (default: the metric's LLaVA-1.5 prompt; '' for none)",
    )
    parser.add_argument(
        "--image-aspect",
        default="pad",
        choices=["pad", "resize", "keep"],
        help="pad to square (LLaVA-1.5, vif train's default) | resize | keep; use what the adapter was trained with",
    )
    parser.add_argument("--alpha", type=float, help="override the adapter's injection strength alpha (0..1)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples")
    add_placement_arguments(parser)
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (generation, loading)")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --device-map, --offload-folder and --dtype, shared by vif eval and vif diagnose."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--device-map",
        help="accelerate placement instead of --device: auto, balanced, sequential (big models, offloading)",
    )
    parser.add_argument("--offload-folder", help="where --device-map puts weights it offloads to disk")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="auto = the checkpoint's dtype (default)"
    )


def check_model_options(args: argparse.Namespace, adapter: str | None, overrides: dict) -> object:
    """The weight-free checks shared by vif eval and vif diagnose; returns the model's config."""
    from ..adapter_io import inspect_adapter, resolve_adapter
    from ..errors import UsageError
    from ..loading import check_device, check_vision_language, default_device, model_config, parse_dtype

    if args.device is not None and args.device_map is not None:
        raise UsageError("give --device or --device-map, not both.")
    if args.offload_folder is not None and args.device_map is None:
        raise UsageError("--offload-folder only applies with --device-map.")
    dtype = parse_dtype(args.dtype)
    if args.device_map is None:
        check_device(args.device or default_device(), dtype)
    if overrides and adapter is None:
        raise UsageError(f"--{next(iter(overrides))} changes a VIF adapter; give --adapter or --compare too.")
    config = model_config(args.model)
    check_vision_language(config, args.model)
    if adapter is not None:
        inspect_adapter(resolve_adapter(adapter), config, **overrides)
    return config


def load_options(args: argparse.Namespace) -> dict:
    """``load_model`` keywords from the shared --device / --device-map / --dtype options."""
    placement = {"device": args.device} if args.device_map is None else {"device_map": args.device_map}
    if args.offload_folder is not None:
        placement["offload_folder"] = args.offload_folder
    return {"dtype": args.dtype, **placement}


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..loading import disable_progress_bars, load_model
    from ..outputs import check_output_folder, clear_owned
    from .benchmark import read_benchmark
    from .runner import OUTPUT_FILES, evaluate, format_summary

    if args.no_progress:
        disable_progress_bars()
    if args.metric not in METRICS:
        raise UsageError(f"unknown metric {args.metric!r}; known metrics: {', '.join(sorted(METRICS))}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    # Everything that needs no weights, before spending minutes loading a model.
    read_benchmark(args.benchmark, args.metric, image_folder=args.image_folder, limit=args.limit)
    adapter = args.compare or args.adapter
    overrides = {} if args.alpha is None else {"alpha": args.alpha}
    check_model_options(args, adapter, overrides)
    check_output_folder(args.output_dir, OUTPUT_FILES, args.overwrite, "--output-dir")

    model, processor = load_model(
        args.model,
        attn_implementation=args.attn_implementation,
        adapter=adapter,
        **load_options(args),
        **overrides,
    )
    clear_owned(args.output_dir, OUTPUT_FILES)
    summary = evaluate(
        model,
        processor,
        args.benchmark,
        args.metric,
        output_dir=args.output_dir,
        compare=args.compare is not None,
        image_folder=args.image_folder,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        instruction=args.instruction,
        image_aspect=args.image_aspect,
        limit=args.limit,
        progress=not args.no_progress,
        metadata={"model": args.model, "adapter": adapter, **({"alpha": args.alpha} if overrides else {})},
    )
    print(format_summary(summary))
    print(f"predictions and summary.json written to {args.output_dir}")
    return 0
