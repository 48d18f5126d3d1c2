"""LLaVA-format data -> batches: label masks, image placeholders, padding, bad images."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from vif.data.llava_format import (
    IGNORE_INDEX,
    BadImageError,
    LlavaFormatDataset,
    LlavaFormatError,
    VIFCollator,
    conversations_to_messages,
    encode_conversation,
    pad_to_square,
)
from vif.tiny import build_tiny_llava, build_tiny_qwen2_5_vl, build_word_tokenizer, load_processor

SAMPLES = [
    {
        "id": "single",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red square."},
        ],
    },
    {
        "id": "multi",
        "image": ["red.png", "blue.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nDescribe both images."},
            {"from": "gpt", "value": "Red and blue."},
            {"from": "human", "value": "Which one is red?"},
            {"from": "gpt", "value": "The first one."},
        ],
    },
    {
        "id": "text",
        "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes"}],
    },
]
WORDS = [c["value"].replace("<image>", "") for s in SAMPLES for c in s["conversations"]]
GPT_ANSWERS = {s["id"]: [c["value"] for c in s["conversations"] if c["from"] == "gpt"] for s in SAMPLES}


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    Image.new("RGB", (120, 80), (255, 0, 0)).save(d / "red.png")  # wide
    Image.new("RGB", (64, 96), (0, 0, 255)).save(d / "blue.png")  # tall
    (d / "corrupt.png").write_bytes(os.urandom(300))
    write_json(d / "data.json", SAMPLES)
    return d


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llava": (build_tiny_llava(root / "llava", WORDS), LlavaForConditionalGeneration),
        "qwen2_5_vl": (build_tiny_qwen2_5_vl(root / "qwen", WORDS), Qwen2_5_VLForConditionalGeneration),
    }


def label_runs(labels):
    """Contiguous runs of labelled positions in a 1-D label tensor, as lists of positions."""
    runs, run = [], []
    for i, v in enumerate(labels.tolist()):
        if v != IGNORE_INDEX:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


def image_tokens_per_sample(item, processor):
    if "image_grid_thw" in item:  # Qwen: t * h * w / (2 x 2 merge) per image
        return int(item["image_grid_thw"].prod(dim=1).sum()) // processor.image_processor.merge_size**2
    n_images = 0 if item["pixel_values"] is None else len(item["pixel_values"])
    return n_images * (96 // 12) ** 2  # LLaVA: (image_size / patch_size)^2 per image


@pytest.mark.parametrize("backbone", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collated_masks(data_dir, backbones, backbone, padding_side):
    model_dir, model_cls = backbones[backbone]
    processor = load_processor(model_dir)
    tok = processor.tokenizer
    end_of_turn = "</s>" if backbone == "llava" else "<|im_end|>"
    ds = LlavaFormatDataset(data_dir / "data.json", processor=processor)
    items = [ds[i] for i in range(len(ds))]
    batch = VIFCollator(processor, padding_side=padding_side)(items)
    image_id = processor.image_token_id

    B, L = batch["input_ids"].shape
    assert B == 3 and L == max(len(item["input_ids"]) for item in items)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        real = batch["attention_mask"][b].bool()
        # padding on the requested side, and in neither the labels nor the image tokens
        assert int(real.sum()) == n
        assert bool(real[:n].all() if padding_side == "right" else real[L - n :].all())
        assert (batch["input_ids"][b][~real] == tok.pad_token_id).all()
        assert (batch["labels"][b][~real] == IGNORE_INDEX).all()

        # labelled tokens are exactly the assistant turns: answer + end-of-turn token
        runs = label_runs(batch["labels"][b])
        answers = GPT_ANSWERS[item["id"]]
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            expected = tok.decode(tok.encode(answer + end_of_turn, add_special_tokens=False))
            assert tok.decode(batch["input_ids"][b][run]) == expected
            assert (batch["labels"][b][run] == batch["input_ids"][b][run]).all()

        # image tokens are exactly the expanded placeholders
        is_image = batch["input_ids"][b] == image_id
        assert int(is_image.sum()) == image_tokens_per_sample(item, processor)
        assert not (is_image & ~real).any() and (batch["labels"][b][is_image] == IGNORE_INDEX).all()
    assert int((batch["input_ids"] == image_id).sum()) == sum(
        image_tokens_per_sample(i, processor) for i in items
    )

    if backbone == "llava":
        assert batch["pixel_values"].shape == (3, 3, 96, 96)  # 1 + 2 + 0 images
        assert "image_grid_thw" not in batch
    else:
        assert batch["image_grid_thw"].shape == (3, 3)
        assert batch["pixel_values"].shape == (int(batch["image_grid_thw"].prod(dim=1).sum()), 1176)
        assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_id)

    model = model_cls.from_pretrained(model_dir)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_pad_to_square_uses_fill_colour():
    wide = pad_to_square(Image.new("RGB", (120, 80), (255, 0, 0)), (10, 20, 30))
    assert wide.size == (120, 120)
    assert wide.getpixel((60, 0)) == wide.getpixel((60, 119)) == (10, 20, 30)  # bands above and below
    assert wide.getpixel((60, 20)) == wide.getpixel((60, 99)) == (255, 0, 0)  # image centred
    assert wide.getpixel((60, 19)) == (10, 20, 30) and wide.getpixel((60, 100)) == (10, 20, 30)
    tall = pad_to_square(Image.new("RGB", (64, 96), (0, 0, 255)), (1, 2, 3))
    assert (
        tall.size == (96, 96)
        and tall.getpixel((0, 48)) == (1, 2, 3)
        and tall.getpixel((16, 48)) == (0, 0, 255)
    )
    square = Image.new("RGB", (50, 50), (9, 9, 9))
    assert pad_to_square(square, (0, 0, 0)).getpixel((0, 0)) == (9, 9, 9)


def test_dataset_pads_with_mean_colour(data_dir, backbones):
    processor = load_processor(backbones["llava"][0])
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1)
    pixels = LlavaFormatDataset(data_dir / "data.json", processor=processor, image_aspect="pad")[0][
        "pixel_values"
    ]
    # 120 x 80 padded to 120 x 120 and resized to 96: rows 0-15 are the mean colour band
    unnormalised = pixels[0] * std.view(3, 1, 1) + mean.view(3, 1, 1)  # (3, 96, 96) in [0, 1]
    fill = torch.tensor([int(m * 255) for m in processor.image_processor.image_mean]) / 255
    assert torch.allclose(unnormalised[:, :14, :].mean(dim=(1, 2)), fill, atol=2e-3)
    assert torch.allclose(unnormalised[:, 48, 48], torch.tensor([1.0, 0.0, 0.0]), atol=2e-3)
    # "keep" lets CLIP resize + centre-crop: no band
    kept = LlavaFormatDataset(data_dir / "data.json", processor=processor, image_aspect="keep")[0][
        "pixel_values"
    ]
    assert torch.allclose(
        (kept[0] * std.view(3, 1, 1) + mean.view(3, 1, 1))[:, 0, 48], torch.tensor([1.0, 0, 0]), atol=2e-3
    )


@pytest.mark.parametrize("bad_file", ["corrupt.png", "missing.png"])
def test_bad_image_raise_and_skip(data_dir, backbones, bad_file, caplog):
    processor = load_processor(backbones["llava"][0])
    bad = {
        "id": "broken-42",
        "image": bad_file,
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Yes"}],
    }
    path = write_json(data_dir / f"bad_{bad_file}.json", SAMPLES + [bad])

    ds = LlavaFormatDataset(path, processor=processor)  # "raise": detected when the sample is loaded
    assert len(ds) == 4
    with pytest.raises(BadImageError) as err:
        ds[3]
    message = str(err.value)
    assert "broken-42" in message and str(data_dir / bad_file) in message and "on_bad_image" in message

    with caplog.at_level(logging.WARNING, logger="vif.data.llava_format"):
        ds = LlavaFormatDataset(path, processor=processor, on_bad_image="skip")
    assert len(ds) == 3 and [s[0] for s in ds.samples] == ["single", "multi", "text"]
    assert len(ds.skipped) == 1
    sample_id, skipped_path, reason = ds.skipped[0]
    assert sample_id == "broken-42" and skipped_path == str(data_dir / bad_file) and reason
    assert "skipped 1 sample" in caplog.text


def test_marker_count_mismatch(data_dir):
    sample = {
        "id": "two-markers",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    with pytest.raises(LlavaFormatError, match="two-markers.*2 '<image>' marker.*1 image file"):
        LlavaFormatDataset(write_json(data_dir / "mismatch.json", [sample]))


def test_truncation_never_cuts_image_tokens(data_dir, backbones):
    processor = load_processor(backbones["llava"][0])
    full = LlavaFormatDataset(data_dir / "data.json", processor=processor)[0]
    last_image = int((full["input_ids"] == processor.image_token_id).nonzero().max())
    cut = LlavaFormatDataset(data_dir / "data.json", processor=processor, max_length=last_image + 2)[0]
    assert len(cut["input_ids"]) == len(cut["labels"]) == last_image + 2
    with pytest.raises(LlavaFormatError, match="single.*image placeholder"):
        LlavaFormatDataset(data_dir / "data.json", processor=processor, max_length=last_image)[0]


def test_jsonl_and_text_only_qwen(data_dir, backbones):
    processor = load_processor(backbones["qwen2_5_vl"][0])
    path = data_dir / "data.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in SAMPLES[2:]) + "\n")
    ds = LlavaFormatDataset(path, processor=processor)
    item = ds[0]
    assert item["id"] == "text" and item["pixel_values"] is None and "image_grid_thw" not in item
    assert (item["mm_token_type_ids"] == 0).all()
    batch = VIFCollator(processor, pad_to_multiple_of=8)([item])
    assert batch["input_ids"].shape[1] % 8 == 0 and "pixel_values" not in batch


def test_template_without_end_token_gets_eos():
    # The llava-hf hub template ends assistant turns with a space, no "</s>": the answer
    # span gets the EOS appended (as LLaVA-1.5 was trained), else the model never learns to stop.
    tok = build_word_tokenizer(WORDS)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
        "{% for c in m['content'] %}{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    conversations = SAMPLES[2]["conversations"] + SAMPLES[1]["conversations"][2:]  # text-only, 2 turns
    example = encode_conversation(tok, conversations_to_messages(conversations, "no-eos"))
    runs = label_runs(example["labels"])
    assert [tok.decode(example["input_ids"][run]) for run in runs] == ["yes </s>", "the first one. </s>"]
