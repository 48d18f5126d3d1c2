"""Multiple choice: SEED-Bench, ScienceQA, AI2D, HR-Bench, V*.

:func:`parse_choice` reads the chosen option from a free-form answer (a letter in any of
the usual forms, markdown bold, a cue phrase, or the option's text); ``multiple_choice``
scores it against the record's answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .common import require
from .vqa import normalize_vqa

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The whole response is a letter, possibly bracketed / punctuated: "B", "(b)", "B.", "[C]:".
_WHOLE_LETTER = re.compile(r"^[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?$")

# Markdown emphasis around an answer: "**B**", "*B*", "__B. dog__".
_EMPHASIS = re.compile(r"\*+|__")

# An explicit cue followed by a letter: "Answer: B", "the answer is (b)", "Option C is
# correct", "The correct answer is option d.", "I choose B". Only the cue words are
# case-insensitive. A lower-case letter counts only when bracketed or followed by
# punctuation / the end, so that the article in "the answer is a cat" is not option A.
_CUED_LETTER = re.compile(
    r"\b(?i:answer|option|choice|choose|chose|select|selected|pick|picked)\b\s*(?i:is\b)?\s*[:=]?\s*"
    r"(?i:option|choice)?\s*(?:[(\[]([A-Za-z])[)\]]|([A-Z])\b|([a-z])(?=\s*[.,;:!)]|\s*$))"
)

# A letter followed by a verdict: "B is correct.", "(c) is the right answer", "D is the best option".
_LETTER_IS_CORRECT = re.compile(
    r"(?:[(\[]([A-Za-z])[)\]]|\b([A-Z]))(?=\s+(?i:is\s+(?:the\s+)?(?:correct|right|best))\b)"
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
    cued = _letters_found(_CUED_LETTER, text, num_options) | _letters_found(
        _LETTER_IS_CORRECT, text, num_options
    )
    for found in (cued, _letters_found(_BRACKETED_LETTER, text, num_options)):
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

    Markdown emphasis is removed first ("**B**" reads as "B", "**B. dog**" as "B. dog").
    Then, tried in order, the first rule that decides wins:

    1. The whole response is a letter: "B", "(B)", "b.", "[C]". A letter beyond the
       last option gives None.
    2. Cued letters: after a cue word ("Answer: B", "the answer is (b)", "Option C",
       "I choose B", "I'd pick (c)") or before a verdict ("B is correct.", "(c) is the
       right answer"). Lower-case letters count only bracketed or before punctuation /
       the end (so "the answer is a cat" is not option A). Two different cued letters
       give None.
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
    text = _EMPHASIS.sub("", prediction).strip()
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


def score_multiple_choice(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    fix = "multiple-choice records need 'options' (list of option texts) and 'answer' (index, letter or text)"
    options = require(record, "options", "multiple_choice", fix)
    answer = require(record, "answer", "multiple_choice", fix)
    chosen = parse_choice(prediction, options)
    target = _resolve_answer_index(answer, options)
    return {"accuracy": float(chosen == target), "unparsed": float(chosen is None)}
