"""Exact match of short answers: GQA (and any set with one or a few acceptable answers).

Two rules:

* ``exact_match`` (ours): both sides through :func:`~vif.eval.metrics.vqa.normalize_vqa`,
  so case, punctuation, articles and number words do not matter ("The two dogs." ==
  "2 dogs").
* ``lmms_gqa``: lmms-eval's GQA scorer (its ``exact_match`` with ``ignore_case`` and
  ``ignore_punctuation``): lower-case, delete every character of ``string.punctuation``,
  compare the strings as they are, so "the table" != "table" and "two" != "2".
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from .common import require
from .vqa import normalize_vqa

_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str | Sequence[str], normalize: bool = True) -> float:
    """1.0 if ``prediction`` equals ``answer`` (or any of a list of answers), else 0.0.

    With ``normalize=True`` both sides go through :func:`normalize_vqa` first (GQA /
    TextVQA-style matching: case, punctuation, articles and number words are ignored).
    With ``normalize=False`` the comparison is literal, whitespace included.

    Raises:
        ValueError: an empty list of answers.
    """
    refs = [answer] if isinstance(answer, str) else list(answer)
    if not refs:
        raise ValueError("exact_match needs at least one reference answer; got an empty list")
    if normalize:
        prediction = normalize_vqa(prediction)
        refs = [normalize_vqa(ref) for ref in refs]
    return float(prediction in refs)


def normalize_gqa_lmms(text: str) -> str:
    """lmms-eval's GQA comparison form: lower-case, every ASCII punctuation character deleted."""
    return text.lower().translate(_DELETE_PUNCTUATION)


def lmms_gqa_match(prediction: str, answer: str | Sequence[str]) -> float:
    """1.0 if ``prediction`` matches ``answer`` (or any of a list) under lmms-eval's GQA rule."""
    refs = [answer] if isinstance(answer, str) else list(answer)
    if not refs:
        raise ValueError("lmms_gqa_match needs at least one reference answer; got an empty list")
    return float(normalize_gqa_lmms(prediction) in [normalize_gqa_lmms(ref) for ref in refs])


def score_exact_match(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answer = require(
        record, "answer", "exact_match", "add the reference answer (a string or a list of acceptable answers)"
    )
    return {"accuracy": exact_match(prediction, answer)}


def score_lmms_gqa(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answer = require(record, "answer", "lmms_gqa", "add the reference answer (a string)")
    return {"accuracy": lmms_gqa_match(prediction, answer)}
