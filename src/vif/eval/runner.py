"""Evaluate a model (optionally with VIF, optionally base vs. VIF) on a local benchmark file.

    from vif.eval import evaluate
    from vif.loading import load_model

    model, processor = load_model("llava-folder", adapter="vif-adapter")
    summary = evaluate(model, processor, "bench.jsonl", "vqa", output_dir="eval-out", compare=True)
    print(summary["runs"]["base"]["scores"]["accuracy"], summary["runs"]["vif"]["scores"]["accuracy"])

Outputs (when ``output_dir`` is given):

* ``predictions_<run>.jsonl``: one line per sample, in file order:
  ``{"id", "image", "question", "prompt", "prediction", "scores": {...}}`` plus the
  reference fields the record has (``answer``, ``options``, ``bbox``);
* ``summary.json``: see :func:`evaluate`.

Runs are named ``"base"`` (a plain model, or a VIFModel with VIF disabled) and ``"vif"``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.llava_format import box_after_padding, load_image
from .benchmark import BenchmarkSample, build_question, read_benchmark
from .generation import IMAGE_ASPECTS, generate_answers, user_message
from .metrics import aggregate, get_metric

REFERENCE_FIELDS = ("answer", "options", "bbox")
# What evaluate() writes to an output folder (`vif eval --overwrite` removes exactly these).
OUTPUT_FILES = ("summary.json", "predictions_*.jsonl")


def predict(
    model: Any,
    processor: Any,
    samples: Sequence[BenchmarkSample],
    metric: str,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    instruction: str | None = None,
    progress: bool = True,
    desc: str = "eval",
    image_aspect: str = "pad",
) -> list[str]:
    """Greedy predictions for ``samples`` in order, ``batch_size`` at a time (left-padded)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    predictions: list[str] = []
    with tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            conversations = [user_message(build_question(s, metric, instruction)) for s in chunk]
            images = [[load_image(s.image_path, s.id)] for s in chunk]
            extra = {}
            if _reads_boxes(model):
                extra["vif_boxes"] = evidence_boxes(chunk, images, image_aspect)
            predictions += generate_answers(
                model, processor, conversations, images, max_new_tokens, image_aspect=image_aspect, **extra
            )
            bar.update(len(chunk))
    return predictions


