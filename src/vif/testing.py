"""Tiny random-weight backbones and hand-built inputs, for tests and benchmarks.

Real transformers classes built from configs; no tokenizer or hub access needed.
(``vif.tiny`` builds full saved checkpoints with tokenizer and processor.)
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0


def tiny_llava_config(
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
    intermediate_size: int | None = None,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP vision tower, Llama LLM, 2-layer MLP projector."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", **kwargs) -> LlavaForConditionalGeneration:
    """A tiny random LLaVA in fp32, eval mode."""
    torch.manual_seed(seed)
    config = tiny_llava_config(**kwargs)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.eval()


def tokens_per_image(model: LlavaForConditionalGeneration) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def pad_sequences(
    sequences: list[torch.Tensor], padding_side: str, answer_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pads 1-D token sequences into ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, L)``.

    The last ``answer_len`` tokens of each sequence are labelled (their own ids), the rest ``-100``.
    """
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), PAD_TOKEN_ID)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100)
    for b, seq in enumerate(sequences):
        sl = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
        ids[b, sl], mask[b, sl] = seq, 1
        if answer_len:
            labels[b, sl][-answer_len:] = seq[-answer_len:]
    return ids, mask, labels


def llava_batch(
    model: LlavaForConditionalGeneration,
    samples: list[tuple[int, int, int]],
    padding_side: str = "left",
    seed: int = 0,
    with_labels: bool = False,
    answer_len: int = 3,
) -> dict[str, torch.Tensor]:
    """A padded batch of hand-built sequences.

    Each sample is ``(n_images, prefix_len, suffix_len)``: ``prefix_len`` text tokens,
    then each image's placeholder tokens separated by two text tokens, then
    ``suffix_len`` text tokens (the last ``answer_len`` of which are labelled when
    ``with_labels``).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    per_image = tokens_per_image(model)
    sequences, n_total = [], 0
    for n_images, prefix, suffix in samples:
        text = lambda n: torch.randint(4, vocab, (n,), generator=g)  # noqa: E731
        parts = [text(prefix)]
        for i in range(n_images):
            parts.append(torch.full((per_image,), IMAGE_TOKEN_ID))
            if i < n_images - 1:
                parts.append(text(2))
        parts.append(text(suffix))
        sequences.append(torch.cat(parts))
        n_total += n_images
    ids, mask, labels = pad_sequences(sequences, padding_side, answer_len if with_labels else 0)
    vision = model.config.vision_config
    batch = {"input_ids": ids, "attention_mask": mask}
    if n_total:
        batch["pixel_values"] = torch.randn(n_total, 3, vision.image_size, vision.image_size, generator=g)
    if with_labels:
        batch["labels"] = labels
    return batch


# ---------------------------------------------------------------------------------- Qwen-VL
# Token ids of the hand-built Qwen batches (the tiny configs below use them; real
# checkpoints read theirs from the config).
QWEN_IMAGE_TOKEN_ID = IMAGE_TOKEN_ID
QWEN_VIDEO_TOKEN_ID = 4
QWEN_VISION_START_ID = 5
QWEN_VISION_END_ID = 6
QWEN_FIRST_TEXT_ID = 7
QWEN_FAMILIES = ("qwen2_5_vl", "qwen2_vl")


def tiny_qwen_config(
    family: str = "qwen2_5_vl",
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 128,
):
    """A Qwen2.5-VL (``family="qwen2_5_vl"``) or Qwen2-VL (``"qwen2_vl"``) config with a tiny LLM.

    The vision tower keeps the real models' patching (patch 14, temporal patch 2, 2 x 2
    merge: ``pixel_values`` rows are 1176 wide, an image of ``2h x 2w`` patches gives
    ``h x w`` LLM tokens) and M-RoPE sections that add up to ``head_dim / 2``.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    half = hidden_size // num_heads // 2
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8],
        },
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    ids = dict(
        image_token_id=QWEN_IMAGE_TOKEN_ID,
        video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START_ID,
        vision_end_token_id=QWEN_VISION_END_ID,
    )
    patching = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden_size,
            window_size=56,  # 2 x 2 merged tokens per window: windowed attention runs on tiny images
            fullatt_block_indexes=[1],
            **patching,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=2, **patching)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"family must be one of {QWEN_FAMILIES}, got {family!r}")


def tiny_qwen(family: str = "qwen2_5_vl", seed: int = 0, attn_implementation: str = "sdpa", **kwargs):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration``, fp32, eval."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_qwen_config(family, **kwargs)
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls(config)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.eval()


