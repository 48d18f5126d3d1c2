"""LLaVA instruction data -> model-ready tensors, through the backbone's own processor.

The LLaVA instruction format (LLaVA-Instruct-150K, llava_v1_5_mix665k) is a JSON list
(or JSONL) of samples::

    {"id": "000001", "image": "coco/000001.jpg",          # optional; may be a list of paths
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

A sample becomes chat messages (human -> user, gpt -> assistant, each ``<image>``
marker -> an ``{"type": "image"}`` content item), is rendered with the backbone's OWN
chat template, and is tokenised by its own processor, which expands every image
placeholder to the number of vision tokens. Labels are ``-100`` everywhere except
on the assistant turns (answer text + end-of-turn token).

How the assistant spans are found (``encode_conversation``): the template is rendered
incrementally - the messages before assistant turn k with ``add_generation_prompt=True``
(ends right where the answer starts), then including turn k (ends right after its
end-of-turn token) - which gives the answer's character span in the full prompt. The
processor tokenises the prompt with offsets; its ``text_replacement_offsets`` tell
how the image-placeholder expansion moved the characters; a token is labelled if it
overlaps an answer span. Every span is then checked: its labelled tokens must decode
to the answer text, or encoding fails loudly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value ignored by the causal-LM loss
IMAGE_MARKER = "<image>"  # image placeholder of the LLaVA data format (not necessarily the model's token)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

ImageAspect = Literal["pad", "resize", "keep"]
IMAGE_ASPECTS = ("pad", "resize", "keep")
OnBadImage = Literal["raise", "skip"]


class BadImageError(RuntimeError):
    """An image file of a sample is missing or cannot be decoded."""


class LlavaFormatError(ValueError):
    """A sample that does not follow the LLaVA format, or cannot be encoded; names the sample id."""


# -----------------------------------------------------------------------------
# Images


def pad_to_square(image: Image.Image, fill_rgb: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square of side ``max(w, h)``, centred, with ``fill_rgb`` borders.

    LLaVA-1.5's ``expand2square``: fill with the image processor's mean colour so that
    the borders become ~0 after normalisation, and the following resize + centre crop
    keeps the whole image instead of cropping its long side.
    """
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), tuple(fill_rgb))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def prepare_image(image: Image.Image, processor: Any, image_aspect: str = "pad") -> Image.Image:
    """Square an image before the processor, as ``data.image_aspect`` says (training and eval alike).

    "pad": pad to a square with the image processor's mean colour (LLaVA-1.5's training and
    evaluation); "resize": stretch to a square; "keep": leave it to the processor (CLIP resizes
    and centre-crops, Qwen keeps the native aspect).
    """
    if image_aspect not in IMAGE_ASPECTS:
        raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
    image = image.convert("RGB")
    if image_aspect == "pad":
        mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or (0.5, 0.5, 0.5)
        return pad_to_square(image, tuple(int(m * 255) for m in mean))  # int(), as LLaVA does
    if image_aspect == "resize":
        side = max(image.size)
        return image.resize((side, side), Image.Resampling.BICUBIC)
    return image


# Errors PIL raises on missing, truncated or garbage files.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _bad_image(sample_id: str, path: Path, reason: str) -> BadImageError:
    return BadImageError(
        f"sample {sample_id!r}: cannot read image {str(path)!r} ({reason}). Fix or remove the file, "
        f"or drop such samples with on_bad_image='skip' (config `on_bad_image: skip`)."
    )


