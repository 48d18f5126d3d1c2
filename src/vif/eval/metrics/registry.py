"""Every scorer by name (:data:`METRICS`), and :func:`aggregate` over a benchmark."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .choice import score_multiple_choice
from .common import Scorer
from .gqa import score_exact_match, score_lmms_gqa
from .mme import mme_summary, score_lmms_mme, score_yes_no
from .refcoco import score_refcoco
from .vqa import score_lmms_textvqa, score_vqa

METRICS: dict[str, Scorer] = {
    "exact_match": score_exact_match,
    "vqa": score_vqa,
    "multiple_choice": score_multiple_choice,
    "yes_no": score_yes_no,
    "refcoco": score_refcoco,
    # lmms-eval's rules where ours differ, so numbers compare with lmms-eval's (docs/eval.md).
    "lmms_gqa": score_lmms_gqa,
    "lmms_mme": score_lmms_mme,
    "lmms_textvqa": score_lmms_textvqa,
}
"""Per-sample scorers ``score(prediction, record) -> dict[str, float]``.

Every scorer returns ``"accuracy"`` in [0, 1]; ``multiple_choice``, ``yes_no``,
``lmms_mme`` and ``refcoco`` add ``"unparsed"`` (1.0 when no answer could be read) and
``refcoco`` adds ``"iou"``. Record keys read: ``answer`` (all but refcoco; a list for
``vqa`` / ``lmms_textvqa``), ``options`` (multiple_choice), ``bbox`` / ``image_size`` /
``bbox_format`` / ``coord_format`` (refcoco).
"""

# Metrics whose records may carry MME's image ids and categories.
_MME_STYLE = ("yes_no", "lmms_mme")


def get_metric(name: str) -> Scorer:
    """The scorer registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None


def aggregate(
    metric_name: str,
    per_sample_scores: Sequence[Mapping[str, float]],
    records: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Summarise per-sample scores of ``metric_name`` over a benchmark.

    Returns ``{"num_samples": n, <key>: mean over samples, ...}`` for every key the
    scorer produced (so ``"accuracy"`` is the mean accuracy, the mean soft accuracy for
    ``vqa``). For ``yes_no`` and ``lmms_mme``, when every record has ``question_id`` (the
    image id) and ``category``, an ``"mme"`` entry holds :func:`mme_scores`-style
    statistics computed from the per-sample correctness; records without them
    (POPE-like sets) get the mean only.

    Raises:
        ValueError: unknown metric, or scores and records of different lengths.
    """
    get_metric(metric_name)  # validates the name
    if len(per_sample_scores) != len(records):
        raise ValueError(
            f"aggregate: {len(per_sample_scores)} per-sample scores but {len(records)} records; "
            "pass the records in the same order as the scores"
        )
    summary: dict[str, Any] = {"num_samples": len(per_sample_scores)}
    keys = sorted({key for scores in per_sample_scores for key in scores})
    for key in keys:
        values = [scores[key] for scores in per_sample_scores if key in scores]
        summary[key] = sum(values) / len(values)

    if (
        metric_name in _MME_STYLE
        and records
        and all("question_id" in record and "category" in record for record in records)
    ):
        summary["mme"] = mme_summary(
            (str(record["category"]), record["question_id"], scores.get("accuracy", 0.0) >= 1.0)
            for record, scores in zip(records, per_sample_scores)
        )
    return summary
