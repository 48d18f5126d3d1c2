"""Batched, left-padded, greedy generation for chat-style (image + text) prompts.

One function, :func:`generate_answers`, used by ``vif eval`` and by the lmms-eval
plug-in, so both render prompts the same way: through the processor's chat template
(LLaVA's "USER: <image>\\n... ASSISTANT:", Qwen-VL's "<|im_start|>user ..."), then the
processor expands the image placeholders and pads the batch on the LEFT, so that every
row's last prompt token sits in the last column and generation continues all rows from
there.

Works with a plain transformers model and with a :class:`vif.VIFModel` (whose
``generate`` computes the importance maps once from the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..data.llava_format import IMAGE_ASPECTS, prepare_image, render_chat, tokenizer_of
from ..placement import input_device

__all__ = [
    "IMAGE_ASPECTS",
    "generate_answers",
    "prepare_image",
    "render_prompt",
    "tokenizer_of",
    "user_message",
]

Message = dict[str, Any]


def render_prompt(processor: Any, messages: list[Message]) -> str:
    """The chat-template text of ``messages`` followed by the assistant's generation prompt.

    ``messages`` use the transformers processor format:
    ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]``.
    """
    # The processor's template if it has one (hub VLM folders keep it there), else the tokenizer's.
    owner = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    if not getattr(owner, "chat_template", None):
        raise ValueError(
            "the processor has no chat template, so prompts cannot be rendered; save the model folder with "
            "a processor that has one (processor.chat_template = ...; processor.save_pretrained(path))."
        )
    return render_chat(processor, messages, add_generation_prompt=True)


def user_message(question: str, num_images: int = 1) -> list[Message]:
    """A one-turn conversation: ``num_images`` images, then the question text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def _unwrap(model: Any) -> Any:
    """The transformers model under a VIFModel (for its generation config)."""
    from ..model import VIFModel

    # Not getattr(model, "base_model"): every transformers model has one (its inner decoder).
    return model.base_model if isinstance(model, VIFModel) else model


def encode_prompts(
    processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]
) -> dict[str, torch.Tensor]:
    """Tokenise rendered ``prompts`` with their images, left-padded to one batch.

    Returns the processor's tensors: ``input_ids (B, L)``, ``attention_mask (B, L)``,
    ``pixel_values`` and model-specific extras (``image_grid_thw``, ``mm_token_type_ids``).
    """
    tokenizer = tokenizer_of(processor)
    # A template that writes the BOS itself ("<s>[INST] ...") must not get a second one.
    add_special = not (tokenizer.bos_token and prompts[0].startswith(tokenizer.bos_token))
    flat_images = [image for sample_images in images for image in sample_images]
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = processor(
            images=flat_images or None,
            text=list(prompts),
            padding=True,
            return_tensors="pt",
            add_special_tokens=add_special,
        )
    finally:
        tokenizer.padding_side = previous_side
    return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    conversations: Sequence[list[Message]],
    images: Sequence[Sequence[Image.Image]],
    max_new_tokens: int = 32,
    image_aspect: str = "pad",
    **model_kwargs: Any,
) -> list[str]:
    """Greedy answers for one batch of conversations, in input order.

    Args:
        model: a transformers VLM or a :class:`vif.VIFModel`, in eval mode.
        processor: the model's processor (chat template + image processor + tokenizer).
        conversations: ``B`` message lists, each ending with a user turn (see :func:`user_message`).
        images: ``B`` lists of PIL images, one image per ``{"type": "image"}`` item, in order.
        max_new_tokens: generation budget per answer.
        image_aspect: ``"pad" | "resize" | "keep"``, see :func:`prepare_image`.
        model_kwargs: passed to ``model.generate`` (tensors moved to the model's device), e.g.
            ``vif_boxes`` for a :class:`vif.VIFModel` with ``map_source="boxes"``.

    Returns:
        ``B`` decoded answers (special tokens skipped, surrounding whitespace stripped).
    """
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    if not conversations:
        return []
    prompts = [render_prompt(processor, messages) for messages in conversations]
    images = [[prepare_image(image, processor, image_aspect) for image in sample] for sample in images]
    inputs = encode_prompts(processor, prompts, images)
    device = input_device(model)  # accelerate-aware: the first parameter may be offloaded
    dtype = next(_unwrap(model).parameters()).dtype
    inputs = {
        key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for key, value in inputs.items()
    }
    tokenizer = tokenizer_of(processor)
    generation_config = _unwrap(model).generation_config
    eos = (
        generation_config.eos_token_id
        if generation_config.eos_token_id is not None
        else tokenizer.eos_token_id
    )
    pad = tokenizer.pad_token_id
    if pad is None:  # pad with EOS, as generate() itself would (eos may be a list, e.g. Qwen's)
        pad = eos[0] if isinstance(eos, list | tuple) else eos
    output = model.generate(
        **inputs,
        do_sample=False,
        num_beams=1,
        # Greedy: unset any sampling defaults the checkpoint's generation config carries.
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()},
    )
    # Left padding: every row's prompt ends at column L - 1, so new tokens start at L.
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [text.strip() for text in texts]
