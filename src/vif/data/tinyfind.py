"""TinyFind: a tiny, seeded, fine-grained visual question-answering benchmark.

Why this exists
---------------
We want a benchmark on which a *tiny* multimodal model can be trained on a laptop CPU in minutes, yet whose
answers genuinely depend on a handful of pixels. Every image is a cluttered scene containing one or more
*small objects* (``target_size`` px, default 6) in bright palette colours; the question asks about their
colour, shape, position or count. Everything else in the image is clutter the model must learn to ignore.

Image content (``image_size`` x ``image_size`` RGB, default 96 -> a 12x12 grid of 8 px patches)
-----------------------------------------------------------------------------------------------
1. A background texture: smooth value noise, (soft or hard-edged) stripes, or Gaussian blobs, on a muted base
   colour, plus per-pixel grain. Its contrast grows with ``clutter``.
2. A few LARGE distractor shapes (at least 3x ``target_size``) in MUTED colours, drawn from the same shape set
   as the targets, so "small" really has to be read off the image. Their number grows with ``clutter``.
3. The small objects, painted last, with exact palette RGB values and no anti-aliasing.

The rule that separates small objects from clutter is therefore "small AND saturated". It is enforced by
construction: every background / distractor pixel has a channel spread ``max(rgb) - min(rgb)`` of at most
``MUTED_MAX_SPREAD`` (60), while every palette colour has a spread of at least 180, so no clutter pixel can
ever equal (or even resemble) a target colour. Small objects never overlap and keep a gap between them, so each
one is fully visible and can be counted.

Questions and answers (one template per type, single-word answers from a closed vocabulary)
-------------------------------------------------------------------------------------------
======== ================================================ ===========================================
type     question                                         answers
======== ================================================ ===========================================
color    "What colour is the small shape?"                red, green, blue, yellow, purple
shape    "What shape is the small {color} object?"        square, circle, triangle, cross
position "Where is the small shape?"                      top-left, top-right, bottom-left, bottom-right
count    "How many small {color} {shapes} are there?"    one, two, three
======== ================================================ ===========================================

(``{shapes}`` is the plural shape name: squares, circles, triangles, crosses.)

* ``color`` and ``position`` images contain exactly one small object. For ``position`` it lies entirely
  inside one image quadrant, at least ``_MIDLINE_GAP`` px away from both midlines, so the answer is never
  ambiguous.
* ``shape`` images contain the queried object plus up to ``round(2 * clutter)`` small *decoys* of other
  colours, so the model must bind colour to shape.
* ``count`` images contain 1-3 copies of the queried colour+shape plus up to ``round(2 * clutter)`` *near-miss*
  decoys that differ from it in exactly one attribute (same colour / other shape, or same shape / other
  colour).
* Counts are words ("one", "two", "three") rather than digits, so that every answer is a lowercase word.
  Position answers are hyphenated words; treat each answer as ONE token (see ``answer_vocabulary``).
* Answers are balanced exactly within each split: question types are assigned round-robin and answers
  round-robin within a type, then the whole (type, answer) schedule is shuffled with the split's seed.

Files written by :func:`generate`
---------------------------------
``out_dir/images/<split>_<i:06d>.png``, ``out_dir/<split>.json`` (a list of LLaVA-format records, ``image``
relative to ``out_dir``) and ``out_dir/dataset_info.json`` (config, vocabularies, palette and per-answer
counts). Each record's ``evidence_box`` is ``meta.bbox_norm`` (read by ``VIFConfig.map_source="boxes"``, the
ground-truth map). Its ``meta`` holds everything needed to verify the answer:

* ``type``: question type; ``query``: the colour / shape named in the question (``null`` where none);
* ``targets``: every small object, with ``shape``, ``color``, centre pixel ``x``, ``y`` (always painted in
  the object's colour), ``size``, ``bbox`` and ``role`` (``"target"`` if it determines the answer, else
  ``"decoy"``);
* ``bbox``: PIXEL box ``[x0, y0, x1, y1]`` with exclusive ``x1``, ``y1`` (``PIL.Image.crop`` convention) of
  the answer-relevant targets (their union, for ``count``); ``bbox_norm``: the same divided by image size;
* ``background`` (texture kind) and ``distractors`` (shape, RGB, bbox of each large muted shape).

Determinism
-----------
Sample ``i`` of a split is rendered from ``np.random.default_rng((seed, split_code, 1, i))`` and the split's
answer schedule from ``default_rng((seed, split_code, 0))`` (the ``0``/``1`` word keeps the two streams apart,
because ``SeedSequence`` pads short entropy with zeros). The same config therefore gives byte-identical JSON
and pixel-identical PNGs; different seeds or splits give different data. Note that because the schedule is a
shuffle of the whole split, changing ``n_train`` changes which question every training index gets.

Usage::

    python -m vif.data.tinyfind --out data/tinyfind --n-train 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------------------------
# Closed vocabularies
# --------------------------------------------------------------------------------------------------------

# Saturated colours, pairwise far apart in RGB, each with a channel spread >= 180 (see module docstring).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 200, 20),
    "blue": (30, 70, 255),
    "yellow": (245, 220, 0),
    "purple": (160, 20, 230),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "square": "squares",
    "circle": "circles",
    "triangle": "triangles",
    "cross": "crosses",
}
POSITIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "position", "count")
QUESTION_TEMPLATES: dict[str, str] = {
    "color": "What colour is the small shape?",
    "shape": "What shape is the small {color} object?",
    "position": "Where is the small shape?",
    "count": "How many small {color} {shapes} are there?",
}
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Clutter pixels never exceed this channel spread; palette colours are far above it.
MUTED_MAX_SPREAD = 60
# Smallest size at which the four shape masks are all different (at 4 px a circle equals a plus-cross).
MIN_TARGET_SIZE = 5

_EDGE_MARGIN = 1  # keep small objects fully inside the image
_MIDLINE_GAP = 2  # position targets stay this far from the midlines, so the quadrant is unambiguous
_FORMAT_VERSION = 1


@dataclass
class TinyFindConfig:
    """Generation knobs. ``target_size`` and ``clutter`` set the difficulty; ``seed`` must be >= 0."""

    image_size: int = 96
    target_size: int = 6
    clutter: float = 0.5
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 400
    seed: int = 0
    question_types: tuple[str, ...] = ("color", "shape", "position", "count")

    def __post_init__(self) -> None:
        # Lists arrive from argparse / YAML; a tuple keeps the config hashable and its JSON dump stable.
        self.question_types = tuple(self.question_types)
        unknown = set(self.question_types) - set(QUESTION_TYPES)
        if unknown or not self.question_types or len(set(self.question_types)) != len(self.question_types):
            raise ValueError(f"question_types must be distinct, non-empty and from {QUESTION_TYPES}")
        if self.target_size < MIN_TARGET_SIZE:
            raise ValueError(
                f"target_size must be >= {MIN_TARGET_SIZE} so that all shapes are distinguishable"
            )
        if self.image_size < 6 * self.target_size:
            raise ValueError("image_size must be >= 6 * target_size to leave room for clutter and quadrants")
        if not 0.0 <= self.clutter <= 1.0:
            raise ValueError("clutter must be in [0, 1]")
        if min(self.n_train, self.n_val, self.n_test) < 0 or self.seed < 0:
            raise ValueError("split sizes and seed must be non-negative")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


# --------------------------------------------------------------------------------------------------------
# Vocabularies and tokenisation
# --------------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[a-z]+(?:-[a-z]+)*|[^\sa-z]")


def tokenize_question(text: str) -> list[str]:
    """Lowercase word tokens of a question; punctuation becomes its own token and ``<image>`` is dropped
    (the model's processor handles the image placeholder)."""
    return _TOKEN_RE.findall(text.replace("<image>", " ").lower())


def _answers_for(question_type: str) -> tuple[str, ...]:
    return {
        "color": tuple(PALETTE),
        "shape": SHAPES,
        "position": POSITIONS,
        "count": COUNT_WORDS,
    }[question_type]


def answer_vocabulary(config: TinyFindConfig | None = None) -> list[str]:
    """Every possible answer, grouped by question type (colours, shapes, positions, counts)."""
    config = config or TinyFindConfig()
    words = [a for qtype in config.question_types for a in _answers_for(qtype)]
    return list(dict.fromkeys(words))


def _all_questions(question_type: str) -> list[str]:
    template = QUESTION_TEMPLATES[question_type]
    return [
        template.format(color=color, shapes=SHAPE_PLURALS[shape]) for color in PALETTE for shape in SHAPES
    ]


def question_vocabulary(config: TinyFindConfig | None = None) -> list[str]:
    """Every token :func:`tokenize_question` can produce for this config's questions (incl. ``"?"``),
    in order of first appearance."""
    config = config or TinyFindConfig()
    tokens = [
        tok for qtype in config.question_types for q in _all_questions(qtype) for tok in tokenize_question(q)
    ]
    return list(dict.fromkeys(tokens))


# --------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a shape, symmetric about the vertical axis.

    Masks are computed with numpy rather than ``ImageDraw`` because PIL's small polygons and ellipses are
    lopsided at 5-8 px; here the pixel ``(size // 2, size // 2)`` is always inside the shape.
    """
    coords = np.arange(size)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    c = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        # The -0.25 shaves the corners off at small sizes, where a radius of size/2 gives a full square.
        radius = size / 2 - 0.25
        return (x - c) ** 2 + (y - c) ** 2 <= radius**2
    if shape == "triangle":
        # Row widths grow by 2 every 2 rows and share the parity of `size`, so the triangle stays symmetric.
        widths = np.minimum(coords + 1 + (coords + 1 + size) % 2, size)
        return np.abs(x - c) <= (widths[:, None] - 1) / 2
    if shape == "cross":
        thickness = max(1, size // 3)
        thickness += (size - thickness) % 2  # same parity as size -> arms centred exactly
        band = np.abs(coords - c) <= (thickness - 1) / 2
        return band[:, None] | band[None, :]
    raise ValueError(f"unknown shape {shape!r}")


@dataclass
class SmallObject:
    """A small saturated object; ``(x0, y0)`` is the top-left pixel of its ``size`` x ``size`` box."""

    shape: str
    color: str
    x0: int
    y0: int
    size: int
    role: str = "target"

    @property
    def bbox(self) -> list[int]:
        return [self.x0, self.y0, self.x0 + self.size, self.y0 + self.size]

    def to_meta(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "x": self.x0 + self.size // 2,
            "y": self.y0 + self.size // 2,
            "size": self.size,
            "bbox": self.bbox,
            "role": self.role,
        }


def quadrant_of(bbox: Sequence[int], image_size: int) -> str | None:
    """Quadrant word of a pixel bbox (exclusive x1/y1), or None if it straddles a midline."""
    x0, y0, x1, y1 = bbox
    half = image_size // 2
    horizontal = "left" if x1 <= half else "right" if x0 >= half else None
    vertical = "top" if y1 <= half else "bottom" if y0 >= half else None
    if horizontal is None or vertical is None:
        return None
    return f"{vertical}-{horizontal}"


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def _round(x: float) -> int:
    # Round half up: Python's round() rounds 0.5 to 0, which would silently disable a knob at clutter=0.25.
    return int(np.floor(x + 0.5))


def _muted_rgb(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A grey level plus a small tint whose channel spread is at most MUTED_MAX_SPREAD."""
    grey = rng.uniform(low, high)
    tint = rng.uniform(-MUTED_MAX_SPREAD / 2, MUTED_MAX_SPREAD / 2, size=3)
    return grey + tint


def _texture(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A zero-centred texture field in roughly [-1, 1]."""
    kind = str(rng.choice(["noise", "stripes", "blobs"]))
    coords = np.arange(size, dtype=np.float64)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if kind == "noise":
        cells = int(rng.integers(4, 13))
        grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
        field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), np.float64)
    elif kind == "stripes":
        angle = rng.uniform(0.0, np.pi)
        cycles = rng.uniform(3.0, 10.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        wave = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) / size + phase)
        # Large sharpness gives hard-edged stripes whose edges are as fine as the targets.
        sharpness = rng.uniform(1.0, 5.0)
        field = np.tanh(sharpness * wave) / np.tanh(sharpness)
    else:
        field = np.zeros((size, size))
        for _ in range(int(rng.integers(3, 9))):
            cx, cy = rng.uniform(0, size, size=2)
            sigma = rng.uniform(0.05, 0.2) * size
            sign = rng.choice([-1.0, 1.0])
            field += sign * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        field /= max(np.abs(field).max(), 1e-6)
    return kind, field


def _background(rng: np.random.Generator, config: TinyFindConfig) -> tuple[str, np.ndarray]:
    """Muted textured background as a float (H, W, 3) array."""
    kind, field = _texture(rng, config.image_size)
    amplitude = 70.0 * config.clutter
    grain = rng.normal(0.0, 0.15 * amplitude + 1.0, size=field.shape)
    luminance = field * amplitude + grain
    # The same luminance is added to every channel, so the channel spread stays that of the base colour
    # (and clipping to [0, 255] can only shrink it).
    base = _muted_rgb(rng, 70.0, 185.0)
    return kind, luminance[:, :, None] + base[None, None, :]


def _paint(canvas: np.ndarray, mask: np.ndarray, x0: int, y0: int, rgb: Sequence[float]) -> None:
    h, w = mask.shape
    region = canvas[y0 : y0 + h, x0 : x0 + w]
    region[mask] = rgb


def _draw_distractors(
    rng: np.random.Generator, canvas: np.ndarray, config: TinyFindConfig
) -> list[dict[str, Any]]:
    """Large muted shapes; at least 3x target_size, so size alone tells them apart from the targets."""
    n_low, n_high = _round(2 * config.clutter), _round(6 * config.clutter)
    min_size = max(3 * config.target_size, _round(0.15 * config.image_size))
    max_size = max(min_size, _round(0.4 * config.image_size))
    distractors = []
    for _ in range(int(rng.integers(n_low, n_high + 1))):
        shape = str(rng.choice(SHAPES))
        size = int(rng.integers(min_size, max_size + 1))
        x0, y0 = (int(v) for v in rng.integers(0, config.image_size - size + 1, size=2))
        rgb = np.clip(_muted_rgb(rng, 40.0, 215.0), 0, 255).round()
        _paint(canvas, shape_mask(shape, size), x0, y0, rgb)
        distractors.append(
            {"shape": shape, "rgb": [int(v) for v in rgb], "bbox": [x0, y0, x0 + size, y0 + size]}
        )
    return distractors


def _place(
    rng: np.random.Generator,
    objects: list[SmallObject],
    config: TinyFindConfig,
    quadrant: str | None = None,
) -> None:
    """Sets x0/y0 of every object by rejection sampling: inside the image (or the given quadrant) and
    separated from each other by a gap, so none overlaps and each can be counted."""
    size, image_size = config.target_size, config.image_size
    gap = max(2, size // 2)
    lo, hi = _EDGE_MARGIN, image_size - _EDGE_MARGIN - size
    x_range, y_range = (lo, hi), (lo, hi)
    if quadrant is not None:
        half = image_size // 2
        low_half, high_half = (lo, half - _MIDLINE_GAP - size), (half + _MIDLINE_GAP, hi)
        y_range = low_half if quadrant.startswith("top") else high_half
        x_range = low_half if quadrant.endswith("left") else high_half
    placed: list[SmallObject] = []
    for obj in objects:
        for _ in range(1000):
            obj.x0 = int(rng.integers(x_range[0], x_range[1] + 1))
            obj.y0 = int(rng.integers(y_range[0], y_range[1] + 1))
            if all(max(abs(obj.x0 - other.x0), abs(obj.y0 - other.y0)) >= size + gap for other in placed):
                break
        else:  # pragma: no cover - config validation leaves ample room
            raise RuntimeError("could not place small objects without overlap")
        placed.append(obj)


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _make_sample(
    rng: np.random.Generator, question_type: str, answer: str, config: TinyFindConfig
) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Renders one image whose correct answer to a `question_type` question is `answer`."""
    colors, size = list(PALETTE), config.target_size
    max_decoys = _round(2 * config.clutter)
    quadrant: str | None = None
    query: dict[str, str | None] = {"color": None, "shape": None}

    if question_type == "color":
        objects = [SmallObject(_choice(rng, SHAPES), answer, 0, 0, size)]
        question = QUESTION_TEMPLATES["color"]
    elif question_type == "position":
        objects = [SmallObject(_choice(rng, SHAPES), _choice(rng, colors), 0, 0, size)]
        quadrant = answer
        question = QUESTION_TEMPLATES["position"]
    elif question_type == "shape":
        color = _choice(rng, colors)
        query["color"] = color
        objects = [SmallObject(answer, color, 0, 0, size)]
        other_colors = [c for c in colors if c != color]
        for _ in range(int(rng.integers(0, max_decoys + 1))):
            objects.append(SmallObject(_choice(rng, SHAPES), _choice(rng, other_colors), 0, 0, size, "decoy"))
        question = QUESTION_TEMPLATES["shape"].format(color=color)
    elif question_type == "count":
        color, shape = _choice(rng, colors), _choice(rng, SHAPES)
        query.update(color=color, shape=shape)
        count = COUNT_WORDS.index(answer) + 1
        objects = [SmallObject(shape, color, 0, 0, size) for _ in range(count)]
        # Near misses (one attribute differs) force the model to check both colour and shape.
        near_misses = [(color, s) for s in SHAPES if s != shape] + [(c, shape) for c in colors if c != color]
        for _ in range(int(rng.integers(0, max_decoys + 1))):
            decoy_color, decoy_shape = near_misses[int(rng.integers(len(near_misses)))]
            objects.append(SmallObject(decoy_shape, decoy_color, 0, 0, size, "decoy"))
        question = QUESTION_TEMPLATES["count"].format(color=color, shapes=SHAPE_PLURALS[shape])
    else:
        raise ValueError(f"unknown question type {question_type!r}")

    background, canvas = _background(rng, config)
    canvas = np.clip(canvas, 0, 255).round()
    distractors = _draw_distractors(rng, canvas, config)
    _place(rng, objects, config, quadrant)
    for obj in objects:
        _paint(canvas, shape_mask(obj.shape, obj.size), obj.x0, obj.y0, PALETTE[obj.color])

    targets = [obj for obj in objects if obj.role == "target"]
    bbox = [
        min(t.bbox[0] for t in targets),
        min(t.bbox[1] for t in targets),
        max(t.bbox[2] for t in targets),
        max(t.bbox[3] for t in targets),
    ]
    meta = {
        "type": question_type,
        "query": query,
        "targets": [obj.to_meta() for obj in objects],
        "bbox": bbox,
        "bbox_norm": [round(v / config.image_size, 4) for v in bbox],
        "image_size": config.image_size,
        "background": background,
        "distractors": distractors,
    }
    return canvas.astype(np.uint8), question, meta


# --------------------------------------------------------------------------------------------------------
# Splits and files
# --------------------------------------------------------------------------------------------------------


def _schedule(n: int, config: TinyFindConfig, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question type, answer) for each sample: exactly balanced, then shuffled."""
    types = config.question_types
    pairs: list[tuple[str, str]] = []
    for t_index, qtype in enumerate(types):
        n_type = len(range(t_index, n, len(types)))
        # Permuting the answer order decides at random which answers get the remainder.
        answers = [_answers_for(qtype)[i] for i in rng.permutation(len(_answers_for(qtype)))]
        pairs += [(qtype, answers[k % len(answers)]) for k in range(n_type)]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def generate(
    out_dir: str | Path, config: TinyFindConfig | None = None, progress: bool = True
) -> dict[str, Path]:
    """Writes out_dir/images/<split>_<i>.png and out_dir/<split>.json; returns {split: json_path}.

    Also writes out_dir/dataset_info.json. Existing files with the same names are overwritten; other files
    in out_dir (e.g. images of an earlier, larger run) are left alone.
    """
    config = config or TinyFindConfig()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    json_paths: dict[str, Path] = {}
    answer_counts: dict[str, dict[str, dict[str, int]]] = {}
    for split_code, split in enumerate(SPLITS):
        n = config.split_sizes()[split]
        schedule = _schedule(n, config, np.random.default_rng((config.seed, split_code, 0)))
        records = []
        counts: dict[str, Counter[str]] = {qtype: Counter() for qtype in config.question_types}
        for i, (qtype, answer) in enumerate(tqdm(schedule, desc=f"tinyfind {split}", disable=not progress)):
            rng = np.random.default_rng((config.seed, split_code, 1, i))
            pixels, question, meta = _make_sample(rng, qtype, answer, config)
            sample_id = f"{split}_{i:06d}"
            image_rel = f"images/{sample_id}.png"
            Image.fromarray(pixels).save(out_dir / image_rel)
            records.append(
                {
                    "id": sample_id,
                    "image": image_rel,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                    # where the answer's evidence lies, for VIFConfig.map_source="boxes" (the oracle map)
                    "evidence_box": meta["bbox_norm"],
                    "meta": meta,
                }
            )
            counts[qtype][answer] += 1
        json_paths[split] = out_dir / f"{split}.json"
        _write_json(json_paths[split], records)
        answer_counts[split] = {
            qtype: {a: counts[qtype][a] for a in _answers_for(qtype)} for qtype in config.question_types
        }

    _write_json(
        out_dir / "dataset_info.json",
        {
            "name": "tinyfind",
            "format_version": _FORMAT_VERSION,
            "config": asdict(config),
            "splits": {split: config.split_sizes()[split] for split in SPLITS},
            "answer_counts": answer_counts,
            "answer_vocabulary": answer_vocabulary(config),
            "question_vocabulary": question_vocabulary(config),
            "question_templates": {q: QUESTION_TEMPLATES[q] for q in config.question_types},
            "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
            "shapes": list(SHAPES),
            "bbox_format": "pixel [x0, y0, x1, y1], x1/y1 exclusive; bbox_norm = bbox / image_size",
        },
    )
    return json_paths


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m vif.data.tinyfind --out DIR [--n-train N ...]``."""
    defaults = TinyFindConfig()
    parser = argparse.ArgumentParser(
        prog="python -m vif.data.tinyfind", description="Generate the TinyFind fine-grained VQA benchmark."
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--target-size", type=int, default=defaults.target_size)
    parser.add_argument("--clutter", type=float, default=defaults.clutter)
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-val", type=int, default=defaults.n_val)
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--question-types", nargs="+", choices=QUESTION_TYPES, default=list(defaults.question_types)
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    config = TinyFindConfig(
        image_size=args.image_size,
        target_size=args.target_size,
        clutter=args.clutter,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        question_types=tuple(args.question_types),
    )
    for split, path in generate(args.out, config, progress=not args.no_progress).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
