"""Local benchmark files for ``vif eval``: reading, validating, building prompts.

A benchmark file is JSON (a list of objects) or JSONL (one object per line); each
record is one question about one image::

    {"id": "q1", "image": "images/0001.png", "question": "What color is the square?",
     "answer": "red"}                                             # exact_match / vqa / yes_no
    {"id": "q2", "image": "images/0002.png", "question": "Which shape is at the top?",
     "options": ["circle", "square", "star"], "answer": "B"}      # multiple_choice
    {"id": "q3", "image": "images/0003.png", "question": "the red square",
     "bbox": [0.1, 0.2, 0.4, 0.5]}                                # refcoco

``image`` is relative to ``image_folder`` (default: the benchmark file's folder).
``question`` may also be called ``text`` (LLaVA's evaluation question files). Any
other key is kept and handed to the metric (``answer`` as a list of human answers for
``vqa``, ``question_id`` / ``category`` for MME-style ``yes_no``, ``image_size`` /
``bbox_format`` / ``coord_format`` for ``refcoco``; see :data:`vif.eval.metrics.METRICS`).

Everything is checked before any model runs: a malformed record raises
:class:`BenchmarkError` naming the file, the line (JSONL) or position (JSON list), the
sample id and the field; missing or unreadable images are all listed at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.llava_format import check_image
from .metrics import get_metric

# Appended to the question so that an instruction-tuned model answers in the form the
# metric parses. These are LLaVA-1.5's evaluation prompts (also used by lmms-eval).
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
BOX_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
    "bottom-right y). All values are normalized to numbers between 0 and 1. Please output bounding box "
    "coordinates of the region this sentence describes: "
)
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class BenchmarkError(ValueError):
    """A benchmark file, record or image that cannot be evaluated; the message says where and how to fix."""


@dataclass
class BenchmarkSample:
    """One record of a benchmark file.

    id: the record's ``id`` (or ``question_id``), else its 1-based position as a string.
    where: ``"bench.jsonl line 3"`` / ``"bench.json item 3"``, for error messages.
    image_path: the resolved image file.
    question: the question text as written in the file (no instruction added).
    record: the whole record, as the metric reads it.
    """

    id: str
    where: str
    image_path: Path
    question: str
    record: dict[str, Any] = field(repr=False)


def _parse_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs of a JSON list or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchmarkError(f"benchmark file {str(path)!r} does not exist") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise BenchmarkError(
                f"{path.name}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})"
            ) from None
        return [(f"{path.name} item {i + 1}", record) for i, record in enumerate(records)]
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs.append((f"{path.name} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise BenchmarkError(
                f"{path.name} line {number}: invalid JSON ({err.msg} at column {err.colno}); a JSONL "
                "benchmark needs one JSON object per line (or write the whole file as a JSON list)"
            ) from None
    return pairs


def _sample_id(record: dict[str, Any], position: int) -> str:
    for key in ("id", "question_id"):
        if key in record:
            return str(record[key])
    return str(position)


def _text_field(record: dict[str, Any], where: str) -> str:
    key = "question" if "question" in record else "text" if "text" in record else None
    if key is None:
        raise BenchmarkError(f"{where}: no 'question' field; every record needs the question text")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _check_answer_type(answer: Any, metric: str, where: str) -> None:
    """Answers are text (a list of texts for several acceptable ones); multiple choice also takes an index."""
    if isinstance(answer, str):
        return
    if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
        return
    if metric == "multiple_choice" and isinstance(answer, int) and not isinstance(answer, bool):
        return
    kind = {bool: "a boolean", int: "an integer", float: "a number"}.get(type(answer), type(answer).__name__)
    raise BenchmarkError(
        f"{where}: field 'answer' must be a string (or a list of strings), got {kind} {answer!r}; "
        f'write it as text, e.g. "answer": "{answer}"'
    )


def read_benchmark(
    path: str | Path, metric: str, image_folder: str | Path | None = None, limit: int | None = None
) -> list[BenchmarkSample]:
    """Read and validate a benchmark file for ``metric`` (see the module docstring).

    Args:
        path: JSON list or JSONL file.
        metric: a name in :data:`vif.eval.metrics.METRICS`; each record must carry what it reads.
        image_folder: the folder ``image`` paths are relative to (default: the file's folder).
        limit: keep only the first ``limit`` records (after validating those).

    Raises:
        BenchmarkError: an unreadable file, a malformed record (names the line/item, the
            sample and the field), or missing / unreadable images (all of them listed).
        ValueError: an unknown metric.
    """
    scorer = get_metric(metric)
    if limit is not None and limit < 1:
        raise BenchmarkError(f"limit must be a positive number of samples, got {limit}")
    path = Path(path)
    root = Path(image_folder) if image_folder is not None else path.parent
    pairs = _parse_records(path)
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise BenchmarkError(f"{path.name}: no records; a benchmark needs at least one question")

    samples = []
    for position, (where, record) in enumerate(pairs, start=1):
        if not isinstance(record, dict):
            raise BenchmarkError(f"{where}: expected a JSON object, got {type(record).__name__}")
        sample_id = _sample_id(record, position)
        where = f"{where} (sample {sample_id!r})"
        question = _text_field(record, where)
        image = record.get("image")
        if not isinstance(image, str) or not image:
            raise BenchmarkError(
                f"{where}: field 'image' must be the image file's path (relative to the image folder), "
                f"got {image!r}"
            )
        if "options" in record:
            options = record["options"]
            if (
                not isinstance(options, list)
                or len(options) < 2
                or not all(isinstance(o, str) for o in options)
            ):
                raise BenchmarkError(
                    f"{where}: field 'options' must be a list of 2 or more strings, got {options!r}"
                )
            if len(options) > len(OPTION_LETTERS):
                raise BenchmarkError(f"{where}: field 'options' has {len(options)} entries; at most 26 (A-Z)")
        if metric == "refcoco":
            bbox = record.get("bbox")
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(isinstance(v, int | float) for v in bbox)
            ):
                raise BenchmarkError(f"{where}: field 'bbox' must be a list of 4 numbers, got {bbox!r}")
        if "answer" in record:
            _check_answer_type(record["answer"], metric, where)
        # Score an empty prediction: the metric itself checks every field it reads
        # ('answer', 'options', 'bbox', ...) and says what is wrong.
        try:
            scorer("", record)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise BenchmarkError(f"{where}: not a valid {metric!r} record: {err}") from None
        samples.append(BenchmarkSample(sample_id, where, root / image, question, record))

    bad = [(s, reason) for s in samples if (reason := check_image(s.image_path)) is not None]
    if bad:
        listed = "\n".join(f"  {s.where}: {str(s.image_path)!r}: {reason}" for s, reason in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise BenchmarkError(
            f"{len(bad)} of {len(samples)} images cannot be read:\n{listed}{more}\n"
            f"Image paths are resolved relative to {str(root)!r}; pass image_folder (--image-folder) "
            "if they are relative to another folder."
        )
    return samples


def build_question(sample: BenchmarkSample, metric: str, instruction: str | None = None) -> str:
    """The text the model sees: the question, the options (A. ..., B. ...) and an instruction.

    ``instruction=None`` picks the default for the metric (:data:`SHORT_ANSWER`,
    :data:`LETTER_ANSWER`; for ``refcoco`` the question is the referring expression and
    :data:`BOX_PROMPT` goes in front of it); ``""`` adds nothing.
    """
    question = sample.question.strip()
    if metric == "refcoco":
        prefix = BOX_PROMPT if instruction is None else instruction
        return f"{prefix}{question}" if prefix else question
    lines = [question]
    options = sample.record.get("options")
    if options:
        lines += [f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)]
    if instruction is None:
        instruction = LETTER_ANSWER if options else SHORT_ANSWER
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)
