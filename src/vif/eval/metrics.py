"""Scoring functions for multimodal-LLM generations (pure Python, no torch).

One function per answer style used by the benchmarks we evaluate on:

* open-ended short answers, VQAv2-style soft accuracy -- VQAv2, TextVQA
  (:func:`normalize_vqa`, :func:`vqa_soft_accuracy`);
* normalised exact match -- GQA (:func:`exact_match`);
* multiple choice -- SEED-Bench, ScienceQA, AI2D, HR-Bench, V*
  (:func:`parse_choice`, :func:`multiple_choice_accuracy`);
* yes / no with MME's paired "accuracy+" -- MME, POPE-like sets
  (:func:`parse_yes_no`, :func:`mme_scores`);
* referring-expression boxes -- RefCOCO/+/g
  (:func:`parse_box`, :func:`box_iou`, :func:`refcoco_accuracy`, :func:`xywh_to_xyxy`).

A registry, :data:`METRICS`, exposes each style as a uniform per-sample scorer
``score(prediction, record) -> dict[str, float]`` reading a benchmark JSON record, and
:func:`aggregate` turns the per-sample scores into a summary.

Conventions
-----------
* Accuracies from the per-sample scorers and :func:`aggregate` are fractions in [0, 1];
  only the MME block is in percent, because MME scores (0-200 per category) are
  defined on percentages.
* Boxes are ``(x0, y0, x1, y1)`` (top-left, bottom-right); ``image_size`` is
  ``(width, height)`` like ``PIL.Image.size``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "METRICS",
    "aggregate",
    "box_iou",
    "exact_match",
    "get_metric",
    "mme_scores",
    "multiple_choice_accuracy",
    "normalize_vqa",
    "parse_box",
    "parse_choice",
    "parse_yes_no",
    "refcoco_accuracy",
    "vqa_soft_accuracy",
    "xywh_to_xyxy",
]

Box = tuple[float, float, float, float]
CoordFormat = Literal["auto", "normalized", "pixel", "thousand"]


# =====================================================================================
# VQAv2 answer normalisation
# =====================================================================================

# Punctuation handled by the official VQA evaluation script. Deliberately absent:
# the apostrophe (it belongs to contractions such as "don't"), the colon, and the
# period, which has its own rule (see _PERIOD_TO_DROP).
_VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# A comma between digits ("1,000") is a thousands separator.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

# The official script means to drop periods that are not part of a decimal number, but
# its look-behind is mistyped, so in effect a period is dropped unless a digit follows
# it ("3.5" and ".5" survive, "dog." and "3." lose it). We reproduce the effective
# behaviour so that our numbers match the official scorer's.
_PERIOD_TO_DROP = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Apostrophe-less contractions -> canonical form, so that "dont" and "don't" agree.
# Only spellings that are not themselves English words are listed: "its", "ill",
# "well", "were", "shell", "hell", "id", "wed" and "lets" are left alone on purpose.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hes": "he's",
    "heres": "here's",
    "hows": "how's",
    "im": "i'm",
    "isnt": "isn't",
    "itll": "it'll",
    "ive": "i've",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "shant": "shan't",
    "shes": "she's",
    "shouldnt": "shouldn't",
    "shouldve": "should've",
    "thats": "that's",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "werent": "weren't",
    "weve": "we've",
    "whats": "what's",
    "whens": "when's",
    "wheres": "where's",
    "whos": "who's",
    "whys": "why's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "wouldve": "would've",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _strip_vqa_punctuation(text: str) -> str:
    """Apply the official VQA punctuation rule to ``text`` (see :func:`normalize_vqa`)."""
    # Both decisions below look at the *input* text, not at the partially processed
    # output, exactly as the official script does.
    has_thousands_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        next_to_space = (mark + " " in text) or (" " + mark in text)
        if next_to_space or has_thousands_comma:
            # "yes, it is" -> "yes it is"; "1,000" -> "1000"
            out = out.replace(mark, "")
        else:
            # A mark glued between two words separates them: "t-shirt" -> "t shirt".
            out = out.replace(mark, " ")
    return _PERIOD_TO_DROP.sub("", out)


def normalize_vqa(text: str) -> str:
    """Normalise an answer the way the official VQAv2 evaluation does.

    Rules, applied in order:

    1. Newlines and tabs become spaces; surrounding whitespace is stripped.
    2. Punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is, for each mark:
       *removed* if the mark is anywhere next to a space ("yes, it is" -> "yes it is")
       or if the text contains a digit-comma-digit ("1,000" -> "1000"); otherwise
       *replaced by a space* ("t-shirt" -> "t shirt"). Apostrophes and colons are kept.
    3. A period is removed unless a digit follows it: "dog." -> "dog", "3.5" stays.
    4. Lower-casing, then word by word: number words zero..ten and "none" become digits
       ("Two" -> "2", "none" -> "0"); the articles "a", "an", "the" are dropped;
       apostrophe-less contractions are repaired ("dont" -> "don't").
    5. Words are re-joined with single spaces (runs of whitespace collapse).

    Unlike the official script, which has a capitalised "I'm" in its contraction table,
    the output is always lower case; that cannot change a comparison because both sides
    of every comparison go through this function.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_vqa_punctuation(text)
    words = []
    for word in text.lower().split():
        # Numbers are mapped before articles are dropped, so "one" survives as "1".
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQAv2 soft accuracy of ``prediction`` against the human ``answers``.

    The official metric: for each human answer in turn, leave it out and score
    ``min(1, #remaining humans who gave the prediction / 3)``; the accuracy is the mean
    over those leave-one-out subsets. With the usual 10 answers, a prediction that 1, 2,
    3 or >= 4 humans gave scores 0.3, 0.6, 0.9 or 1.0.

    Both prediction and answers are normalised with :func:`normalize_vqa` (the official
    script only re-normalises the references when they disagree, which makes no
    difference on the already-normalised VQAv2 references).

    A single reference answer (a string or a one-element list) degenerates to exact
    match after normalisation; leave-one-out would otherwise always give 0.

    Raises:
        ValueError: ``answers`` is empty.
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer; got an empty list")
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(ref) for ref in refs]
    if len(refs) == 1:
        return float(pred == refs[0])

    num_matching = sum(ref == pred for ref in refs)
    total = 0.0
    for ref in refs:
        # Humans agreeing with the prediction once this annotator is left out.
        others_matching = num_matching - (ref == pred)
        total += min(1.0, others_matching / 3.0)
    return total / len(refs)


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