def load_image(path: Path, sample_id: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB; raises ``BadImageError`` naming sample and file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the decode, so corrupt data fails here
    except FileNotFoundError:
        raise _bad_image(sample_id, path, "file not found") from None
    except _IMAGE_ERRORS as e:
        raise _bad_image(sample_id, path, f"{type(e).__name__}: {e}") from e


def check_image(path: Path) -> str | None:
    """None if ``path`` is a readable image, else the reason why not."""
    if not path.is_file():
        return "file not found"
    try:
        with Image.open(path) as im:
            im.verify()  # checks the container / checksums without decoding...
        with Image.open(path) as im:
            im.load()  # ...so decode as well (verify() leaves the object unusable, hence reopen)
    except _IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


# -----------------------------------------------------------------------------
# Reading the LLaVA format


def read_llava_json(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA-format file: a JSON list, or JSONL (one sample per line).

    Raises :class:`LlavaFormatError` naming the file (and line) for a missing file, invalid
    JSON, or anything but a list of sample objects.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlavaFormatError(f"data file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LlavaFormatError(f"cannot read data file {str(path)!r}: {err}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise LlavaFormatError(
                f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); is the file complete?"
            ) from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LlavaFormatError(
                    f"{path} line {number}: invalid JSON ({err.msg} at column {err.colno}); a JSONL file needs "
                    "one sample object per line (or write the whole file as a JSON list)"
                ) from None
    if not all(isinstance(r, dict) for r in records):
        raise LlavaFormatError(f"{path}: expected a JSON list (or JSONL) of sample objects")
    return records


def conversations_to_messages(conversations: list[dict[str, str]], sample_id: str) -> list[dict[str, Any]]:
    """LLaVA ``conversations`` -> chat messages in the transformers processor format.

    ``{"from": "human", "value": "<image>\\nWhat?"}`` becomes
    ``{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}``:
    markers become image items in place, and the newline that separates a marker from
    the text is dropped (the template renders its own separator).
    """
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise LlavaFormatError(
                f"sample {sample_id!r}: each conversation turn must be an object "
                f'{{"from": ..., "value": ...}}, got {type(turn).__name__} {turn!r}'
            )
        role = ROLES.get(turn.get("from", ""))
        if role is None:
            raise LlavaFormatError(
                f"sample {sample_id!r}: unknown speaker {turn.get('from')!r} (expected one of {sorted(ROLES)})"
            )
        value = turn.get("value", "")
        if not isinstance(value, str):
            raise LlavaFormatError(
                f"sample {sample_id!r}: the {turn.get('from')!r} turn's 'value' must be a string, got "
                f'{type(value).__name__} {value!r}; write it as text ("{value}")'
            )
        content: list[dict[str, str]] = []
        for i, piece in enumerate(value.split(IMAGE_MARKER)):
            if i > 0:
                content.append({"type": "image"})
            piece = piece.strip("\n")
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


# -----------------------------------------------------------------------------
# Encoding one conversation


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def render_chat(processor: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    """``messages`` rendered by the chat template, as text (not tokenised)."""
    # The processor's template if it has one (the hub puts it there for VLMs), else the tokenizer's.
    owner = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _special_token_strings(tokenizer: Any) -> set[str]:
    # `all_special_tokens` only lists the named ones (bos, eos, ...) in transformers 5;
    # the added-token table also has e.g. Qwen's <|im_end|> and role tokens.
    return {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(
        tokenizer.all_special_tokens
    )


def _assemble_prompt(
    processor: Any, messages: list[dict], sample_id: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages``; return (prompt, character spans of the assistant answers).

    A span covers the answer text and its end-of-turn token, without surrounding
    whitespace. If the template ends an assistant turn without any special token (the
    llava-hf hub template for LLaVA-1.5 does), the tokenizer's EOS is appended to the
    answer - LLaVA-1.5 was trained with "</s>" there, and a model that never sees it
    does not learn to stop.
    """
    tokenizer = tokenizer_of(processor)
    specials = _special_token_strings(tokenizer)
    prompt, spans, consumed = "", [], ""  # consumed: the template's own rendering so far
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(processor, messages[:j], add_generation_prompt=True)
        through = render_chat(processor, messages[: j + 1], add_generation_prompt=False)
        if not (before.startswith(consumed) and through.startswith(before)):
            raise LlavaFormatError(
                f"sample {sample_id!r}: the chat template does not render conversations incrementally "
                f"(the prompt up to assistant turn {j} is not a prefix of the longer one), so the answer "
                "spans cannot be located. Does the conversation start with a human turn?"
            )
        prompt += before[len(consumed) :]
        answer = through[len(before) :]
        core = answer.strip()
        lead = len(answer) - len(answer.lstrip())
        trail = answer[lead + len(core) :]
        if tokenizer.eos_token and not any(core.endswith(s) for s in specials):
            core += tokenizer.eos_token
        spans.append((len(prompt) + lead, len(prompt) + lead + len(core)))
        prompt += answer[:lead] + core + trail
        consumed = through
    full = render_chat(processor, messages, add_generation_prompt=False)
    if not full.startswith(consumed):
        raise LlavaFormatError(
            f"sample {sample_id!r}: the chat template's full rendering changes earlier turns"
        )
    return prompt + full[len(consumed) :], spans


def _shift_for_expansion(pos: int, replacements: list[dict]) -> int:
    # Map a character position of the prompt to the processor's expanded prompt, where
    # every image placeholder was replaced by many copies of it.
    shift = 0
    for r in replacements:
        (start, end), (new_start, new_end) = r["span"], r["new_span"]
        if end <= pos:
            shift += (new_end - new_start) - (end - start)
        elif start < pos:
            raise AssertionError("an answer span overlaps an image placeholder")
    return pos + shift


def _squash(text: str) -> str:
    return "".join(text.split())


def encode_conversation(
    processor: Any,
    messages: list[dict[str, Any]],
    images: Sequence[Image.Image] = (),
    max_length: int | None = None,
    sample_id: str = "?",
) -> dict[str, Any]:
    """Tokenise one conversation with ``processor`` and build its labels.

    ``processor`` is a transformers processor (or, for text-only data, a bare fast
    tokenizer); ``images`` are given in the order of the image items of ``messages``.
    Returns ``input_ids (L,)``, ``labels (L,)`` (-100 outside assistant answers),
    ``pixel_values`` (LLaVA ``(n_images, 3, H, W)``, Qwen ``(sum t*h*w, 1176)``, or
    None), plus ``image_grid_thw (n_images, 3)`` / ``mm_token_type_ids (L,)`` when the
    processor produces them.
    """
    tokenizer = tokenizer_of(processor)
    prompt, spans = _assemble_prompt(processor, messages, sample_id)

    kwargs: dict[str, Any] = dict(return_tensors="pt", return_offsets_mapping=True)
    # Like processor.apply_chat_template: no second BOS when the template already wrote one.
    kwargs["add_special_tokens"] = not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
    if images:
        if not hasattr(processor, "image_processor"):
            raise LlavaFormatError(
                f"sample {sample_id!r} has images but {type(processor).__name__} cannot process them"
            )
        out = processor(images=list(images), text=[prompt], return_text_replacement_offsets=True, **kwargs)
        replacements = out["text_replacement_offsets"][0]
    else:
        out = (
            processor(text=[prompt], **kwargs) if tokenizer is not processor else tokenizer(prompt, **kwargs)
        )
        replacements = []

    input_ids = out["input_ids"].reshape(-1)  # (L,)
    offsets = out["offset_mapping"].reshape(-1, 2).tolist()  # (L, 2) character span of each token
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for start, end in spans:
        a, b = _shift_for_expansion(start, replacements), _shift_for_expansion(end, replacements)
        in_span = [t for t, (s, e) in enumerate(offsets) if s < e and s < b and e > a]
        # Check: the labelled tokens must decode to the answer (modulo whitespace and what a
        # lossy tokenizer does to any text, hence the comparison with a round trip).
        want = tokenizer.decode(tokenizer.encode(prompt[start:end], add_special_tokens=False))
        got = tokenizer.decode(input_ids[in_span]) if in_span else ""
        if not in_span or _squash(got) != _squash(want):
            raise LlavaFormatError(
                f"sample {sample_id!r}: assistant tokens decode to {got!r}, expected {want!r}; "
                "the tokenizer merges the answer with its surroundings, cannot build labels"
            )
        labels[in_span] = input_ids[in_span]

    example: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": out.get("pixel_values"),
    }
    if "image_grid_thw" in out:
        example["image_grid_thw"] = out["image_grid_thw"]
    if "mm_token_type_ids" in out:
        example["mm_token_type_ids"] = out["mm_token_type_ids"].reshape(-1)

    if max_length is not None and len(input_ids) > max_length:
        image_token_id = getattr(processor, "image_token_id", None)
        image_pos = (input_ids == image_token_id).nonzero().reshape(-1) if image_token_id is not None else []
        if len(image_pos) and int(image_pos[-1]) >= max_length:
            # The model matches image features to placeholders one-to-one: a partial image breaks it.
            raise LlavaFormatError(
                f"sample {sample_id!r}: {len(input_ids)} tokens > max_length={max_length}, and truncating "
                f"would cut image placeholder tokens (the last one is at position {int(image_pos[-1])}). "
                "Raise max_length or shorten the conversation."
            )
        for key in ("input_ids", "labels", "mm_token_type_ids"):
            if key in example:
                example[key] = example[key][:max_length]
    return example


# -----------------------------------------------------------------------------
# Dataset


class LlavaFormatDataset(torch.utils.data.Dataset):
    """LLaVA-format instruction data; item i is ``encode_conversation`` of sample i.

    Args:
        json_path: JSON list or JSONL of samples.
        image_folder: root of relative image paths (default: the JSON file's folder).
        processor: the backbone's processor (``AutoProcessor.from_pretrained``), or a
            fast tokenizer for text-only data. May be None to only parse / validate.
        image_aspect: "pad" - pad to square with the processor's mean colour (LLaVA-1.5);
            "resize" - stretch to a square of side ``max(w, h)``; "keep" - hand the image
            to the processor as is (CLIP: resize + centre crop; Qwen: native aspect).
        on_bad_image: "raise" - a missing / corrupt image raises ``BadImageError`` when
            its sample is loaded; "skip" - every image is checked now and failing samples
            are dropped, listed in ``.skipped`` as ``(id, path, reason)``, with a warning.
        max_length: longest token sequence kept (truncated on the right, never through
            image placeholder tokens).

    Format errors (unknown speaker, number of ``<image>`` markers != number of images,
    no assistant turn, a malformed ``evidence_box``) raise ``LlavaFormatError`` here, at construction.

    A record may carry ``"evidence_box": [x0, y0, x1, y1]``, where the answer's evidence lies, as
    fractions of its image's width and height (x1, y1 exclusive). Items then hold ``evidence_box``
    (a float tensor ``(4,)``, moved with the image's padding for ``image_aspect="pad"``), which
    ``VIFConfig.map_source="boxes"`` (the ground-truth-map upper bound) reads.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None = None,
        processor: Any = None,
        image_aspect: ImageAspect = "pad",
        on_bad_image: OnBadImage = "raise",
        max_length: int = 2048,
    ) -> None:
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        json_path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else json_path.parent
        self.processor = processor
        self.image_aspect = image_aspect
        self.on_bad_image = on_bad_image
        self.max_length = max_length

        # samples: (id, messages, image paths); evidence boxes by sample id
        self.samples: list[tuple[str, list[dict[str, Any]], list[Path]]] = []
        self.evidence_boxes: dict[str, list[float]] = {}
        self.skipped: list[tuple[str, str, str]] = []
        for index, record in enumerate(read_llava_json(json_path)):
            try:
                sample = self._parse(record, index)
            except LlavaFormatError as err:
                raise LlavaFormatError(f"{json_path} item {index + 1}: {err}") from None
            if on_bad_image == "skip":
                sample_id, _, paths = sample
                bad = [(p, reason) for p in paths if (reason := check_image(p)) is not None]
                if bad:
                    self.skipped += [(sample_id, str(p), reason) for p, reason in bad]
                    continue
            self.samples.append(sample)
            if record.get("evidence_box") is not None:
                self.evidence_boxes[sample[0]] = _check_box(record["evidence_box"], sample[0])
        if self.skipped:
            n = len({sample_id for sample_id, _, _ in self.skipped})
            logger.warning(
                "%s: skipped %d sample(s) with unreadable images (see .skipped), e.g. %s",
                json_path,
                n,
                self.skipped[0],
            )

    def _parse(self, record: dict[str, Any], index: int) -> tuple[str, list[dict[str, Any]], list[Path]]:
        sample_id = str(record.get("id", index))
        image = record.get("image")
        if image is not None and not (
            isinstance(image, str) or (isinstance(image, list) and all(isinstance(i, str) for i in image))
        ):
            raise LlavaFormatError(
                f"sample {sample_id!r}: 'image' must be an image path or a list of paths, got "
                f"{type(image).__name__} {image!r}"
            )
        names = [] if image is None else [image] if isinstance(image, str) else list(image)
        paths = [Path(n) if Path(n).is_absolute() else self.image_folder / n for n in names]

        conversations = record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise LlavaFormatError(f"sample {sample_id!r}: missing or empty 'conversations' list")
        messages = conversations_to_messages(conversations, sample_id)
        n_markers = sum(c.get("value", "").count(IMAGE_MARKER) for c in conversations)
        if n_markers != len(paths):
            raise LlavaFormatError(
                f"sample {sample_id!r}: {n_markers} '{IMAGE_MARKER}' marker(s) in the conversation but "
                f"{len(paths)} image file(s) in 'image'; each image needs exactly one marker"
            )
        if any(
            m["role"] == "assistant" and any(c["type"] == "image" for c in m["content"]) for m in messages
        ):
            raise LlavaFormatError(
                f"sample {sample_id!r}: '{IMAGE_MARKER}' in a gpt turn; images go in human turns"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise LlavaFormatError(f"sample {sample_id!r}: no gpt turn, nothing to train on")
        first = next(m["role"] for m in messages if m["role"] != "system")
        if first != "user":
            raise LlavaFormatError(f"sample {sample_id!r}: the conversation must start with a human turn")
        return sample_id, messages, paths

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.processor is None:
            raise RuntimeError(
                "LlavaFormatDataset was built without a processor; pass processor= to encode samples"
            )
        sample_id, messages, paths = self.samples[i]
        if paths and not hasattr(self.processor, "image_processor"):
            raise LlavaFormatError(
                f"sample {sample_id!r} has images but {type(self.processor).__name__} cannot process them"
            )
        originals = [load_image(p, sample_id) for p in paths]
        images = [prepare_image(image, self.processor, self.image_aspect) for image in originals]
        example = encode_conversation(self.processor, messages, images, self.max_length, sample_id)
        example["id"] = sample_id
        box = self.evidence_boxes.get(sample_id)
        if box is not None and originals:
            if self.image_aspect == "pad":
                box = box_after_padding(box, originals[0].size)
            example["evidence_box"] = torch.tensor(box, dtype=torch.float32)
        return example


def _check_box(box: Any, sample_id: str) -> list[float]:
    ok = isinstance(box, list | tuple) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
    if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise LlavaFormatError(
            f"sample {sample_id!r}: evidence_box {box!r} must be [x0, y0, x1, y1] fractions of the image "
            "with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
        )
    return [float(v) for v in box]


def box_after_padding(box: list[float], size: tuple[int, int]) -> list[float]:
    """A box in fractions of an image of ``size (w, h)`` -> fractions of its :func:`pad_to_square` square."""
    w, h = size
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    x0, y0, x1, y1 = box
    return [(left + x0 * w) / side, (top + y0 * h) / side, (left + x1 * w) / side, (top + y1 * h) / side]


# -----------------------------------------------------------------------------
# Collation


class VIFCollator:
    """Batch ``LlavaFormatDataset`` items: pad the token sequences, concatenate the images.

    Returns ``input_ids (B, L)`` (pad id on padding), ``attention_mask (B, L)`` (0 on
    padding), ``labels (B, L)`` (-100 on padding), ``mm_token_type_ids (B, L)`` if any
    item has them (0 = text for items that lack them), and, when any item has images,
    ``pixel_values`` - the items' images concatenated in batch order: LLaVA
    ``(n_images, 3, H, W)``, Qwen ``(sum t*h*w, 1176)`` - and Qwen's ``image_grid_thw
    (n_images, 3)``. Text-only items contribute no images. ``ids`` (list of sample ids)
    only with ``return_ids=True``, since models reject unknown keyword arguments.
    ``vif_boxes (B, 4)`` (NaN rows for items without one) only with ``return_boxes=True``:
    the items' ``evidence_box``, for ``VIFConfig.map_source="boxes"``.
    """

    def __init__(
        self,
        processor_or_tokenizer: Any,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
        return_ids: bool = False,
        return_boxes: bool = False,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        tokenizer = tokenizer_of(processor_or_tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_ids = return_ids
        self.return_boxes = return_boxes

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        B = len(items)
        L = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        has_types = any("mm_token_type_ids" in item for item in items)

        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        mm_token_type_ids = torch.zeros((B, L), dtype=torch.long)
        for b, item in enumerate(items):
            n = len(item["input_ids"])
            # right padding: tokens at [0, n); left padding (generation): at [L - n, L)
            where = slice(0, n) if self.padding_side == "right" else slice(L - n, L)
            input_ids[b, where] = item["input_ids"]
            attention_mask[b, where] = 1
            labels[b, where] = item["labels"]
            if "mm_token_type_ids" in item:
                mm_token_type_ids[b, where] = item["mm_token_type_ids"]

        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if has_types:
            batch["mm_token_type_ids"] = mm_token_type_ids
        pixel_values = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values, dim=0)
        grids = [item["image_grid_thw"] for item in items if item.get("image_grid_thw") is not None]
        if grids:
            batch["image_grid_thw"] = torch.cat(grids, dim=0)
        if self.return_ids:
            batch["ids"] = [item.get("id") for item in items]
        if self.return_boxes:
            nan = torch.full((4,), float("nan"))
            batch["vif_boxes"] = torch.stack([item.get("evidence_box", nan) for item in items])
        return batch