def score(
    samples: Sequence[BenchmarkSample], predictions: Sequence[str], metric: str
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Per-sample scores and their :func:`vif.eval.metrics.aggregate` summary."""
    scorer = get_metric(metric)
    per_sample = [scorer(prediction, s.record) for s, prediction in zip(samples, predictions, strict=True)]
    return per_sample, aggregate(metric, per_sample, [s.record for s in samples])


def _rows(
    samples: Sequence[BenchmarkSample],
    predictions: Sequence[str],
    per_sample: Sequence[dict[str, float]],
    metric: str,
    instruction: str | None,
) -> list[dict[str, Any]]:
    rows = []
    for sample, prediction, scores in zip(samples, predictions, per_sample, strict=True):
        row = {
            "id": sample.id,
            "image": sample.record["image"],
            "question": sample.question,
            "prompt": build_question(sample, metric, instruction),
            "prediction": prediction,
            "scores": scores,
        }
        row.update({key: sample.record[key] for key in REFERENCE_FIELDS if key in sample.record})
        rows.append(row)
    return rows


def _reads_boxes(model: Any) -> bool:
    """A VIF model whose map is the ground truth (``map_source="boxes"``) needs each sample's box."""
    return _is_vif(model) and model.config_vif.map_source == "boxes"


def evidence_boxes(
    samples: Sequence[BenchmarkSample], images: Sequence[Sequence[Any]], image_aspect: str
) -> torch.Tensor:
    """``(B, 4)`` each record's ``evidence_box`` in the prepared image's fractions (NaN rows: none)."""
    rows = []
    for sample, sample_images in zip(samples, images, strict=True):
        box = sample.record.get("evidence_box")
        if box is None:
            rows.append([float("nan")] * 4)
            continue
        rows.append(box_after_padding(box, sample_images[0].size) if image_aspect == "pad" else list(box))
    return torch.tensor(rows, dtype=torch.float32)


def _is_vif(model: Any) -> bool:
    from ..model import VIFModel

    return isinstance(model, VIFModel)


def evaluate(
    model: Any,
    processor: Any,
    benchmark_file: str | Path,
    metric: str,
    output_dir: str | Path | None = None,
    *,
    compare: bool = False,
    image_folder: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    instruction: str | None = None,
    image_aspect: str = "pad",
    limit: int | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on a local benchmark file; returns (and writes) the summary.

    Args:
        model: a transformers VLM (run ``"base"``) or a :class:`vif.VIFModel` (run ``"vif"``).
        processor: its processor (chat template, image processor, tokenizer).
        benchmark_file: JSON / JSONL file, see :mod:`vif.eval.benchmark`.
        metric: ``exact_match | vqa | multiple_choice | yes_no | refcoco``.
        output_dir: where ``predictions_<run>.jsonl`` and ``summary.json`` go (None: nowhere).
        compare: also evaluate the base model (VIF disabled) in the same call; needs a VIFModel.
        image_folder: the folder image paths are relative to (default: the file's folder).
        batch_size: samples per left-padded generation batch.
        max_new_tokens: generation budget per answer.
        instruction: text appended to each question (None: the metric's default, "" none).
        image_aspect: ``"pad"`` (LLaVA-1.5, and ``vif train``'s default) | ``"resize"`` | ``"keep"``;
            use what the adapter was trained with (see :func:`vif.eval.generation.prepare_image`).
        limit: evaluate only the first ``limit`` samples.
        progress: show a tqdm bar per run.
        metadata: extra entries for the summary (e.g. model / adapter paths).

    Returns:
        ``{"benchmark", "metric", "num_samples", "settings": {...}, "runs": {run: {"scores":
        aggregate summary, "predictions_file": name or None, "seconds"}}, "delta": {key: vif - base}
        (with compare), **metadata}``.

    Raises:
        BenchmarkError: a malformed benchmark file or missing images (before any generation).
        ValueError: an unknown metric, or ``compare`` without a VIFModel.
    """
    get_metric(metric)  # unknown metric: fail before reading anything
    if image_aspect not in IMAGE_ASPECTS:
        raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
    if compare and not _is_vif(model):
        raise ValueError(
            "compare=True evaluates base and base+VIF, so it needs a VIFModel: load the model with "
            "vif.loading.load_model(path, adapter=ADAPTER_DIR) (CLI: --compare ADAPTER_DIR)."
        )
    samples = read_benchmark(benchmark_file, metric, image_folder=image_folder, limit=limit)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    runs = ["base", "vif"] if compare else ["vif" if _is_vif(model) else "base"]
    summary: dict[str, Any] = {
        "benchmark": str(benchmark_file),
        "metric": metric,
        "num_samples": len(samples),
        "settings": {
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "instruction": instruction,
            "image_aspect": image_aspect,
            "image_folder": str(image_folder) if image_folder is not None else None,
        },
        **(metadata or {}),
        "runs": {},
    }
    for run in runs:
        started = time.perf_counter()
        kwargs = dict(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            instruction=instruction,
            progress=progress,
            desc=f"{run} {Path(benchmark_file).name}",
            image_aspect=image_aspect,
        )
        if run == "base" and _is_vif(model):
            with model.disabled():
                predictions = predict(model, processor, samples, metric, **kwargs)
        else:
            predictions = predict(model, processor, samples, metric, **kwargs)
        seconds = time.perf_counter() - started
        per_sample, scores = score(samples, predictions, metric)
        file_name = None
        if out is not None:
            file_name = f"predictions_{run}.jsonl"
            rows = _rows(samples, predictions, per_sample, metric, instruction)
            with open(out / file_name, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary["runs"][run] = {"scores": scores, "predictions_file": file_name, "seconds": round(seconds, 3)}

    if compare:
        base, vif = summary["runs"]["base"]["scores"], summary["runs"]["vif"]["scores"]
        summary["delta"] = {
            key: vif[key] - base[key]
            for key in vif
            if key != "num_samples" and isinstance(vif[key], float) and isinstance(base.get(key), float)
        }
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A small text table of the runs' mean scores (what ``vif eval`` prints)."""
    runs = summary["runs"]
    keys = sorted(
        {
            k
            for run in runs.values()
            for k, v in run["scores"].items()
            if k != "num_samples" and isinstance(v, float)
        }
    )
    lines = [f"{summary['metric']} on {summary['benchmark']} ({summary['num_samples']} samples)"]
    lines.append("  ".join([f"{'run':<6}"] + [f"{k:>10}" for k in keys] + [f"{'seconds':>9}"]))
    for name, run in runs.items():
        cells = [f"{run['scores'].get(k, float('nan')):>10.4f}" for k in keys]
        lines.append("  ".join([f"{name:<6}"] + cells + [f"{run['seconds']:>9.1f}"]))
    if "delta" in summary:
        cells = [f"{summary['delta'].get(k, float('nan')):>+10.4f}" for k in keys]
        lines.append("  ".join([f"{'delta':<6}"] + cells))
    mme = [(name, run["scores"]["mme"]) for name, run in runs.items() if "mme" in run["scores"]]
    for name, block in mme:
        lines.append(
            f"{name} MME: total {block['total']:.1f}, acc {block['accuracy']:.1f}, acc+ {block['accuracy_plus']:.1f}"
        )
    return "\n".join(lines)
