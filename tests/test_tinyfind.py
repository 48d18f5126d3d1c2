"""Tests for the TinyFind benchmark generator: determinism, answer correctness against the pixels, splits,
balance, vocabularies and the CLI. Everything runs on a few dozen 96 px images (a few seconds)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vif.data.tinyfind import (
    COUNT_WORDS,
    MIN_TARGET_SIZE,
    MUTED_MAX_SPREAD,
    PALETTE,
    SHAPES,
    SPLITS,
    TinyFindConfig,
    answer_vocabulary,
    generate,
    main,
    quadrant_of,
    question_vocabulary,
    shape_mask,
    tokenize_question,
)

SMALL = TinyFindConfig(n_train=40, n_val=20, n_test=30, seed=7)


def _load(json_path: Path) -> list[dict]:
    return json.loads(json_path.read_text())


def _pixels(json_path: Path, record: dict) -> np.ndarray:
    with Image.open(json_path.parent / record["image"]) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("tinyfind_small"), SMALL, progress=False)


@pytest.fixture(scope="module")
def hard_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyFindConfig, dict[str, Path]]:
    # Maximum clutter and the smallest targets: the most decoys, distractors and texture contrast.
    config = TinyFindConfig(target_size=MIN_TARGET_SIZE, clutter=1.0, n_train=60, n_val=0, n_test=0, seed=3)
    return config, generate(tmp_path_factory.mktemp("tinyfind_hard"), config, progress=False)


# --------------------------------------------------------------------------------------------------------
# Shapes and palette
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(MIN_TARGET_SIZE, 25))
def test_shapes_are_distinguishable_and_contain_their_centre(size: int) -> None:
    masks = {shape: shape_mask(shape, size) for shape in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] != masks[b]).any(), f"{a} and {b} look identical at {size} px"
    for shape, mask in masks.items():
        assert mask.shape == (size, size)
        assert mask[size // 2, size // 2], shape
        assert (mask == mask[:, ::-1]).all(), f"{shape} is not left-right symmetric"


def test_palette_is_saturated_and_distinct() -> None:
    colors = np.array(list(PALETTE.values()), dtype=int)
    assert (colors.max(1) - colors.min(1) >= 3 * MUTED_MAX_SPREAD).all()
    for a, b in itertools.combinations(colors, 2):
        assert np.abs(a - b).sum() >= 150


# --------------------------------------------------------------------------------------------------------
# Determinism and splits
# --------------------------------------------------------------------------------------------------------


def test_deterministic_per_seed(small_dataset: dict[str, Path], tmp_path: Path) -> None:
    again = generate(tmp_path / "again", SMALL, progress=False)
    for split in SPLITS:
        assert again[split].read_bytes() == small_dataset[split].read_bytes()
        for record in _load(again[split]):
            assert np.array_equal(_pixels(again[split], record), _pixels(small_dataset[split], record))
    info_a = (small_dataset["train"].parent / "dataset_info.json").read_bytes()
    assert (tmp_path / "again" / "dataset_info.json").read_bytes() == info_a


def test_different_seed_gives_different_data(small_dataset: dict[str, Path], tmp_path: Path) -> None:
    config = TinyFindConfig(n_train=SMALL.n_train, n_val=0, n_test=0, seed=SMALL.seed + 1)
    other = generate(tmp_path, config, progress=False)["train"]
    ours, theirs = _load(small_dataset["train"]), _load(other)
    assert [r["meta"] for r in ours] != [r["meta"] for r in theirs]
    same_pixels = sum(
        np.array_equal(_pixels(small_dataset["train"], a), _pixels(other, b)) for a, b in zip(ours, theirs)
    )
    assert same_pixels == 0


def test_splits_have_configured_sizes_and_are_disjoint(small_dataset: dict[str, Path]) -> None:
    ids, images, pixel_hashes = set(), set(), set()
    for split in SPLITS:
        records = _load(small_dataset[split])
        assert len(records) == SMALL.split_sizes()[split]
        for record in records:
            assert record["id"].startswith(f"{split}_")
            assert (small_dataset[split].parent / record["image"]).is_file()
            ids.add(record["id"])
            images.add(record["image"])
            pixel_hashes.add(_pixels(small_dataset[split], record).tobytes())
    total = SMALL.n_train + SMALL.n_val + SMALL.n_test
    assert len(ids) == len(images) == len(pixel_hashes) == total


def test_dataset_info(small_dataset: dict[str, Path]) -> None:
    info = json.loads((small_dataset["train"].parent / "dataset_info.json").read_text())
    assert info["config"]["seed"] == SMALL.seed
    assert info["answer_vocabulary"] == answer_vocabulary(SMALL)
    for split in SPLITS:
        records = _load(small_dataset[split])
        counted = Counter((r["meta"]["type"], r["conversations"][1]["value"]) for r in records)
        listed = {(t, a): n for t, per in info["answer_counts"][split].items() for a, n in per.items() if n}
        assert listed == dict(counted)


# --------------------------------------------------------------------------------------------------------
# The answer matches what is drawn
# --------------------------------------------------------------------------------------------------------


def _check_record(record: dict, pixels: np.ndarray, config: TinyFindConfig) -> None:
    meta, question = record["meta"], record["conversations"][0]["value"]
    answer = record["conversations"][1]["value"]
    assert question.startswith("<image>\n")
    assert answer in answer_vocabulary(config)
    assert set(tokenize_question(question)) <= set(question_vocabulary(config))

    # Every small object is drawn exactly: inside its box, the pixels with its palette colour form its mask.
    outside = np.ones(pixels.shape[:2], dtype=bool)
    for t in meta["targets"]:
        rgb = PALETTE[t["color"]]
        assert tuple(pixels[t["y"], t["x"]]) == rgb
        x0, y0, x1, y1 = t["bbox"]
        painted = (pixels[y0:y1, x0:x1] == rgb).all(-1)
        assert np.array_equal(painted, shape_mask(t["shape"], t["size"]))
        outside[y0:y1, x0:x1] = False
    # ... and nothing else in the image is saturated, so distractors cannot be mistaken for targets.
    spread = pixels.max(-1).astype(int) - pixels.min(-1)
    assert spread[outside].max() <= MUTED_MAX_SPREAD

    targets = [t for t in meta["targets"] if t["role"] == "target"]
    if meta["type"] == "color":
        assert len(meta["targets"]) == 1 and answer == targets[0]["color"]
    elif meta["type"] == "position":
        assert len(meta["targets"]) == 1
        assert quadrant_of(targets[0]["bbox"], config.image_size) == answer
    elif meta["type"] == "shape":
        query_color = meta["query"]["color"]
        assert f" {query_color} " in question
        matching = [t for t in meta["targets"] if t["color"] == query_color]
        assert len(matching) == 1 and matching[0]["shape"] == answer
    elif meta["type"] == "count":
        query = meta["query"]
        assert f" {query['color']} {query['shape']}" in question
        matching = [
            t for t in meta["targets"] if (t["color"], t["shape"]) == (query["color"], query["shape"])
        ]
        assert COUNT_WORDS[len(matching) - 1] == answer
        assert matching == targets
    else:
        raise AssertionError(meta["type"])

    # The reported bbox encloses the answer-relevant targets.
    x0, y0, x1, y1 = meta["bbox"]
    for t in targets:
        assert x0 <= t["bbox"][0] and y0 <= t["bbox"][1] and t["bbox"][2] <= x1 and t["bbox"][3] <= y1
    assert meta["bbox_norm"] == [round(v / config.image_size, 4) for v in meta["bbox"]]


def test_answers_match_pixels(small_dataset: dict[str, Path]) -> None:
    for split in SPLITS:
        for record in _load(small_dataset[split]):
            _check_record(record, _pixels(small_dataset[split], record), SMALL)


def test_answers_match_pixels_at_max_clutter(hard_dataset: tuple[TinyFindConfig, dict[str, Path]]) -> None:
    config, paths = hard_dataset
    records = _load(paths["train"])
    for record in records:
        _check_record(record, _pixels(paths["train"], record), config)
    assert any(t["role"] == "decoy" for r in records for t in r["meta"]["targets"])
    assert all(r["meta"]["distractors"] for r in records)


# --------------------------------------------------------------------------------------------------------
# Balance and vocabularies
# --------------------------------------------------------------------------------------------------------


def test_answers_balanced_within_type(tmp_path: Path) -> None:
    config = TinyFindConfig(n_train=200, n_val=0, n_test=0, seed=11)
    records = _load(generate(tmp_path, config, progress=False)["train"])
    per_type: dict[str, Counter[str]] = {}
    for r in records:
        per_type.setdefault(r["meta"]["type"], Counter())[r["conversations"][1]["value"]] += 1
    assert set(per_type) == set(config.question_types)
    for counts in per_type.values():
        assert max(counts.values()) - min(counts.values()) <= 1
    assert (
        max(sum(c.values()) for c in per_type.values()) - min(sum(c.values()) for c in per_type.values()) <= 1
    )


def test_vocabularies_follow_question_types() -> None:
    full = TinyFindConfig()
    assert len(answer_vocabulary(full)) == len(set(answer_vocabulary(full))) == 5 + 4 + 4 + 3
    assert "?" in question_vocabulary(full) and "crosses" in question_vocabulary(full)
    assert all(w == w.lower() for w in question_vocabulary(full))

    colour_only = TinyFindConfig(question_types=("color",))
    assert answer_vocabulary(colour_only) == list(PALETTE)
    assert question_vocabulary(colour_only) == ["what", "colour", "is", "the", "small", "shape", "?"]


def test_question_types_subset(tmp_path: Path) -> None:
    config = TinyFindConfig(n_train=8, n_val=0, n_test=0, question_types=("count", "position"))
    records = _load(generate(tmp_path, config, progress=False)["train"])
    assert {r["meta"]["type"] for r in records} == {"count", "position"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_size": MIN_TARGET_SIZE - 1},
        {"image_size": 24, "target_size": 6},
        {"clutter": 1.5},
        {"question_types": ("colour",)},
        {"question_types": ()},
        {"seed": -1},
    ],
)
def test_invalid_config_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TinyFindConfig(**kwargs)


def test_cli(tmp_path: Path) -> None:
    main(
        [
            "--out",
            str(tmp_path),
            "--n-train",
            "3",
            "--n-val",
            "2",
            "--n-test",
            "1",
            "--seed",
            "5",
            "--no-progress",
        ]
    )
    assert [len(_load(tmp_path / f"{s}.json")) for s in SPLITS] == [3, 2, 1]
    assert json.loads((tmp_path / "dataset_info.json").read_text())["config"]["seed"] == 5


def test_colour_and_position_answers_read_from_pixels_alone(tmp_path: Path) -> None:
    """Derives the answer from the PNG only (no meta): the saturated pixels are the small object; their
    colour is the colour answer and the quadrant of their bounding box the position answer."""
    config = TinyFindConfig(
        image_size=64, target_size=6, clutter=1.0, n_train=40, n_val=0, n_test=0, seed=5,
        question_types=("color", "position"),
    )  # fmt: skip
    json_path = generate(tmp_path, config, progress=False)["train"]
    names = {rgb: name for name, rgb in PALETTE.items()}
    for record in _load(json_path):
        pixels = _pixels(json_path, record).astype(int)
        saturated = pixels.max(-1) - pixels.min(-1) > MUTED_MAX_SPREAD
        colours = {tuple(rgb) for rgb in pixels[saturated]}
        assert len(colours) == 1, record["id"]  # one object, painted in one exact palette colour
        ys, xs = np.nonzero(saturated)
        assert saturated.sum() <= config.target_size**2
        answer = record["conversations"][1]["value"]
        if record["meta"]["type"] == "color":
            assert names[colours.pop()] == answer
        else:
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert quadrant_of(box, config.image_size) == answer
