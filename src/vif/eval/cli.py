"""``vif eval``: a saved model (+ optional VIF adapter) on a local benchmark file.

    vif eval --model llava-folder --benchmark bench.jsonl --metric vqa
    vif eval --model llava-folder --adapter vif-adapter --benchmark bench.jsonl --metric vqa
    vif eval --model llava-folder --compare vif-adapter --benchmark bench.jsonl --metric vqa

Writes ``predictions_<run>.jsonl`` and ``summary.json`` to ``--output-dir`` and prints a
table of the runs. The benchmark file format is described in :mod:`vif.eval.benchmark`
and docs/eval.md.
"""

from __future__ import annotations

import argparse
import sys

from .benchmark import BenchmarkError, read_benchmark
from .metrics import METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder (save_pretrained) or hub id")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="VIF adapter folder: evaluate base + VIF only")
    which.add_argument(
        "--compare", metavar="ADAPTER_DIR", help="VIF adapter folder: evaluate base AND base + VIF"
    )
    parser.add_argument(
        "--benchmark", required=True, help="benchmark file, JSON list or JSONL (see docs/eval.md)"
    )
    parser.add_argument("--metric", required=True, help=f"one of: {', '.join(sorted(METRICS))}")
    parser.add_argument("--image-folder", help="folder the image paths are relative to (default: the file's)")
    parser.add_argument("--output-dir", default="eval-out", help="where predictions and summary.json go")
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
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(message: str) -> int:
    print(f"vif eval: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from .runner import evaluate, format_summary

    if args.metric not in METRICS:
        return _fail(f"unknown metric {args.metric!r}; known metrics: {', '.join(sorted(METRICS))}")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    # Validate the file and every image before spending minutes loading a model.
    try:
        read_benchmark(args.benchmark, args.metric, image_folder=args.image_folder, limit=args.limit)
    except BenchmarkError as err:
        return _fail(str(err))

    adapter = args.compare or args.adapter
    model, processor = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        adapter=adapter,
    )
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
        metadata={"model": args.model, "adapter": adapter},
    )
    print(format_summary(summary))
    print(f"predictions and summary.json written to {args.output_dir}")
    return 0
