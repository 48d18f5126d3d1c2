"""Scoring functions for multimodal-LLM generations (pure Python, no torch).

One small scorer file per benchmark family, like lmms-eval's task utils:

* :mod:`.vqa` -- open short answers, VQAv2 soft accuracy with the official normalisation
  (VQAv2, TextVQA, VizWiz): :func:`normalize_vqa`, :func:`vqa_soft_accuracy`;
* :mod:`.gqa` -- normalised exact match (GQA): :func:`exact_match`;
* :mod:`.choice` -- multiple choice (SEED-Bench, ScienceQA, AI2D, HR-Bench, V*):
  :func:`parse_choice`, :func:`multiple_choice_accuracy`;
* :mod:`.mme` -- yes / no with MME's paired "accuracy+" (MME, POPE-like sets):
  :func:`parse_yes_no`, :func:`mme_scores`;
* :mod:`.refcoco` -- referring-expression boxes (RefCOCO/+/g): :func:`parse_box`,
  :func:`box_iou`, :func:`refcoco_accuracy`, :func:`xywh_to_xyxy`;
* :mod:`.registry` -- :data:`METRICS`, each style as a uniform per-sample scorer
  ``score(prediction, record) -> dict[str, float]`` reading a benchmark JSON record,
  and :func:`aggregate`, which turns per-sample scores into a summary.

Where lmms-eval 0.7.3's scorer for a benchmark reads answers differently from ours, its
rule is offered by name (``lmms_gqa``, ``lmms_mme``, ``lmms_textvqa``; docs/eval.md).

Conventions: accuracies from the per-sample scorers and :func:`aggregate` are fractions
in [0, 1]; only the MME block is in percent, because MME scores (0-200 per category) are
defined on percentages. Boxes are ``(x0, y0, x1, y1)``; ``image_size`` is ``(width, height)``.
"""

from .choice import multiple_choice_accuracy, parse_choice
from .common import Scorer
from .gqa import exact_match, lmms_gqa_match, normalize_gqa_lmms
from .mme import mme_scores, parse_yes_no, parse_yes_no_lmms
from .refcoco import box_iou, parse_box, refcoco_accuracy, xywh_to_xyxy
from .registry import METRICS, aggregate, get_metric
from .vqa import CONTRACTIONS, normalize_textvqa_lmms, normalize_vqa, vqa_soft_accuracy

__all__ = [
    "CONTRACTIONS",
    "METRICS",
    "Scorer",
    "aggregate",
    "box_iou",
    "exact_match",
    "get_metric",
    "lmms_gqa_match",
    "mme_scores",
    "multiple_choice_accuracy",
    "normalize_gqa_lmms",
    "normalize_textvqa_lmms",
    "normalize_vqa",
    "parse_box",
    "parse_choice",
    "parse_yes_no",
    "parse_yes_no_lmms",
    "refcoco_accuracy",
    "vqa_soft_accuracy",
    "xywh_to_xyxy",
]
