"""Yes / no with MME's paired "accuracy+": MME, POPE-like sets.

Two readings of a yes/no answer:

* ``yes_no`` (ours, :func:`parse_yes_no`): the answer word must be in answer position (the
  first word, or after "answer is"); hedges ("yes or no") and anything else are unparsed.
* ``lmms_mme`` (:func:`parse_yes_no_lmms`): lmms-eval's MME reading: after lower-casing and
  deleting periods, "yes" / "no" / "y" / "n", else whichever of "yes", "no" occurs in the
  first four characters ("Nope" and "Not sure" read as no, "**Yes**" as nothing).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Literal

from .common import require

_WORDS = re.compile(r"[a-z]+")
# "Yes or no", "yes/no", "No and yes": a hedge that names both answers up front.
_YES_NO_HEDGE = re.compile(r"^\W*(yes|no)\s*(?:/|\bor\b|\band\b)\s*(yes|no)\b")
_CUED_YES_NO = re.compile(r"\banswer\s+is\s*:?\s*(yes|no)\b")


def parse_yes_no(prediction: str) -> Literal["yes", "no"] | None:
    """Read a yes/no answer from ``prediction``; None if there is none or it is hedged.

    Case-insensitive and punctuation-tolerant. The answer is the first word when that
    is "yes" or "no" ("Yes.", "NO, there is not", "**Yes**"), after an optional leading
    "Answer:"; otherwise the word after "answer is" ("The answer is no."). Hedges that
    name both ("Yes or no", "yes/no") and anything else ("Nope", "Maybe", "There is no
    dog") give None: only an answer in the expected position counts, as MME intends.
    """
    text = prediction.lower().strip()
    hedge = _YES_NO_HEDGE.match(text)
    if hedge and hedge.group(1) != hedge.group(2):
        return None
    words = _WORDS.findall(text)
    if words[:1] == ["answer"]:
        words = words[1:]
    if words and words[0] in ("yes", "no"):
        return "yes" if words[0] == "yes" else "no"
    cued = _CUED_YES_NO.search(text)
    if cued:
        return "yes" if cued.group(1) == "yes" else "no"
    return None


def parse_yes_no_lmms(prediction: str) -> Literal["yes", "no"] | None:
    """lmms-eval's MME reading of ``prediction`` ("other" there is None here).

    Lower-cased, stripped and with every "." deleted: "yes" / "no" as they are, "y" / "n"
    alone; otherwise "yes" if it occurs in the first four characters, else "no" if that
    does ("Nope" -> no, "Not sure" -> no, "Yes or no" -> yes, "**Yes**" -> None).
    """
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return "yes" if text == "yes" else "no"
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text)
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return None


def mme_summary(outcomes: Iterable[tuple[str, Hashable, bool]]) -> dict[str, Any]:
    """MME statistics from ``(category, image_id, correct)`` triples (see :func:`mme_scores`)."""
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[Hashable, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for category, image_id, correct in outcomes:
        questions[category].append(bool(correct))
        images[category][image_id].append(bool(correct))

    per_category: dict[str, dict[str, float]] = {}
    for category in sorted(questions):
        image_results = [all(results) for results in images[category].values()]
        accuracy = 100.0 * sum(questions[category]) / len(questions[category])
        accuracy_plus = 100.0 * sum(image_results) / len(image_results)
        per_category[category] = {
            "accuracy": accuracy,
            "accuracy_plus": accuracy_plus,
            "score": accuracy + accuracy_plus,
            "num_questions": float(len(questions[category])),
            "num_images": float(len(image_results)),
        }

    all_questions = [c for results in questions.values() for c in results]
    all_images = [all(results) for per_image in images.values() for results in per_image.values()]
    return {
        "per_category": per_category,
        # MME reports the sum of the category scores (perception max 2000, cognition 800).
        "total": sum(stats["score"] for stats in per_category.values()),
        "accuracy": 100.0 * sum(all_questions) / len(all_questions) if all_questions else 0.0,
        "accuracy_plus": 100.0 * sum(all_images) / len(all_images) if all_images else 0.0,
    }


def mme_scores(
    records: Iterable[Mapping[str, Any]], parse: Callable[[str], str | None] = parse_yes_no
) -> dict[str, Any]:
    """MME scores from records with ``question_id``, ``category``, ``prediction``, ``answer``.

    ``question_id`` identifies the *image*: MME asks two questions per image (one
    whose answer is yes, one no), and both records carry the same id. Per category:

    * ``accuracy``: percent of questions answered correctly;
    * ``accuracy_plus``: percent of images whose questions are *all* correct (both of
      the pair, in complete MME data);
    * ``score = accuracy + accuracy_plus`` (0-200);
    * ``num_questions``, ``num_images``.

    Returns ``{"per_category": {category: stats}, "total": sum of category scores,
    "accuracy": overall question accuracy %, "accuracy_plus": overall image accuracy+ %}``.
    Predictions are read with ``parse`` (:func:`parse_yes_no`, or :func:`parse_yes_no_lmms`
    for lmms-eval's reading); an unparseable one is wrong.

    Raises:
        ValueError: a record lacks a key, or its ``answer`` is not yes/no.
    """
    outcomes = []
    for position, record in enumerate(records):
        for key in ("question_id", "category", "prediction", "answer"):
            if key not in record:
                raise ValueError(
                    f"mme_scores: record {position} has no {key!r}; every record needs "
                    "'question_id' (the image id, shared by its two questions), 'category', "
                    "'prediction' and 'answer'"
                )
        reference = _reference_yes_no(record["answer"], where=f"mme_scores: record {position}")
        correct = parse(str(record["prediction"])) == reference
        outcomes.append((str(record["category"]), record["question_id"], correct))
    return mme_summary(outcomes)


def _reference_yes_no(answer: Any, where: str) -> str:
    """Parse a ground-truth yes/no answer, failing loudly on anything else."""
    reference = parse_yes_no(str(answer))
    if reference is None:
        raise ValueError(f"{where}: answer {answer!r} is not 'yes' or 'no'")
    return reference


def score_yes_no(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answer = require(record, "answer", "yes_no", "add the reference answer 'yes' or 'no'")
    reference = _reference_yes_no(answer, where="metric 'yes_no'")
    parsed = parse_yes_no(prediction)
    return {"accuracy": float(parsed == reference), "unparsed": float(parsed is None)}


def score_lmms_mme(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answer = require(record, "answer", "lmms_mme", "add the reference answer 'yes' or 'no'")
    reference = _reference_yes_no(answer, where="metric 'lmms_mme'")
    parsed = parse_yes_no_lmms(prediction)
    return {"accuracy": float(parsed == reference), "unparsed": float(parsed is None)}