# =====================================================================================
# Multiple choice
# =====================================================================================

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The whole response is a letter, possibly bracketed / punctuated: "B", "(b)", "B.", "[C]:".
_WHOLE_LETTER = re.compile(r"^[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?$")

# An explicit cue followed by a letter: "Answer: B", "the answer is (b)", "Option C is
# correct", "The correct answer is option d.". Only the cue words are case-insensitive.
# A lower-case letter counts only when bracketed or followed by punctuation / the end,
# so that the article in "the answer is a cat" is not read as option A.
_CUED_LETTER = re.compile(
    r"\b(?i:answer|option|choice)\b\s*(?i:is\b)?\s*[:=]?\s*(?i:option|choice)?\s*"
    r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])\b|([a-z])(?=\s*[.,;:!)]|\s*$))"
)

# A bracketed letter anywhere: "(B) a cat", "I'd say (B)", "[c]". A bracketed single
# letter is hardly ever anything but an option label.
_BRACKETED_LETTER = re.compile(r"[(\[]([A-Za-z])[)\]]")

# A response that opens with an unbracketed labelled letter: "B. cat", "B) cat", "C: bird".
# It needs the delimiter and an upper-case letter, otherwise "A cat sits" would be A.
_LEADING_LETTER = re.compile(r"^([A-Z])[.:)](?=\s|$)")


