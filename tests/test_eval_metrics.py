"""Hand-made cases for `vif.eval.metrics` (pure Python, fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vif.eval.metrics import (
    CONTRACTIONS,
    METRICS,
    aggregate,
    box_iou,
    exact_match,
    get_metric,
    lmms_gqa_match,
    mme_scores,
    multiple_choice_accuracy,
    normalize_textvqa_lmms,
    normalize_vqa,
    parse_box,
    parse_choice,
    parse_yes_no,
    parse_yes_no_lmms,
    refcoco_accuracy,
    vqa_soft_accuracy,
    xywh_to_xyxy,
)

# -------------------------------------------------------------------------------------
# VQAv2 normalisation
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("one dog", "1 dog"),
        ("the dog.", "dog"),
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("3.5", "3.5"),
        ("3.", "3"),
        ("1,000", "1000"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("isnt", "isn't"),
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("  red    and   white  ", "red and white"),
        ("line\nbreak\ttab", "line break tab"),
        ("yes, it is", "yes it is"),  # comma next to a space: removed
        ("t-shirt", "t shirt"),  # glued punctuation: becomes a space
        ("black - white", "black white"),  # spaced punctuation: removed
        ("what?", "what"),
        ("its", "its"),  # a real word, not a contraction to repair
        ("", ""),
        # Corner cases, checked by hand against the official VQA evaluation script's rules.
        (".5", ".5"),  # a period before a digit is part of a number
        ("3.5.", "3.5"),  # ... a trailing one is not
        ("1,000 dogs, 3 cats", "1000 dogs 3 cats"),  # a thousands comma: ALL marks are removed
        ("Isn't it?", "isn't it"),  # apostrophes are kept
        ("12:30", "12:30"),  # colons are kept
        ("100%", "100%"),  # "%" and "&" are not in the punctuation list
        ("fish & chips", "fish & chips"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("A", ""),  # nothing but an article
        ("The the", ""),
        ("hes", "he's"),
        ("well", "well"),  # a word, not "we'll"
        ("@home", "home"),  # glued mark -> space, then whitespace collapses
        ("2 + 2", "2 2"),  # spaced mark -> removed
        ("co-op, inc.", "co op inc"),  # each mark decided on its own: "-" glued, "," spaced
        ("Mr. Smith", "mr smith"),
        ("U.S.A.", "usa"),
        ('"quoted"', "quoted"),
        ("yes!!!", "yes"),
    ],
)
def test_normalize_vqa(raw: str, expected: str) -> None:
    assert normalize_vqa(raw) == expected


@pytest.mark.parametrize(("word", "expected"), sorted(CONTRACTIONS.items()))
def test_official_contraction_table(word: str, expected: str) -> None:
    # The official table's capitalised keys ("Im", "Ive", ...) never match the lower-cased
    # words, so those words come out lower-cased and unmapped, as in the official scorer.
    assert normalize_vqa(word) == (expected if word == word.lower() else word.lower())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("oclock", "o'clock"),  # official entries ours lacked
        ("hed", "he'd"),
        ("whatll", "what'll"),
        ("Im", "im"),  # entries ours had that the official table does not map
        ("ive", "ive"),
        ("heres", "heres"),
        ("shes", "shes"),
        ("1,,000", "1000"),  # the digit-comma rule is \d,+\d
        ("1,,000 dogs, 3 cats", "1000 dogs 3 cats"),
        ("yes" + "." * 40, "yes" + "." * 8),  # the official script drops at most 32 periods
    ],
)
def test_normalize_vqa_official_rules(raw: str, expected: str) -> None:
    assert normalize_vqa(raw) == expected
    assert len(CONTRACTIONS) == 120


def test_normalize_vqa_is_idempotent() -> None:
    for text in ["The Two dogs.", "1,000 people", "dont know", "t-shirt, 3.5"]:
        once = normalize_vqa(text)
        assert normalize_vqa(once) == once


# -------------------------------------------------------------------------------------
# VQAv2 soft accuracy
# -------------------------------------------------------------------------------------


def _answers(num_agreeing: int) -> list[str]:
    return ["cat"] * num_agreeing + ["dog"] * (10 - num_agreeing)


@pytest.mark.parametrize(
    ("num_agreeing", "expected"),
    [
        # Leave-one-out over 10 annotators with k agreeing: k subsets see k-1 matches,
        # 10-k subsets see k matches; acc = [k*min(1,(k-1)/3) + (10-k)*min(1,k/3)] / 10.
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_vqa_soft_accuracy_leave_one_out(num_agreeing: int, expected: float) -> None:
    assert vqa_soft_accuracy("cat", _answers(num_agreeing)) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalises_both_sides() -> None:
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_soft_accuracy("Two.", answers) == pytest.approx(0.9)


def test_vqa_soft_accuracy_single_reference_is_exact_match() -> None:
    assert vqa_soft_accuracy("The dog.", ["dog"]) == 1.0
    assert vqa_soft_accuracy("The dog.", "dog") == 1.0
    assert vqa_soft_accuracy("cat", ["dog"]) == 0.0


def test_vqa_soft_accuracy_rejects_empty_answers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        vqa_soft_accuracy("dog", [])


# -------------------------------------------------------------------------------------
# Exact match
# -------------------------------------------------------------------------------------


def test_exact_match() -> None:
    assert exact_match("The Dog.", "dog") == 1.0
    assert exact_match("dog", "cat") == 0.0
    assert exact_match("two", ["3", "2"]) == 1.0
    assert exact_match("Dog", "dog", normalize=False) == 0.0
    assert exact_match("dog", ["dog"], normalize=False) == 1.0
    with pytest.raises(ValueError):
        exact_match("dog", [])


# -------------------------------------------------------------------------------------
# Multiple choice
# -------------------------------------------------------------------------------------

OPTIONS = ["cat", "dog", "bird", "dark red"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", 1),
        ("b", 1),
        ("(B)", 1),
        ("B.", 1),
        ("[C]", 2),
        ("Answer: B", 1),
        ("the answer is b", 1),
        ("The answer is (c).", 2),
        ("The correct answer is option D because it is red.", 3),
        ("B. dog", 1),
        ("(A) cat", 0),
        ("C) bird", 2),
        ("I'd say (b), the dog", 1),
        ("(A) cat or (B) dog? The answer is (B).", 1),  # cued beats bracketed
        ("dog", 1),
        ("The Dog.", 1),
        ("I think it is a bird sitting there.", 2),
        ("It is dark red.", 3),  # "red" is not an option; "dark red" is
        ("the answer is a cat", 0),  # lower-case article "a" is not option A
        ("A cat.", 0),  # leading "A" without delimiter is text, not a letter
        ("**B**", 1),  # markdown bold
        ("**B. dog**", 1),
        ("The answer is **C**.", 2),
        ("I choose B", 1),
        ("I'd pick (c) here", 2),
        ("B is correct.", 1),
        ("(d) is the right answer", 3),
        ("Option A is correct", 0),  # cue and verdict agree
    ],
)
def test_parse_choice_parses(prediction: str, expected: int) -> None:
    assert parse_choice(prediction, OPTIONS) == expected


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        "   ",
        "I am not sure.",
        "E",  # a lone letter beyond the options
        "either a cat or a dog",  # two options mentioned
        "The answer is A. No wait, the answer is C.",  # conflicting cued letters
        "A or B",
        "(A) or (C)",  # two bracketed letters
        "Answers: horse",  # "answers" is not the cue "answer"; no option mentioned
        "I choose B. No, D is correct.",  # conflicting cued letters
        "I choose a cat and a dog",  # lower-case article after a cue is no letter
    ],
)
def test_parse_choice_unparseable_or_ambiguous(prediction: str) -> None:
    assert parse_choice(prediction, OPTIONS) is None


def test_parse_choice_longest_option_wins() -> None:
    assert parse_choice("it is dark red", ["red", "dark red"]) == 1
    assert parse_choice("red", ["red", "dark red"]) == 0


def test_parse_choice_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        parse_choice("A", [])


@pytest.mark.parametrize("answer", [1, "B", "b", "(B)", "dog", "Dog"])
def test_multiple_choice_accuracy_answer_forms(answer: int | str) -> None:
    assert multiple_choice_accuracy("The answer is B.", OPTIONS, answer) == 1.0
    assert multiple_choice_accuracy("cat", OPTIONS, answer) == 0.0


def test_multiple_choice_accuracy_bad_answer() -> None:
    assert multiple_choice_accuracy("gibberish", OPTIONS, 0) == 0.0
    with pytest.raises(ValueError, match="out of range"):
        multiple_choice_accuracy("A", OPTIONS, 7)
    with pytest.raises(ValueError, match="out of range"):
        multiple_choice_accuracy("A", OPTIONS, "F")
    with pytest.raises(ValueError, match="matches 0"):
        multiple_choice_accuracy("A", OPTIONS, "horse")
    with pytest.raises(ValueError):
        multiple_choice_accuracy("A", OPTIONS, True)


# -------------------------------------------------------------------------------------
# Yes / no and MME
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("YES!", "yes"),
        ("No", "no"),
        ("no, there is no dog.", "no"),
        ("Yes, no doubt.", "yes"),
        ("**Yes**", "yes"),
        ("  No.\n", "no"),
        ("Answer: No", "no"),
        ("The answer is yes.", "yes"),
        ("Yes or no", None),
        ("yes/no", None),
        ("Nope", None),
        ("yesterday", None),
        ("Maybe.", None),
        ("There is no dog.", None),  # "no" not in answer position
        ("", None),
    ],
)
def test_parse_yes_no(prediction: str, expected: str | None) -> None:
    assert parse_yes_no(prediction) == expected


def _mme_record(image: str, category: str, prediction: str, answer: str) -> dict[str, str]:
    return {"question_id": image, "category": category, "prediction": prediction, "answer": answer}


MME_RECORDS = [
    # color: image 1 both right, image 2 one right -> acc 75, acc+ 50
    _mme_record("c1.jpg", "color", "Yes", "Yes"),
    _mme_record("c1.jpg", "color", "No.", "No"),
    _mme_record("c2.jpg", "color", "Yes", "Yes"),
    _mme_record("c2.jpg", "color", "Yes", "No"),
    # count: image 1 both right -> acc 100, acc+ 100; image 2 unparseable + right -> 50, 0
    _mme_record("n1.jpg", "count", "yes", "Yes"),
    _mme_record("n1.jpg", "count", "no", "No"),
    _mme_record("n2.jpg", "count", "I cannot tell", "Yes"),
    _mme_record("n2.jpg", "count", "No", "No"),
]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Y", "yes"),
        ("n", "no"),
        ("Nope", "no"),  # "no" in the first four characters
        ("Not sure", "no"),
        ("Yes or no", "yes"),
        ("**Yes**", None),  # "**ye": neither word in the first four characters
        ("There is no dog.", None),
        ("x", None),
        ("", None),
    ],
)
def test_parse_yes_no_lmms(prediction: str, expected: str | None) -> None:
    assert parse_yes_no_lmms(prediction) == expected


def test_mme_scores_accuracy_plus_requires_both() -> None:
    result = mme_scores(MME_RECORDS)
    color = result["per_category"]["color"]
    assert color["accuracy"] == pytest.approx(75.0)
    assert color["accuracy_plus"] == pytest.approx(50.0)
    assert color["score"] == pytest.approx(125.0)
    assert color["num_questions"] == 4 and color["num_images"] == 2
    count = result["per_category"]["count"]
    assert count["accuracy"] == pytest.approx(75.0)
    assert count["accuracy_plus"] == pytest.approx(50.0)
    assert result["total"] == pytest.approx(250.0)
    assert result["accuracy"] == pytest.approx(75.0)
    assert result["accuracy_plus"] == pytest.approx(50.0)


def test_mme_scores_errors() -> None:
    with pytest.raises(ValueError, match="'category'"):
        mme_scores([{"question_id": "x", "prediction": "yes", "answer": "yes"}])
    with pytest.raises(ValueError, match="not 'yes' or 'no'"):
        mme_scores([_mme_record("x", "c", "yes", "maybe")])


# -------------------------------------------------------------------------------------
# Boxes
# -------------------------------------------------------------------------------------


def _approx_box(box: tuple[float, ...] | None) -> object:
    return pytest.approx(box) if box is not None else None


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("[0.12, 0.34, 0.56, 0.78]", {}, (0.12, 0.34, 0.56, 0.78)),
        ("The dog is at [0.1,0.2,0.3,0.4].", {}, (0.1, 0.2, 0.3, 0.4)),
        ("(100,200),(300,400)", {"image_size": (1000, 500)}, (0.1, 0.4, 0.3, 0.8)),
        ("(100, 200) to (300, 400)", {"image_size": (1000, 500)}, (0.1, 0.4, 0.3, 0.8)),
        ("<box>100 200 300 400</box>", {"image_size": (1000, 500)}, (0.1, 0.4, 0.3, 0.8)),
        ("<ref>dog</ref><box>(123,45),(678,900)</box>", {}, (0.123, 0.045, 0.678, 0.9)),
        ("<|box_start|>(100,200),(300,400)<|box_end|>", {"coord_format": "thousand"}, (0.1, 0.2, 0.3, 0.4)),
        # Qwen2.5-VL style absolute pixels in JSON
        (
            '{"bbox_2d": [50, 25, 150, 75], "label": "dog"}',
            {"image_size": (200, 100)},
            (0.25, 0.25, 0.75, 0.75),
        ),
        ("[50, 25, 150, 75]", {"image_size": (200, 100), "coord_format": "pixel"}, (0.25, 0.25, 0.75, 0.75)),
        # auto without image size and values <= 1000: the 0-1000 grid
        ("[123, 45, 678, 90]", {}, (0.123, 0.045, 0.678, 0.09)),
        ("(0.1, 0.2, 0.3, 0.4)", {}, (0.1, 0.2, 0.3, 0.4)),
        ("12 34 56 78", {"coord_format": "thousand"}, (0.012, 0.034, 0.056, 0.078)),
        # swapped corners are put in order
        ("[0.56, 0.78, 0.12, 0.34]", {}, (0.12, 0.34, 0.56, 0.78)),
        # out-of-image coordinates are clipped
        ("[-10, 20, 250, 80]", {"image_size": (200, 100)}, (0.0, 0.2, 1.0, 0.8)),
        # the first box wins
        ("[0.1, 0.1, 0.2, 0.2] and [0.5, 0.5, 0.9, 0.9]", {}, (0.1, 0.1, 0.2, 0.2)),
        # space-separated numbers inside brackets
        ("[0.1 0.2 0.3 0.4]", {}, (0.1, 0.2, 0.3, 0.4)),
        # a malformed group does not hide a well-formed box after it
        ("[0.1, 0.2] then [0.5, 0.5, 0.6, 0.6]", {}, (0.5, 0.5, 0.6, 0.6)),
    ],
)
def test_parse_box_formats(text: str, kwargs: dict, expected: tuple[float, ...]) -> None:
    assert parse_box(text, **kwargs) == _approx_box(expected)


@pytest.mark.parametrize(
    ("text", "kwargs"),
    [
        ("no box here", {}),
        ("[0.1, 0.2, 0.3]", {}),  # three numbers
        ("1 2 3", {}),
        ("[1, 2, 3, 4, 5]", {}),
        ("[0.1, 0.2, 0.1, 0.5]", {}),  # zero width
        ("[1500, 20, 1800, 90]", {}),  # pixels but no image size
        ("[2, 3, 5, 6]", {"image_size": (100, 100), "coord_format": "normalized"}),  # clips to a point
        ("", {}),
        ("[a, b, c, d]", {}),  # no numbers in the brackets
        ("<box></box>", {}),  # an empty tag
        ("[nan, 0.1, 0.2, 0.3]", {}),  # "nan" is not a number: three numbers
        ("1 2 3 4 5", {}),  # bare text with five numbers is ambiguous
        ("<box>(10,20),(30)</box>", {}),  # a tag holding three numbers
        ("[0.5, 0.5, 0.5, 0.9]", {"coord_format": "normalized"}),  # zero width
        ("[1.2, 1.2, 1.5, 1.5]", {"coord_format": "normalized"}),  # outside the image: clips to a point
    ],
)
def test_parse_box_unparseable(text: str, kwargs: dict) -> None:
    assert parse_box(text, **kwargs) is None


def test_parse_box_argument_errors() -> None:
    with pytest.raises(ValueError, match="coord_format"):
        parse_box("[1, 2, 3, 4]", coord_format="xywh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size"):
        parse_box("[1, 2, 3, 4]", coord_format="pixel")
    with pytest.raises(ValueError, match="image_size"):
        parse_box("[1, 2, 3, 4]", image_size=(0, 10))


def test_xywh_to_xyxy() -> None:
    assert xywh_to_xyxy([10, 20, 30, 40]) == (10.0, 20.0, 40.0, 60.0)


def test_box_iou() -> None:
    box = (0.0, 0.0, 2.0, 2.0)
    assert box_iou(box, box) == pytest.approx(1.0)
    assert box_iou(box, (3.0, 3.0, 4.0, 4.0)) == 0.0
    assert box_iou(box, (2.0, 0.0, 4.0, 2.0)) == 0.0  # touching edges
    # half of each box overlaps: intersection 2, union 6
    assert box_iou(box, (1.0, 0.0, 3.0, 2.0)) == pytest.approx(1 / 3)
    # one box half the size of the other, inside it: intersection 2, union 4
    assert box_iou(box, (0.0, 0.0, 1.0, 2.0)) == pytest.approx(0.5)
    assert box_iou(box, (1.0, 1.0, 1.0, 1.0)) == 0.0  # degenerate


def test_refcoco_accuracy_thresholds() -> None:
    gt = (0.0, 0.0, 0.5, 1.0)
    # IoU exactly 0.5 counts (inclusive threshold)
    assert refcoco_accuracy("[0.0, 0.0, 0.25, 1.0]", gt) == 1.0
    # IoU 1/3
    assert refcoco_accuracy("[0.25, 0.0, 0.75, 1.0]", gt) == 0.0
    assert refcoco_accuracy("[0.25, 0.0, 0.75, 1.0]", gt, threshold=0.3) == 1.0
    assert refcoco_accuracy("no box", gt) == 0.0


def test_refcoco_auto_reads_near_unit_boxes_as_normalised() -> None:
    # A normalised box overshooting the bottom edge is clipped, even with an image size.
    assert parse_box("[0.25, 0.17, 0.75, 1.02]", image_size=(640, 480)) == pytest.approx(
        (0.25, 0.17, 0.75, 1.0)
    )
    assert refcoco_accuracy("[0.25, 0.17, 0.75, 1.02]", (0.25, 0.2, 0.75, 1.0), image_size=(640, 480)) == 1.0
    # Larger values are pixels with an image size, as before.
    assert parse_box("[64, 48, 320, 240]", image_size=(640, 480)) == pytest.approx((0.1, 0.1, 0.5, 0.5))


def test_refcoco_accuracy_pixel_gt_and_formats() -> None:
    size = (200, 100)
    gt_xywh = (50, 25, 100, 50)
    gt = xywh_to_xyxy(gt_xywh)  # (50, 25, 150, 75) pixels
    assert refcoco_accuracy("[50, 25, 150, 75]", gt, image_size=size) == 1.0
    assert refcoco_accuracy("[0.25, 0.25, 0.75, 0.75]", gt, image_size=size) == 1.0
    assert (
        refcoco_accuracy("<box>(250,250),(750,750)</box>", gt, image_size=size, coord_format="thousand")
        == 1.0
    )
    with pytest.raises(ValueError, match="image_size"):
        refcoco_accuracy("[0.25, 0.25, 0.75, 0.75]", gt)
    with pytest.raises(ValueError, match="xywh_to_xyxy"):
        refcoco_accuracy("[0.25, 0.25, 0.75, 0.75]", (150, 25, 100, 50), image_size=size)


# -------------------------------------------------------------------------------------
# Registry and aggregation
# -------------------------------------------------------------------------------------


def test_registry_names() -> None:
    ours = {"exact_match", "vqa", "multiple_choice", "yes_no", "refcoco"}
    assert set(METRICS) == ours | {"lmms_gqa", "lmms_mme", "lmms_textvqa"}
    assert get_metric("vqa") is METRICS["vqa"]
    with pytest.raises(
        ValueError, match="known metrics: exact_match, lmms_gqa, lmms_mme, lmms_textvqa, multiple"
    ):
        get_metric("bleu")


def test_lmms_eval_rules_where_ours_differ() -> None:
    # GQA: lmms-eval deletes punctuation and case only; ours also drops articles and maps numbers.
    assert exact_match("The table.", "table") == 1.0 and lmms_gqa_match("The table.", "table") == 0.0
    assert exact_match("two", "2") == 1.0 and lmms_gqa_match("two", "2") == 0.0
    assert lmms_gqa_match("T-Shirt", "tshirt") == 1.0 and exact_match("T-Shirt", "tshirt") == 0.0
    assert METRICS["lmms_gqa"]("Yes.", {"answer": "yes"}) == {"accuracy": 1.0}
    # TextVQA: lmms-eval's tokenisation splits "'s" and deletes commas and question marks.
    assert normalize_textvqa_lmms("Joe's Diner?") == "joe 's diner"
    assert normalize_vqa("Joe's Diner?") == "joe's diner"
    answers = ["joe's"] * 3 + ["other"] * 7
    assert METRICS["lmms_textvqa"]("Joe's", {"answer": answers}) == {"accuracy": pytest.approx(0.9)}
    # MME: "Nope" is no for lmms-eval, unparsed for ours.
    assert METRICS["lmms_mme"]("Nope", {"answer": "no"}) == {"accuracy": 1.0, "unparsed": 0.0}
    assert METRICS["yes_no"]("Nope", {"answer": "no"}) == {"accuracy": 0.0, "unparsed": 1.0}
    records = [{k: v for k, v in r.items() if k != "prediction"} for r in MME_RECORDS]
    scores = [METRICS["lmms_mme"](r["prediction"], rec) for r, rec in zip(MME_RECORDS, records)]
    assert aggregate("lmms_mme", scores, records)["mme"] == mme_scores(MME_RECORDS, parse=parse_yes_no_lmms)


def test_scorers_on_records() -> None:
    assert METRICS["exact_match"]("Dog", {"answer": ["dog", "puppy"]}) == {"accuracy": 1.0}
    assert METRICS["vqa"]("cat", {"answer": _answers(2)}) == {"accuracy": pytest.approx(0.6)}
    mc = METRICS["multiple_choice"]("I'd say (B)", {"options": OPTIONS, "answer": "B"})
    assert mc == {"accuracy": 1.0, "unparsed": 0.0}
    mc = METRICS["multiple_choice"]("no idea", {"options": OPTIONS, "answer": 1})
    assert mc == {"accuracy": 0.0, "unparsed": 1.0}
    assert METRICS["yes_no"]("No.", {"answer": "no"}) == {"accuracy": 1.0, "unparsed": 0.0}
    ref = METRICS["refcoco"](
        "[50, 25, 150, 75]", {"bbox": [50, 25, 100, 50], "bbox_format": "xywh", "image_size": [200, 100]}
    )
    assert ref == {"accuracy": 1.0, "iou": pytest.approx(1.0), "unparsed": 0.0}
    ref = METRICS["refcoco"]("nothing", {"bbox": [0.1, 0.1, 0.5, 0.5]})
    assert ref == {"accuracy": 0.0, "iou": 0.0, "unparsed": 1.0}
    ref = METRICS["refcoco"](
        "(100,100),(500,500)", {"bbox": [0.1, 0.1, 0.5, 0.5], "coord_format": "thousand"}
    )
    assert ref["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("metric", "record", "missing"),
    [
        ("multiple_choice", {"answer": "A"}, "options"),
        ("multiple_choice", {"options": OPTIONS}, "answer"),
        ("vqa", {}, "answer"),
        ("exact_match", {}, "answer"),
        ("yes_no", {}, "answer"),
        ("refcoco", {"image_size": [10, 10]}, "bbox"),
    ],
)
def test_scorers_name_missing_key(metric: str, record: dict, missing: str) -> None:
    with pytest.raises(ValueError, match=f"record\\['{missing}'\\]"):
        METRICS[metric]("A", record)


def test_aggregate_means() -> None:
    records = [{"answer": _answers(k)} for k in (1, 3, 4)]
    scores = [METRICS["vqa"]("cat", record) for record in records]
    summary = aggregate("vqa", scores, records)
    assert summary["num_samples"] == 3
    assert summary["accuracy"] == pytest.approx((0.3 + 0.9 + 1.0) / 3)


def test_aggregate_yes_no_mme_block() -> None:
    records = [{k: v for k, v in r.items() if k != "prediction"} for r in MME_RECORDS]
    scores = [METRICS["yes_no"](r["prediction"], rec) for r, rec in zip(MME_RECORDS, records)]
    summary = aggregate("yes_no", scores, records)
    assert summary["accuracy"] == pytest.approx(0.75)
    assert summary["unparsed"] == pytest.approx(1 / 8)
    assert summary["mme"] == mme_scores(MME_RECORDS)

    # POPE-like records without image ids: the mean only
    plain = [{"answer": r["answer"]} for r in MME_RECORDS]
    assert "mme" not in aggregate("yes_no", scores, plain)


def test_aggregate_errors() -> None:
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        aggregate("f1", [], [])
    with pytest.raises(ValueError, match="same order"):
        aggregate("vqa", [{"accuracy": 1.0}], [])
    assert aggregate("vqa", [], []) == {"num_samples": 0}


def test_scorers_hand_made_values() -> None:
    # vqa: 2 of 10 humans said "two" -> 0.6, whatever the prediction's case / article / number form
    answers = ["2", "2"] + ["3"] * 8
    assert METRICS["vqa"]("Two.", {"answer": answers}) == {"accuracy": pytest.approx(0.6)}
    # exact_match: any of several acceptable answers
    assert METRICS["exact_match"]("a T-shirt", {"answer": ["shirt", "t shirt"]}) == {"accuracy": 1.0}
    # multiple_choice: the answer given as option text, the prediction as a bracketed letter
    assert METRICS["multiple_choice"]("(c)", {"options": OPTIONS, "answer": "Bird"}) == {
        "accuracy": 1.0,
        "unparsed": 0.0,
    }
    # yes_no: a capitalised reference; a hedge is unparsed and wrong
    assert METRICS["yes_no"]("no.", {"answer": "No"}) == {"accuracy": 1.0, "unparsed": 0.0}
    assert METRICS["yes_no"]("yes or no", {"answer": "No"}) == {"accuracy": 0.0, "unparsed": 1.0}
    # refcoco: prediction covers the left 3/4 of a box covering the right 3/4 -> IoU 1/2, counts
    record = {"bbox": [0.25, 0.0, 1.0, 1.0]}
    result = METRICS["refcoco"]("[0.0, 0.0, 0.75, 1.0]", record)
    assert result == {"accuracy": 1.0, "iou": pytest.approx(0.5), "unparsed": 0.0}
    # ... and the left half of the image: intersection 1/4, union 1 -> IoU 1/4 < 0.5
    result = METRICS["refcoco"]("[0.0, 0.0, 0.5, 1.0]", record)
    assert result == {"accuracy": 0.0, "iou": pytest.approx(0.25), "unparsed": 0.0}


def test_aggregate_multiple_choice_unparsed_fraction() -> None:
    records = [{"options": OPTIONS, "answer": "A"}] * 4
    predictions = ["A", "(B)", "no idea", "cat"]
    scores = [METRICS["multiple_choice"](p, r) for p, r in zip(predictions, records)]
    summary = aggregate("multiple_choice", scores, records)
    assert summary == {"num_samples": 4, "accuracy": 0.5, "unparsed": 0.25}


# -------------------------------------------------------------------------------------
# Cross-check with lmms-eval 0.7.3's own scorer files (read by path: importing the
# lmms_eval package takes seconds); skipped where lmms-eval is not installed.
# -------------------------------------------------------------------------------------

CORPUS = [
    *CONTRACTIONS,
    *(word.capitalize() for word in CONTRACTIONS),
    "1,,000",
    "1,000 dogs, 3 cats",
    "t-shirt",
    "yes" + "." * 40,
    "Joe's Diner?",
    "U.S.A.",
    "what's up, doc?",
    "3.5.",
    "the man's 2 dogs",
    "  a  cat\n",
    "it's 12:30",
    "@home",
    "co-op, inc.",
    "None of the above",
    "I'm",
]


def lmms_eval_file(relative: str):
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    module_spec = importlib.util.spec_from_file_location(f"lmms_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_vqa_rules_equal_lmms_evals() -> None:
    processor = lmms_eval_file("tasks/_task_utils/vqa_eval_metric.py").EvalAIAnswerProcessor()
    assert processor.CONTRACTIONS == CONTRACTIONS
    for text in CORPUS:
        # lmms-eval's vqav2 scorer: whitespace, then punctuation and digits / articles.
        vqav2 = processor.process_digit_article(
            processor.process_punctuation(text.replace("\n", " ").strip())
        )
        assert normalize_vqa(text) == vqav2, text
        assert normalize_textvqa_lmms(text) == processor(text), text  # its textvqa scorer


def test_mme_reading_equals_lmms_evals() -> None:
    parse = lmms_eval_file("tasks/mme/utils.py").parse_pred_ans
    for text in [
        "Yes",
        "no.",
        "Y",
        "n",
        "Nope",
        "Not sure",
        "Yes or no",
        "**Yes**",
        "There is no dog.",
        "x",
        "",
    ]:
        theirs = parse(text)
        assert parse_yes_no_lmms(text) == (None if theirs == "other" else theirs), text
