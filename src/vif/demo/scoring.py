"""Scoring a model on a TinyFind split with :func:`vif.eval.evaluate` (greedy generation, exact match).

TinyFind's split files are LLaVA-format training data; ``vif eval`` reads benchmark files
(``{"id", "image", "question", "answer"}``). :func:`write_benchmark` converts one into the other,
and :func:`score_split` evaluates and adds per-question-type accuracy (TinyFind's ``meta.type``).
The question is asked exactly as in training: no answer-format instruction is appended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_benchmark(split_json: Path, out_path: Path) -> Path:
    """A ``vif eval`` benchmark file (JSON list) with the questions and answers of a TinyFind split."""
    records = json.loads(split_json.read_text())
    rows = [
        {
            "id": r["id"],
            "image": r["image"],
            "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
            "answer": r["conversations"][1]["value"],
            "type": r["meta"]["type"],
            "evidence_box": r["evidence_box"],
        }
        for r in records
    ]
    out_path.write_text(json.dumps(rows, indent=1) + "\n")
    return out_path


def score_split(
    model: torch.nn.Module,
    processor: Any,
    split_json: Path,
    out_dir: Path,
    batch_size: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates ``model`` on a TinyFind split; predictions and summary go to ``out_dir``.

    Returns:
        ``{"accuracy", "n", "per_type": {type: accuracy}, "predictions": [{id, type, answer,
        prediction, correct}]}``.
    """
    from ..eval import evaluate

    out_dir.mkdir(parents=True, exist_ok=True)
    # The benchmark file sits next to the split so that its relative image paths resolve.
    bench = write_benchmark(split_json, split_json.with_name(split_json.stem + "_benchmark.json"))
    summary = evaluate(
        model,
        processor,
        bench,
        "exact_match",
        output_dir=out_dir,
        batch_size=batch_size,
        max_new_tokens=5,  # the longest answer, "bottom - right </s>", is 4 tokens
        instruction="",
        progress=progress,
    )
    (run,) = summary["runs"].values()
    types = {r["id"]: r["type"] for r in json.loads(bench.read_text())}
    predictions = []
    with open(out_dir / run["predictions_file"], encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            predictions.append(
                {
                    "id": row["id"],
                    "type": types[row["id"]],
                    "answer": row["answer"],
                    "prediction": row["prediction"],
                    "correct": row["scores"]["accuracy"] == 1.0,
                }
            )
    per_type: dict[str, list[bool]] = {}
    for p in predictions:
        per_type.setdefault(p["type"], []).append(p["correct"])
    return {
        "accuracy": run["scores"]["accuracy"],
        "n": len(predictions),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        "predictions": predictions,
    }