def _letter_index(letter: str, num_options: int) -> int | None:
    """Index of option ``letter`` (case-insensitive), or None if out of range."""
    index = _LETTERS.index(letter.upper())
    return index if index < num_options else None


def _letters_found(pattern: re.Pattern[str], text: str, num_options: int) -> set[int]:
    """Distinct in-range option indices named by the letters ``pattern`` finds in ``text``."""
    found = set()
    for match in pattern.finditer(text):
        letter = next(group for group in match.groups() if group)
        index = _letter_index(letter, num_options)
        if index is not None:
            found.add(index)
    return found


def _parse_choice_letter(text: str, num_options: int) -> tuple[bool, int | None]:
    """Find an option letter in ``text``.

    Returns ``(decided, index)``: ``decided`` is True when the letter rules settle the
    answer (``index`` may then be None for "a lone invalid letter" or "conflicting
    letters"); False when no letter was found and option text should be tried.
    """
    whole = _WHOLE_LETTER.match(text)
    if whole:
        # The response is nothing but a letter: it is the answer even if out of range
        # ("E" with four options is wrong, not something to look for in option text).
        return True, _letter_index(whole.group(1), num_options)

    # Cued letters beat bracketed ones: "(A) cat, (B) dog; the answer is (B)" is B.
    for pattern in (_CUED_LETTER, _BRACKETED_LETTER):
        found = _letters_found(pattern, text, num_options)
        if len(found) == 1:
            return True, found.pop()
        if len(found) > 1:
            return True, None  # "the answer is A ... no, the answer is C": ambiguous

    leading = _LEADING_LETTER.match(text)
    if leading:
        index = _letter_index(leading.group(1), num_options)
        if index is not None:
            return True, index
    return False, None


def _parse_choice_text(text: str, options: Sequence[str]) -> int | None:
    """Match ``text`` against the option texts (see :func:`parse_choice`)."""
    pred = normalize_vqa(text)
    # An option that normalises to nothing (e.g. "A" or "the") can only be chosen by
    # letter; matching an empty string would match every prediction.
    opts = [normalize_vqa(option) for option in options]

    exact = [i for i, opt in enumerate(opts) if opt and opt == pred]
    if exact:
        return exact[0] if len(exact) == 1 else None

    # Whole-word containment: pad with spaces so "red" does not match inside "bored".
    padded = f" {pred} "
    mentioned = [i for i, opt in enumerate(opts) if opt and f" {opt} " in padded]
    # "dark red" mentions both "red" and "dark red"; the longer option is the one meant.
    mentioned = [
        i
        for i in mentioned
        if not any(opts[j] != opts[i] and f" {opts[i]} " in f" {opts[j]} " for j in mentioned)
    ]
    return mentioned[0] if len(mentioned) == 1 else None


def parse_choice(prediction: str, options: Sequence[str]) -> int | None:
    """Index of the option chosen in ``prediction``, or None if unparseable / ambiguous.

    Tried in order, the first rule that decides wins:

    1. The whole response is a letter: "B", "(B)", "b.", "[C]". A letter beyond the
       last option gives None.
    2. Letters after a cue word: "Answer: B", "the answer is (b)", "Option C".
       Lower-case letters count only bracketed or before punctuation / the end (so
       "the answer is a cat" is not option A). Two different cued letters give None.
    3. Bracketed letters anywhere: "(B) a cat", "I'd say (b)". Two different ones
       ("(A) or (C)") give None.
    4. A leading upper-case letter with a delimiter: "B. cat", "B) cat", "C: bird"
       (without the delimiter, "A cat." is not option A).
    5. Option text, compared after :func:`normalize_vqa`: an exact match, else the
       unique option mentioned as whole words in the prediction (an option mentioned
       only inside a longer mentioned option, "red" in "dark red", is ignored).

    Raises:
        ValueError: ``options`` is empty or has more than 26 entries.
    """
    if not options:
        raise ValueError("parse_choice needs a non-empty list of options")
    if len(options) > len(_LETTERS):
        raise ValueError(f"parse_choice supports at most {len(_LETTERS)} options (A-Z); got {len(options)}")
    text = prediction.strip()
    if not text:
        return None
    decided, index = _parse_choice_letter(text, len(options))
    if decided:
        return index
    return _parse_choice_text(text, options)


