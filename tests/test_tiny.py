"""Tiny offline checkpoints load through the real transformers code paths and run."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from vif.tiny import (
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    build_tiny_llava,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_word_tokenizer,
    load_processor,
)

WORDS = ["What is in the picture?", "A red square.", "Describe the image in detail."]
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"), WORDS)


def test_word_tokenizer_chat_template():
    tok = build_word_tokenizer(WORDS)
    # list-of-items content (processor format) and plain strings render the same way
    as_items = tok.apply_chat_template(MESSAGES, tokenize=False)
    as_strings = tok.apply_chat_template(
        [
            {"role": "user", "content": "<image>\nWhat is in the picture?"},
            {"role": "assistant", "content": "A red square."},
        ],
        tokenize=False,
    )
    assert as_items == as_strings == "USER: <image>\nWhat is in the picture? ASSISTANT: A red square.</s>"
    # multi-turn + generation prompt
    more = MESSAGES + [{"role": "user", "content": "Describe the image."}]
    assert tok.apply_chat_template(more, tokenize=False, add_generation_prompt=True).endswith(
        "</s>USER: Describe the image. ASSISTANT:"
    )
    ids = tok(as_items).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["<s>", "USER", ":"]  # BOS prepended, role word is one special token
    assert "<image>" in tokens and tokens[-1] == "</s>" and "<unk>" not in tokens
    assert tok.convert_tokens_to_ids("user") != tok.convert_tokens_to_ids("USER")  # "user" stays a plain word
    assert tok.convert_ids_to_tokens(tok("zebra").input_ids)[-1] == "<unk>"


def test_llava_round_trip(llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    assert isinstance(processor, LlavaProcessor)
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)
    assert (
        model.config.image_token_id
        == processor.image_token_id
        == processor.tokenizer.convert_tokens_to_ids("<image>")
    )
    assert len(model.model.language_model.layers) == 8

    prompt = processor.apply_chat_template(MESSAGES)
    inputs = processor(images=[Image.new("RGB", (120, 80), (255, 0, 0))], text=prompt, return_tensors="pt")
    tokens_per_image = (96 // 12) ** 2
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == tokens_per_image
    assert inputs.pixel_values.shape == (1, 3, 96, 96)

    with torch.no_grad():
        out = model(**inputs, labels=inputs.input_ids)
    assert out.logits.shape == (1, inputs.input_ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)


def test_llava_build_is_deterministic(tmp_path):
    a = LlavaForConditionalGeneration.from_pretrained(build_tiny_llava(tmp_path / "a", WORDS, seed=3))
    b = LlavaForConditionalGeneration.from_pretrained(build_tiny_llava(tmp_path / "b", WORDS, seed=3))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize(
    "build, model_cls, processor_cls",
    [
        (build_tiny_qwen2_5_vl, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageOnlyProcessor),
        (build_tiny_qwen2_vl, Qwen2VLForConditionalGeneration, Qwen2VLImageOnlyProcessor),
    ],
)
def test_qwen_round_trip(tmp_path, build, model_cls, processor_cls):
    out_dir = build(tmp_path / "qwen", WORDS)
    model = model_cls.from_pretrained(out_dir)
    processor = load_processor(out_dir)
    assert type(processor) is processor_cls
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert processor.image_token_id == model.config.image_token_id

    prompt = processor.apply_chat_template(MESSAGES)
    assert (
        prompt.startswith("<|im_start|>system\n") and "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    )
    images = [Image.new("RGB", (120, 80), (255, 0, 0))]
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    t, h, w = inputs.image_grid_thw[0].tolist()
    assert inputs.pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
    n_image_tokens = int((inputs.input_ids == model.config.image_token_id).sum())
    assert n_image_tokens == t * h * w // 4  # 2 x 2 spatial merge
    assert torch.equal(inputs.mm_token_type_ids == 1, inputs.input_ids == model.config.image_token_id)

    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs.input_ids.shape
