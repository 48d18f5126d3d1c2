"""Scoring a model on a TinyFind split: greedy generation + exact match.

A small stand-in used until :mod:`vif.eval` provides generation-based evaluation. Prompts are
encoded with the model's own chat template (the same encoding training used, minus the
answer), left-padded, and decoded greedily; the decoded text is compared with the reference
answer by :func:`vif.eval.metrics.exact_match` after removing spaces, because the tiny
word-level tokenizer decodes "top-left" as "top - left".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..eval.metrics import exact_match


def _prompt_items(processor: Any, records: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    from ..diagnostics.inputs import encode_pil_sample

    items = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        with Image.open(folder / record["image"]) as image:
            items.append(encode_pil_sample(processor, image.convert("RGB"), question))
    return items


def _squash(text: str) -> str:
    return "".join(text.split())


@torch.no_grad()
def score_split(
    model: torch.nn.Module,
    processor: Any,
    json_path: str | Path,
    batch_size: int = 32,
    max_new_tokens: int = 5,
    label: str = "model",
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy-decodes every question of a TinyFind split; returns accuracy overall and per type.

    Returns:
        ``{"accuracy", "n", "per_type": {type: accuracy}, "predictions": [{id, type, answer, prediction, correct}]}``.
    """
    from ..data.llava_format import VIFCollator

    json_path = Path(json_path)
    records = json.loads(json_path.read_text())
    items = _prompt_items(processor, records, json_path.parent)
    collator = VIFCollator(processor, padding_side="left")
    tokenizer = getattr(processor, "tokenizer", processor)
    device = next(model.parameters()).device
    model.eval()
    predictions = []
    bar = tqdm(total=len(records), desc=f"evaluate {label}", unit="question", disable=not progress)
    for start in range(0, len(records), batch_size):
        batch = collator(items[start : start + batch_size])
        batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for record, text in zip(records[start : start + batch_size], texts):
            answer = record["conversations"][1]["value"]
            correct = exact_match(_squash(text), _squash(answer)) == 1.0
            predictions.append(
                {
                    "id": record["id"],
                    "type": record["meta"]["type"],
                    "answer": answer,
                    "prediction": text.strip(),
                    "correct": correct,
                }
            )
        bar.update(len(texts))
    bar.close()
    per_type: dict[str, list[bool]] = {}
    for p in predictions:
        per_type.setdefault(p["type"], []).append(p["correct"])
    return {
        "accuracy": sum(p["correct"] for p in predictions) / max(len(predictions), 1),
        "n": len(predictions),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        "predictions": predictions,
    }