def _resolve_answer_index(answer: int | str, options: Sequence[str]) -> int:
    """The option index named by a ground-truth ``answer`` (index, letter or text).

    A single letter (optionally bracketed, "(B)", "b.") is read as a letter before it
    is compared with the option texts.
    """
    # bool is an int subclass; True as "option 1" would be a silent data bug.
    if isinstance(answer, bool) or not isinstance(answer, int | str):
        raise ValueError(f"multiple-choice answer must be an index, a letter or option text; got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < len(options):
            raise ValueError(f"answer index {answer} is out of range for {len(options)} options")
        return answer

    letter = _WHOLE_LETTER.match(answer.strip())
    if letter:
        index = _letter_index(letter.group(1), len(options))
        if index is None:
            raise ValueError(f"answer letter {answer!r} is out of range for {len(options)} options")
        return index
    target = normalize_vqa(answer)
    matches = [i for i, option in enumerate(options) if normalize_vqa(option) == target]
    if len(matches) != 1:
        raise ValueError(
            f"answer {answer!r} is not a letter and matches {len(matches)} of the options {list(options)!r}; "
            "give the answer as an index or letter"
        )
    return matches[0]


def multiple_choice_accuracy(prediction: str, options: Sequence[str], answer: int | str) -> float:
    """1.0 if the option parsed from ``prediction`` is ``answer``, else 0.0.

    ``answer`` is a 0-based index, a letter ("B", "(b)") or the option text. An
    unparseable or ambiguous prediction scores 0.0 (see :func:`parse_choice`).
    """
    target = _resolve_answer_index(answer, options)
    return float(parse_choice(prediction, options) == target)


# =====================================================================================
# Yes / no (MME)
# =====================================================================================

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


def _mme_summary(outcomes: Iterable[tuple[str, Hashable, bool]]) -> dict[str, Any]:
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


def mme_scores(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
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
    Predictions are read with :func:`parse_yes_no`; an unparseable one is wrong.

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
        correct = parse_yes_no(str(record["prediction"])) == reference
        outcomes.append((str(record["category"]), record["question_id"], correct))
    return _mme_summary(outcomes)


def _reference_yes_no(answer: Any, where: str) -> str:
    """Parse a ground-truth yes/no answer, failing loudly on anything else."""
    reference = parse_yes_no(str(answer))
    if reference is None:
        raise ValueError(f"{where}: answer {answer!r} is not 'yes' or 'no'")
    return reference


# =====================================================================================
# Referring-expression boxes (RefCOCO)
# =====================================================================================

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")

# Where a box can appear, as (pattern, numbers each group must hold). Every pattern is
# searched; the earliest match holding exactly four numbers is the box.
_BOX_PATTERNS: tuple[tuple[re.Pattern[str], tuple[int, ...]], ...] = (
    # "<box>12 34 56 78</box>", Qwen-VL "<box>(12,34),(56,78)</box>"
    (re.compile(r"<box>(.*?)</box>", re.S), (4,)),
    # Qwen2-VL "<|box_start|>(12,34),(56,78)<|box_end|>"
    (re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S), (4,)),
    # "[0.12, 0.34, 0.56, 0.78]", JSON {"bbox_2d": [123, 45, 678, 90]}
    (re.compile(r"\[([^\[\]]*)\]"), (4,)),
    # "(12,34),(56,78)", "(12, 34) to (56, 78)"
    (re.compile(r"\(([^()]*)\)\s*,?\s*(?:to|-)?\s*\(([^()]*)\)"), (2, 2)),
    # "(12, 34, 56, 78)"
    (re.compile(r"\(([^()]*)\)"), (4,)),
)

_COORD_FORMATS = ("auto", "normalized", "pixel", "thousand")


def _find_box_numbers(text: str) -> list[float] | None:
    """The four numbers of the first box-like group in ``text``, or None."""
    best: tuple[int, list[str]] | None = None
    saw_numeric_group = False
    for pattern, counts in _BOX_PATTERNS:
        for match in pattern.finditer(text):
            groups = [_NUMBER.findall(group) for group in match.groups()]
            saw_numeric_group = saw_numeric_group or any(groups)
            if tuple(len(group) for group in groups) == counts:
                if best is None or match.start() < best[0]:
                    best = (match.start(), [n for group in groups for n in group])
                break  # later matches of this pattern start later still
    if best is not None:
        return [float(n) for n in best[1]]
    if saw_numeric_group:
        return None  # e.g. "[0.1, 0.2, 0.3]": a malformed box, not a bare one
    # No delimited numbers at all: accept bare text only if it holds exactly four
    # numbers ("12 34 56 78"); anything else is too ambiguous to call a box.
    numbers = _NUMBER.findall(text)
    return [float(n) for n in numbers] if len(numbers) == 4 else None


def _check_image_size(image_size: Sequence[float] | None) -> tuple[float, float] | None:
    if image_size is None:
        return None
    if len(image_size) != 2 or not all(math.isfinite(v) and v > 0 for v in image_size):
        raise ValueError(f"image_size must be (width, height) with positive values; got {image_size!r}")
    return float(image_size[0]), float(image_size[1])


def _to_normalized(
    values: Sequence[float],
    image_size: tuple[float, float] | None,
    coord_format: str,
) -> list[float] | None:
    """Scale four raw coordinates to [0, 1] according to ``coord_format``."""
    if coord_format == "auto":
        largest = max(values)
        if largest <= 1.0:
            coord_format = "normalized"
        elif image_size is not None:
            coord_format = "pixel"
        elif largest <= 1000.0:
            coord_format = "thousand"
        else:
            return None  # pixels without an image size cannot be normalised
    if coord_format == "normalized":
        return list(values)
    if coord_format == "thousand":
        return [v / 1000.0 for v in values]
    if image_size is None:
        raise ValueError("coord_format='pixel' needs image_size=(width, height) to normalise the box")
    width, height = image_size
    return [values[0] / width, values[1] / height, values[2] / width, values[3] / height]


def parse_box(
    text: str,
    image_size: tuple[int, int] | None = None,
    coord_format: CoordFormat = "auto",
) -> Box | None:
    """Extract the first box from generated ``text`` as normalised ``(x0, y0, x1, y1)``.

    Recognised layouts (the earliest in the text wins): ``<box>12 34 56 78</box>``,
    ``<box>(12,34),(56,78)</box>``, ``<|box_start|>(12,34),(56,78)<|box_end|>``,
    ``[0.12, 0.34, 0.56, 0.78]`` (also inside JSON), ``(12,34),(56,78)``,
    ``(12, 34, 56, 78)``. A group with another count of numbers is not a box (and
    "[0.1, 0.2, 0.3]" is None). Text with no bracketed or tagged numbers at all is a
    box only if it holds exactly four numbers ("12 34 56 78").

    ``coord_format`` says what the numbers are:

    * ``"normalized"``: fractions of the image, [0, 1] (Shikra, LLaVA-1.5);
    * ``"pixel"``: absolute pixels (Qwen2.5-VL); needs ``image_size=(width, height)``;
    * ``"thousand"``: a 0-1000 grid (Qwen-VL, Qwen2-VL);
    * ``"auto"`` (default): all values <= 1 -> normalised; else pixels if
      ``image_size`` is given; else the 0-1000 grid if all values <= 1000; else None.
      Auto cannot tell pixels from the 0-1000 grid, so pass the format explicitly
      for Qwen-VL-style models when ``image_size`` is given.

    The result is clipped to [0, 1], with corners swapped if needed so that
    ``x0 <= x1`` and ``y0 <= y1``. None when no box is found or it has no area.

    Raises:
        ValueError: an unknown ``coord_format``, a bad ``image_size``, or
            ``coord_format="pixel"`` without ``image_size``.
    """
    if coord_format not in _COORD_FORMATS:
        raise ValueError(f"coord_format must be one of {_COORD_FORMATS}; got {coord_format!r}")
    size = _check_image_size(image_size)
    values = _find_box_numbers(text)
    if values is None or not all(math.isfinite(v) for v in values):
        return None
    scaled = _to_normalized(values, size, coord_format)
    if scaled is None:
        return None
    x0, x1 = sorted((min(max(scaled[0], 0.0), 1.0), min(max(scaled[2], 0.0), 1.0)))
    y0, y1 = sorted((min(max(scaled[1], 0.0), 1.0), min(max(scaled[3], 0.0), 1.0)))
    if x1 <= x0 or y1 <= y0:
        return None  # degenerate: a line or a point (possibly after clipping)
    return (x0, y0, x1, y1)


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """Convert ``(x, y, width, height)`` (COCO / RefCOCO native) to ``(x0, y0, x1, y1)``."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes in the same units.

    IoU is unchanged by scaling x and y, so normalised and pixel boxes give the same
    value. Boxes without area give 0.0.
    """
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = inter_w * inter_h
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - intersection
    return intersection / union if union > 0 else 0.0


def _normalize_gt_box(gt_box: Sequence[float], image_size: tuple[float, float] | None) -> Box:
    """Ground-truth xyxy box -> normalised xyxy (see :func:`refcoco_accuracy`)."""
    if len(gt_box) != 4 or not all(math.isfinite(float(v)) for v in gt_box):
        raise ValueError(f"gt_box must be four finite numbers (x0, y0, x1, y1); got {gt_box!r}")
    x0, y0, x1, y1 = (float(v) for v in gt_box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"gt_box {gt_box!r} is not a valid (x0, y0, x1, y1) box; if it is RefCOCO's native "
            "(x, y, width, height), convert it with xywh_to_xyxy"
        )
    if max(x0, y0, x1, y1) <= 1.0:
        return (x0, y0, x1, y1)
    if image_size is None:
        raise ValueError(
            f"gt_box {gt_box!r} is in pixels (values > 1); pass image_size=(width, height) to normalise it"
        )
    width, height = image_size
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def _refcoco_iou(
    prediction: str,
    gt_box: Sequence[float],
    image_size: tuple[int, int] | None,
    coord_format: CoordFormat,
) -> float | None:
    """IoU of the parsed prediction with ``gt_box``; None if no box was parsed."""
    size = _check_image_size(image_size)
    gt = _normalize_gt_box(gt_box, size)
    predicted = parse_box(prediction, image_size=image_size, coord_format=coord_format)
    return None if predicted is None else box_iou(predicted, gt)


def refcoco_accuracy(
    prediction: str,
    gt_box: Sequence[float],
    image_size: tuple[int, int] | None = None,
    threshold: float = 0.5,
    coord_format: CoordFormat = "auto",
) -> float:
    """1.0 if the box parsed from ``prediction`` has IoU >= ``threshold`` with ``gt_box``.

    ``gt_box`` is xyxy: normalised to [0, 1] when all its values are <= 1, otherwise in
    pixels, which requires ``image_size=(width, height)``. RefCOCO annotations are pixel
    ``(x, y, w, h)``: convert them with :func:`xywh_to_xyxy` first. The prediction is
    read by :func:`parse_box` with ``image_size`` and ``coord_format``; an unparseable
    prediction scores 0.0.
    """
    iou = _refcoco_iou(prediction, gt_box, image_size, coord_format)
    return 0.0 if iou is None else float(iou >= threshold)


# =====================================================================================
# Registry of per-sample scorers and aggregation
# =====================================================================================

Scorer = Callable[[str, Mapping[str, Any]], dict[str, float]]


def _require(record: Mapping[str, Any], key: str, metric: str, fix: str) -> Any:
    """``record[key]``, or a ValueError naming the metric, the key and how to fix it."""
    if key not in record:
        raise ValueError(f"metric {metric!r} needs record[{key!r}] but the record has none; {fix}")
    return record[key]


def _score_exact_match(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answer = _require(
        record, "answer", "exact_match", "add the reference answer (a string or a list of acceptable answers)"
    )
    return {"accuracy": exact_match(prediction, answer)}


def _score_vqa(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answers = _require(record, "answer", "vqa", "add the list of human answers (VQAv2/TextVQA have 10)")
    return {"accuracy": vqa_soft_accuracy(prediction, answers)}


def _score_multiple_choice(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    fix = "multiple-choice records need 'options' (list of option texts) and 'answer' (index, letter or text)"
    options = _require(record, "options", "multiple_choice", fix)
    answer = _require(record, "answer", "multiple_choice", fix)
    chosen = parse_choice(prediction, options)
    target = _resolve_answer_index(answer, options)
    return {"accuracy": float(chosen == target), "unparsed": float(chosen is None)}


def _score_yes_no(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answer = _require(record, "answer", "yes_no", "add the reference answer 'yes' or 'no'")
    reference = _reference_yes_no(answer, where="metric 'yes_no'")
    parsed = parse_yes_no(prediction)
    return {"accuracy": float(parsed == reference), "unparsed": float(parsed is None)}


def _score_refcoco(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    """RefCOCO scorer.

    Reads ``bbox`` (xyxy, normalised or pixels; ``bbox_format: "xywh"`` converts
    RefCOCO's native layout), optional ``image_size`` ([width, height]) and optional
    ``coord_format`` (how the model writes boxes; default "auto", see :func:`parse_box`).
    """
    bbox = _require(
        record,
        "bbox",
        "refcoco",
        "add the ground-truth box as [x0, y0, x1, y1] (normalised, or pixels with 'image_size')",
    )
    bbox_format = record.get("bbox_format", "xyxy")
    if bbox_format == "xywh":
        bbox = xywh_to_xyxy(bbox)
    elif bbox_format != "xyxy":
        raise ValueError(f"record['bbox_format'] must be 'xyxy' or 'xywh'; got {bbox_format!r}")
    image_size = record.get("image_size")
    image_size = tuple(image_size) if image_size is not None else None  # JSON gives a list
    iou = _refcoco_iou(prediction, bbox, image_size, record.get("coord_format", "auto"))
    return {
        "accuracy": float(iou is not None and iou >= 0.5),
        "iou": 0.0 if iou is None else iou,
        "unparsed": float(iou is None),
    }


METRICS: dict[str, Scorer] = {
    "exact_match": _score_exact_match,
    "vqa": _score_vqa,
    "multiple_choice": _score_multiple_choice,
    "yes_no": _score_yes_no,
    "refcoco": _score_refcoco,
}
"""Per-sample scorers ``score(prediction, record) -> dict[str, float]``.

Every scorer returns ``"accuracy"`` in [0, 1]; ``multiple_choice``, ``yes_no`` and
``refcoco`` add ``"unparsed"`` (1.0 when no answer could be read) and ``refcoco`` adds
``"iou"``. Record keys read: ``answer`` (all but refcoco; a list for ``vqa``),
``options`` (multiple_choice), ``bbox`` / ``image_size`` / ``bbox_format`` /
``coord_format`` (refcoco).
"""


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
    ``vqa``). For ``yes_no``, when every record has ``question_id`` (the image id) and
    ``category``, an ``"mme"`` entry holds :func:`mme_scores`-style statistics computed
    from the per-sample correctness; records without them (POPE-like sets) get the
    mean only.

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
        metric_name == "yes_no"
        and records
        and all("question_id" in record and "category" in record for record in records)
    ):
        summary["mme"] = _mme_summary(
            (str(record["category"]), record["question_id"], scores.get("accuracy", 0.0) >= 1.0)
            for record, scores in zip(records, per_sample_scores)
        )
    return summary
