"""Turning what a user has into model-ready batches for the diagnostics.

Three kinds of ``samples`` are accepted by :func:`iter_batches`:

* model-ready batches: dicts with ``input_ids (B, L)``, ``attention_mask``,
  ``pixel_values`` and optionally ``labels`` (answer tokens = ``labels != -100``) and any
  other inputs the model takes (``image_grid_thw``, ``mm_token_type_ids``, ...); or
  un-batched items with 1-D ``input_ids`` (e.g. a :class:`~vif.data.llava_format.LlavaFormatDataset`),
  collated here with :class:`~vif.data.llava_format.VIFCollator`;
* a list of ``(PIL image, question)`` or ``(PIL image, question, answer)`` tuples, encoded
  with ``processor`` and its chat template (answers become labelled tokens);
* the path of a LLaVA-format JSON/JSONL file, read with
  :class:`~vif.data.llava_format.LlavaFormatDataset` (``image_folder`` = its image root).

Every batch comes with one small ``meta`` dict per sample (``id`` and, when known,
``question`` / ``answer`` text) for the report. Batches are left-padded (generation needs it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from ..data.llava_format import (
    BadImageError,
    LlavaFormatDataset,
    VIFCollator,
    encode_conversation,
    render_chat,
    tokenizer_of,
)

Batch = dict[str, Any]
Meta = dict[str, Any]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _is_pil_sample(sample: Any) -> bool:
    from PIL import Image

    return isinstance(sample, (tuple, list)) and len(sample) in (2, 3) and isinstance(sample[0], Image.Image)


def _text_of(messages: list[dict[str, Any]], role: str) -> str:
    """The text of the first ``role`` message (LLaVA-format messages), for captions."""
    for message in messages:
        if message["role"] == role:
            content = message["content"]
            if isinstance(content, str):
                return content
            return " ".join(item["text"] for item in content if item.get("type") == "text")
    return ""


def encode_pil_sample(processor: Any, image: Any, question: str, answer: str | None = None) -> dict[str, Any]:
    """One ``(image, question[, answer])`` -> a dataset-style item (1-D ``input_ids`` and ``labels``).

    With an answer the conversation is encoded as training data (answer tokens labelled,
    by :func:`vif.data.llava_format.encode_conversation`); without one, as a prompt that
    ends with the chat template's generation prompt, all labels ``-100``.
    """
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    if answer is not None:
        assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        return encode_conversation(processor, [user, assistant], [image])
    tokenizer = tokenizer_of(processor)
    prompt = render_chat(processor, [user], add_generation_prompt=True)
    # No second BOS when the template already wrote one (as encode_conversation does).
    add_special = not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
    out = processor(images=[image], text=[prompt], return_tensors="pt", add_special_tokens=add_special)
    item = {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}
    item["input_ids"] = item["input_ids"].reshape(-1)
    item.pop("attention_mask", None)
    if "mm_token_type_ids" in item:
        item["mm_token_type_ids"] = item["mm_token_type_ids"].reshape(-1)
    item["labels"] = torch.full_like(item["input_ids"], -100)
    return item


def _items_of(dataset: LlavaFormatDataset) -> Iterator[dict[str, Any]]:
    for i in range(len(dataset)):
        try:
            yield dataset[i]
        except BadImageError as err:
            # The dataset's own hint names its on_bad_image option, which the diagnostics do not have.
            raise BadImageError(
                str(err).split(". Fix or remove", 1)[0]
                + ". Fix or remove the file, or remove its sample from the data file."
            ) from None


def iter_batches(
    samples: Any,
    processor: Any = None,
    image_folder: str | Path | None = None,
    batch_size: int = 4,
    image_aspect: str = "pad",
) -> Iterator[tuple[Batch, list[Meta]]]:
    """Yields ``(batch, metas)``: a model-ready batch and one meta dict per sample.

    See the module docstring for the accepted ``samples``. ``processor`` is needed for
    everything except ready-made batches; ``image_folder`` and ``image_aspect`` only for a
    LLaVA-format file.
    """
    if isinstance(samples, (str, Path)):
        if processor is None:
            raise ValueError("reading a LLaVA-format file needs the model's processor (processor=...).")
        dataset = LlavaFormatDataset(samples, image_folder, processor, image_aspect=image_aspect)
        metas = [
            {
                "id": sample_id,
                "question": _text_of(messages, "user"),
                "answer": _text_of(messages, "assistant"),
            }
            for sample_id, messages, _ in dataset.samples
        ]
        yield from _collated(_items_of(dataset), iter(metas), processor, batch_size)
        return

    if isinstance(samples, (list, tuple)) and samples and _is_pil_sample(samples[0]):
        if processor is None:
            raise ValueError(
                "(image, question[, answer]) samples need the model's processor (processor=...)."
            )
        items = (encode_pil_sample(processor, *sample) for sample in samples)
        metas = (
            {
                "id": str(i),
                "question": sample[1],
                "answer": sample[2] if len(sample) > 2 else "",
            }
            for i, sample in enumerate(samples)
        )
        yield from _collated(items, metas, processor, batch_size)
        return

    # Batches, or dataset items with 1-D input_ids.
    iterator = iter(samples)
    first = next(iterator, None)
    if first is None:
        return
    if not isinstance(first, dict) or "input_ids" not in first:
        raise TypeError(
            "samples must be model-ready batches (dicts with input_ids, attention_mask, pixel_values[, labels]), "
            "a list of (PIL image, question[, answer]) tuples, or the path of a LLaVA-format JSON file; "
            f"got an iterable of {type(first).__name__}."
        )
    stream = _prepend(first, iterator)
    if first["input_ids"].dim() == 1:
        if processor is None:
            raise ValueError(
                "un-batched items (1-D input_ids) need the processor to be collated (processor=...)."
            )
        items = list(stream)
        metas = ({"id": str(item.get("id", i))} for i, item in enumerate(items))
        yield from _collated(iter(items), metas, processor, batch_size)
        return
    seen = 0
    for batch in stream:
        batch = dict(batch)
        ids = batch.pop("ids", None)
        n = batch["input_ids"].shape[0]
        names = ids if ids is not None else [str(seen + b) for b in range(n)]
        seen += n
        yield batch, [{"id": str(name)} for name in names]


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _collated(
    items: Iterator[dict[str, Any]], metas: Iterator[Meta], processor: Any, batch_size: int
) -> Iterator[tuple[Batch, list[Meta]]]:
    collator = VIFCollator(processor, padding_side="left")
    for chunk in _chunks(items, batch_size):
        batch = collator([{k: v for k, v in item.items() if k != "id"} for item in chunk])
        yield batch, list(islice(metas, len(chunk)))


def prompt_only(batch: Batch, pad_id: int) -> Batch:
    """Cuts every sample before its first answer token and left-pads again, for generation.

    Tensors of shape ``(B, L)`` (``input_ids``, ``attention_mask``, ``mm_token_type_ids``)
    are cut; ``labels`` are dropped; everything else (pixel values, grids) is kept.
    Without labels the batch only has to be left-padded already.
    """
    ids = batch["input_ids"]
    batch_size, length = ids.shape
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    labels = batch.get("labels")
    out = {k: v for k, v in batch.items() if k != "labels"}
    answer = None if labels is None else labels != -100
    if answer is None or not answer.any():
        if not bool(mask[:, -1].all()):
            raise ValueError("generation needs left-padded prompts (attention_mask[:, -1] must be all 1).")
        return out
    order = torch.arange(length).expand_as(ids)
    first_answer = torch.where(answer, order, length).amin(-1)  # (B,) = length where no answer
    keep = mask.bool() & (order < first_answer[:, None])  # (B, L) prompt tokens
    new_len = int(keep.sum(-1).max())
    for key, value in batch.items():
        if key == "labels" or not (
            isinstance(value, torch.Tensor) and value.shape[:2] == (batch_size, length)
        ):
            continue
        fill = pad_id if key == "input_ids" else 0
        packed = torch.full((batch_size, new_len), fill, dtype=value.dtype)
        for b in range(batch_size):
            tokens = value[b][keep[b]]
            packed[b, new_len - len(tokens) :] = tokens
        out[key] = packed
    if "attention_mask" not in batch:
        out["attention_mask"] = torch.zeros(batch_size, new_len, dtype=torch.long)
        for b in range(batch_size):
            out["attention_mask"][b, new_len - int(keep[b].sum()) :] = 1
    return out
