"""Open short answers, VQAv2-style soft accuracy: VQAv2, TextVQA, VizWiz.

:func:`normalize_vqa` is the official VQA evaluation's answer normalisation, rule for rule
and with its contraction table entry for entry (the one lmms-eval's ``EvalAIAnswerProcessor``
copies), so ``vqa`` scores equal lmms-eval's ``vqav2`` scores. lmms-eval's TextVQA scorer
tokenises first (``lmms_textvqa``, :func:`normalize_textvqa_lmms`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .common import require

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

# Digits around one or more commas ("1,000", "1,,000") make every mark be removed.
_DIGIT_COMMAS_DIGIT = re.compile(r"\d,+\d")

# The official script means to drop periods that are not part of a decimal number, but
# its look-behind is mistyped, so in effect a period is dropped unless a digit follows
# it ("3.5" and ".5" survive, "dog." and "3." lose it). It also passes re.UNICODE (32)
# where re.sub takes its count, so at most 32 periods go. Both reproduced.
_PERIOD_TO_DROP = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32

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

# The official table, entry for entry (its oddities included): the capitalised keys
# ("Im", "Ive", "Id've", "I'dve") never match the lower-cased words, so "im" stays "im";
# "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _strip_vqa_punctuation(text: str) -> str:
    """Apply the official VQA punctuation rule to ``text`` (see :func:`normalize_vqa`)."""
    # Both decisions below look at the *input* text, not at the partially processed
    # output, exactly as the official script does.
    has_thousands_comma = _DIGIT_COMMAS_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        next_to_space = (mark + " " in text) or (" " + mark in text)
        if next_to_space or has_thousands_comma:
            # "yes, it is" -> "yes it is"; "1,000" -> "1000"
            out = out.replace(mark, "")
        else:
            # A mark glued between two words separates them: "t-shirt" -> "t shirt".
            out = out.replace(mark, " ")
    return _PERIOD_TO_DROP.sub("", out, count=_PERIOD_COUNT)


def normalize_vqa(text: str) -> str:
    """Normalise an answer the way the official VQAv2 evaluation does.

    Rules, applied in order:

    1. Newlines and tabs become spaces; surrounding whitespace is stripped.
    2. Punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is, for each mark:
       *removed* if the mark is anywhere next to a space ("yes, it is" -> "yes it is")
       or if the text has digits around one or more commas (``\\d,+\\d``: "1,000" ->
       "1000", "1,,000" -> "1000"); otherwise *replaced by a space* ("t-shirt" ->
       "t shirt"). Apostrophes and colons are kept.
    3. A period is removed unless a digit follows it: "dog." -> "dog", "3.5" stays
       (the first 32 such periods, as in the official script).
    4. Lower-casing, then word by word: number words zero..ten and "none" become digits
       ("Two" -> "2", "none" -> "0"); the articles "a", "an", "the" are dropped;
       contractions are repaired by the official table (:data:`CONTRACTIONS`: "dont" ->
       "don't", "oclock" -> "o'clock"; "im" and "its" stay as they are).
    5. Words are re-joined with single spaces (runs of whitespace collapse).
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_vqa_punctuation(text)
    words = []
    for word in text.lower().split():
        # Numbers are mapped before articles are dropped, so "one" survives as "1".
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_textvqa_lmms(text: str) -> str:
    """lmms-eval's TextVQA normalisation: a tokenisation step, then :func:`normalize_vqa`.

    The tokenisation (from the EvalAI answer processor lmms-eval uses) lower-cases, deletes
    every "," and "?" and splits off "'s" ("man's" -> "man 's"), so "1,000" and "t,shirt"
    lose their commas before the punctuation rule sees them.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa(text)


def vqa_soft_accuracy(
    prediction: str, answers: str | Sequence[str], normalize: Callable[[str], str] = normalize_vqa
) -> float:
    """VQAv2 soft accuracy of ``prediction`` against the human ``answers``.

    The official metric: for each human answer in turn, leave it out and score
    ``min(1, #remaining humans who gave the prediction / 3)``; the accuracy is the mean
    over those leave-one-out subsets. With the usual 10 answers, a prediction that 1, 2,
    3 or >= 4 humans gave scores 0.3, 0.6, 0.9 or 1.0.

    Both prediction and answers are normalised with ``normalize`` (:func:`normalize_vqa`
    by default; the official script only re-normalises the references when they disagree,
    which makes no difference on the already-normalised VQAv2 references).

    A single reference answer (a string or a one-element list) degenerates to exact
    match after normalisation; leave-one-out would otherwise always give 0.

    Raises:
        ValueError: ``answers`` is empty.
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer; got an empty list")
    pred = normalize(prediction)
    refs = [normalize(ref) for ref in refs]
    if len(refs) == 1:
        return float(pred == refs[0])

    num_matching = sum(ref == pred for ref in refs)
    total = 0.0
    for ref in refs:
        # Humans agreeing with the prediction once this annotator is left out.
        others_matching = num_matching - (ref == pred)
        total += min(1.0, others_matching / 3.0)
    return total / len(refs)


def score_vqa(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answers = require(record, "answer", "vqa", "add the list of human answers (VQAv2/TextVQA have 10)")
    return {"accuracy": vqa_soft_accuracy(prediction, answers)}


def score_lmms_textvqa(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    answers = require(record, "answer", "lmms_textvqa", "add the list of human answers (TextVQA has 10)")
    return {"accuracy": vqa_soft_accuracy(prediction, answers, normalize=normalize_textvqa_lmms)}
