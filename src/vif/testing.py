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
    sequences, label_rows, n_total = [], [], 0
    for n_images, prefix, suffix in samples:
        text = lambda n: torch.randint(4, vocab, (n,), generator=g)  # noqa: E731
        parts = [text(prefix)]
        for i in range(n_images):
            parts.append(torch.full((per_image,), IMAGE_TOKEN_ID))
            if i < n_images - 1:
                parts.append(text(2))
        parts.append(text(suffix))
        seq = torch.cat(parts)
        labels = torch.full_like(seq, -100)
        if with_labels:
            labels[-answer_len:] = seq[-answer_len:]
        sequences.append(seq)
        label_rows.append(labels)
        n_total += n_images
    length = max(len(s) for s in sequences)
    ids = torch.full((len(samples), length), PAD_TOKEN_ID)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), -100)
    for b, (seq, lab) in enumerate(zip(sequences, label_rows)):
        sl = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
        ids[b, sl], mask[b, sl], labels[b, sl] = seq, 1, lab
    vision = model.config.vision_config
    batch = {"input_ids": ids, "attention_mask": mask}
    if n_total:
        batch["pixel_values"] = torch.randn(n_total, 3, vision.image_size, vision.image_size, generator=g)
    if with_labels:
        batch["labels"] = labels
    return batch