def qwen_batch(
    model,
    samples: list[tuple[list[tuple[int, int]], int, int]],
    padding_side: str = "left",
    seed: int = 0,
    with_labels: bool = False,
    answer_len: int = 3,
) -> dict[str, torch.Tensor]:
    """A padded Qwen-VL batch built by hand, as the real processor lays it out.

    Each sample is ``(grids, prefix_len, suffix_len)`` with ``grids`` the ``(rows, cols)``
    LLM-token grid of each of its images: ``prefix_len`` text tokens, then per image
    ``<|vision_start|>``, ``rows * cols`` image pads, ``<|vision_end|>`` (images separated
    by two text tokens), then ``suffix_len`` text tokens (the last ``answer_len`` labelled
    when ``with_labels``). Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids``
    (1 on image pads: M-RoPE positions), and for batches with images ``pixel_values
    (sum 4 * rows * cols, 1176)`` and ``image_grid_thw (n_images, 3) = (1, 2 rows, 2 cols)``
    in patches, images in sequence order.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    vision = model.config.vision_config
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    sequences, grid_thw = [], []
    for grids, prefix, suffix in samples:
        text = lambda n: torch.randint(QWEN_FIRST_TEXT_ID, vocab, (n,), generator=g)  # noqa: E731
        parts = [text(prefix)]
        for i, (rows, cols) in enumerate(grids):
            parts += [
                torch.tensor([QWEN_VISION_START_ID]),
                torch.full((rows * cols,), QWEN_IMAGE_TOKEN_ID),
                torch.tensor([QWEN_VISION_END_ID]),
            ]
            if i < len(grids) - 1:
                parts.append(text(2))
            grid_thw.append((1, merge * rows, merge * cols))
        parts.append(text(suffix))
        sequences.append(torch.cat(parts))
    ids, mask, labels = pad_sequences(sequences, padding_side, answer_len if with_labels else 0)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == QWEN_IMAGE_TOKEN_ID).long(),
    }
    if grid_thw:
        thw = torch.tensor(grid_thw)
        batch["pixel_values"] = torch.randn(int(thw.prod(-1).sum()), patch_dim, generator=g)
        batch["image_grid_thw"] = thw
    if with_labels:
        batch["labels"] = labels
    return batch


def qwen_sample(batch: dict[str, torch.Tensor], index: int, model) -> dict[str, torch.Tensor]:
    """Sample ``index`` of a left-padded :func:`qwen_batch`, unpadded, with only its own images."""
    length = int(batch["attention_mask"][index].sum())
    single = {
        k: batch[k][index : index + 1, -length:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")
    }
    if "image_grid_thw" not in batch:
        return single
    # Images are in sequence order: this sample's are those after the earlier samples' ones.
    pads_per_image = batch["image_grid_thw"].prod(-1) // model.config.vision_config.spatial_merge_size**2
    counts = (batch["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum(-1).tolist()
    first, before = 0, sum(counts[:index])
    while before > 0:
        before -= int(pads_per_image[first])
        first += 1
    last, own = first, counts[index]
    while own > 0:
        own -= int(pads_per_image[last])
        last += 1
    if last == first:
        return single
    rows = batch["image_grid_thw"].prod(-1)
    start = int(rows[:first].sum())
    single["pixel_values"] = batch["pixel_values"][start : start + int(rows[first:last].sum())]
    single["image_grid_thw"] = batch["image_grid_thw"][first:last]
    return single


# --------------------------------------------------------------------------- coloured squares
#: A 12 px square of each colour on a wide black 48 x 32 image (wide: pad, resize and keep differ).
SQUARE_COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "white": (255, 255, 255)}
SQUARE_QUESTION = "what color is the square"
SQUARE_WORDS = [SQUARE_QUESTION, "it is red blue green white"]


def write_colour_squares(
    folder, names=tuple(SQUARE_COLOURS), image_prefix: str = ""
) -> tuple[list[dict], list[dict]]:
    """Writes ``<name>.png`` for each colour into ``folder``.

    Returns the LLaVA-format training records (answer "it is <name>") and the benchmark records
    (answer "<name>"), whose ``image`` is ``image_prefix + "<name>.png"``.
    """
    from pathlib import Path

    from PIL import Image

    samples, bench = [], []
    for i, name in enumerate(names):
        image = Image.new("RGB", (48, 32), (0, 0, 0))
        image.paste(Image.new("RGB", (12, 12), SQUARE_COLOURS[name]), (4 + 9 * i, 4 + 4 * i))
        image.save(Path(folder) / f"{name}.png")
        path = f"{image_prefix}{name}.png"
        turns = [
            {"from": "human", "value": f"<image>\n{SQUARE_QUESTION}"},
            {"from": "gpt", "value": f"it is {name}"},
        ]
        samples.append({"id": name, "image": path, "conversations": turns})
        bench.append({"id": name, "image": path, "question": SQUARE_QUESTION, "answer": name})
    return samples, bench
