"""Referring-expression boxes: RefCOCO, RefCOCO+, RefCOCOg.

Boxes are ``(x0, y0, x1, y1)`` (top-left, bottom-right); ``image_size`` is
``(width, height)`` like ``PIL.Image.size``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .common import require

Box = tuple[float, float, float, float]
CoordFormat = Literal["auto", "normalized", "pixel", "thousand"]


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

# "auto" reads a box whose every value is at most this as normalised (then clipped): a
# model asked for fractions overshoots the border ("[0.25, 0.17, 0.75, 1.02]"), while a
# pixel or 0-1000 box that small would be a dot in the image's corner.
NEAR_UNIT = 1.5


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
        if largest <= NEAR_UNIT:
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
    * ``"auto"`` (default): all values <= 1.5 (:data:`NEAR_UNIT`) -> normalised, so a
      box overshooting the border such as ``[0.25, 0.17, 0.75, 1.02]`` is a clipped
      normalised box; else pixels if ``image_size`` is given; else the 0-1000 grid if
      all values <= 1000; else None.
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


def score_refcoco(prediction: str, record: Mapping[str, Any]) -> dict[str, float]:
    """RefCOCO scorer.

    Reads ``bbox`` (xyxy, normalised or pixels; ``bbox_format: "xywh"`` converts
    RefCOCO's native layout), optional ``image_size`` ([width, height]) and optional
    ``coord_format`` (how the model writes boxes; default "auto", see :func:`parse_box`).
    """
    bbox = require(
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
