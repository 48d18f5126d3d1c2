"""Tiny random-weight checkpoints of REAL transformers VLM classes, built offline.

There is no model hub in tests or CI, yet we want every code path that a real run
takes - ``from_pretrained``, ``AutoProcessor``, the processor's image-token
expansion, the chat template - to be the real one. So we build a real tokenizer
(word-level, from the ``tokenizers`` library), a real image processor (the PIL
backends: torchvision is not required), a real model class with a tiny config, and
``save_pretrained`` all of it to a folder that loads like a hub checkpoint.

    out = build_tiny_llava(tmp_path / "llava", words=["what is in the picture", "a red square"])
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)

Sizes default to hidden 64, 8 decoder layers, a vocabulary of a few hundred words:
a CPU forward pass takes milliseconds.

Qwen2-VL / Qwen2.5-VL: their processors require a video processor, and the only
video processor in transformers 5.23 imports torchvision. ``Qwen2_5_VLImageOnlyProcessor``
(and ``Qwen2VLImageOnlyProcessor``) are the real processor classes with the video
slot removed; load a tiny Qwen folder with ``load_processor(path)`` (or the class's
own ``from_pretrained``), not ``AutoProcessor`` (see ``load_processor``).
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

# -----------------------------------------------------------------------------
# Chat templates

# LLaVA-1.5 / Vicuna-v1 conversation format, as LLaVA-1.5 was trained:
#   "USER: <image>\nWhat is this? ASSISTANT: a cat</s>USER: ... ASSISTANT: ...</s>"
# Content may be a plain string or a list of {"type": "image"} / {"type": "text"} items
# (the format transformers processors use); items are rendered in order. Unlike the
# llava-hf hub template, the assistant turn ends with "</s>" so that the model learns
# to stop (the original LLaVA training recipe, sep2="</s>").
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set prefix = '' -%}"
    "{%- elif message['role'] == 'user' -%}{%- set prefix = 'USER: ' -%}"
    "{%- else -%}{%- set prefix = 'ASSISTANT: ' -%}{%- endif -%}"
    "{{- prefix -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Qwen2-VL / Qwen2.5-VL instruct template (the hub one, minus tools and the
# add_vision_id option): a default system prompt, one "<|im_start|>role\n...<|im_end|>\n"
# block per message, each image as "<|vision_start|><|image_pad|><|vision_end|>".
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# -----------------------------------------------------------------------------
# Word-level tokenizer

# Special tokens, in id order. Special tokens are "added tokens" matched on the raw
# text before normalisation / pre-tokenisation, so "<image>" is one token, never "<", "image", ">".
LLAVA_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
LLAVA_ROLE_TOKENS = ("USER", "ASSISTANT")  # upper case: distinct from the words "user" / "assistant"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",  # Qwen's pad token
    "<unk>",  # Qwen's byte-level BPE never needs one; a word-level vocabulary does
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Words every tiny vocabulary gets: the template texts and some common filler, so that
# ad-hoc test prompts rarely hit <unk>.
BASE_WORDS = (
    "user assistant system you are a helpful assistant what is in the this that image picture photo "
    "describe color colour of and or yes no it there"
).split()

TokenizerStyle = Literal["llava", "qwen"]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # words (\w+), then every punctuation character and digit on its own, so that any
    # number or punctuation run is representable with a small vocabulary.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Whitespace(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def build_word_tokenizer(
    words: Iterable[str], model_max_length: int = 512, style: TokenizerStyle = "llava"
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with a chat template, built without any download.

    ``words`` may be single words or whole sentences: they are split with the
    tokenizer's own pre-tokenizer (lower-cased), so passing the texts of a test data set
    guarantees no ``<unk>``. ASCII punctuation, digits and ``BASE_WORDS`` are always in.

    style="llava": Llama/Vicuna-like. Special tokens ``<pad> <unk> <s> </s> <image>``
    (ids 0-4) and the role words ``USER`` / ``ASSISTANT``; a BOS ``<s>`` is prepended
    on encode (as Llama's tokenizer does); chat template ``LLAVA_CHAT_TEMPLATE``.
    style="qwen": Qwen's special tokens (``QWEN_SPECIAL_TOKENS``, pad ``<|endoftext|>``,
    eos ``<|im_end|>``), no BOS, chat template ``QWEN_CHAT_TEMPLATE``.

    Decoding is lossy (lower case, words joined by spaces).
    """
    pre = _pre_tokenizer()
    vocab_words: set[str] = set(BASE_WORDS) | set(string.ascii_lowercase) | set(string.digits)
    vocab_words |= set(string.punctuation)
    for text in words:
        vocab_words.update(piece for piece, _ in pre.pre_tokenize_str(text.lower()))

    if style == "llava":
        specials = list(LLAVA_SPECIAL_TOKENS) + list(LLAVA_ROLE_TOKENS)
    elif style == "qwen":
        specials = list(QWEN_SPECIAL_TOKENS)
    else:
        raise ValueError(f"style must be 'llava' or 'qwen', got {style!r}")
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in sorted(vocab_words - set(specials)):
        vocab[word] = len(vocab)

    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    # WordPiece decoder = join with spaces + clean up " ?" -> "?" (there are no "##" pieces)
    tok.decoder = decoders.WordPiece()
    # normalized=False: match the raw text, so the Lowercase normaliser cannot turn "USER" into "user"
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])

    if style == "llava":
        bos_id = vocab["<s>"]
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            model_max_length=model_max_length,
            pad_token="<pad>",
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            # registers `tokenizer.image_token` / `image_token_id`, which LlavaProcessor reads
            extra_special_tokens={"image_token": "<image>"},
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        chat_template=QWEN_CHAT_TEMPLATE,
    )


# -----------------------------------------------------------------------------
# LLaVA-1.5


def tiny_llava_config(
    vocab_size: int,
    image_size: int = 96,
    patch_size: int = 12,
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    image_token_id: int = 4,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    max_position_embeddings: int = 2048,
) -> LlavaConfig:
    """LLaVA-1.5 architecture at toy size: CLIP vision tower -> 2-layer MLP projector -> Llama.

    As LLaVA-1.5: features from the second-to-last vision layer, "default" strategy
    (CLS dropped), so an image is ``(image_size // patch_size) ** 2`` LLM tokens,
    row-major over the patch grid. Default token ids match ``build_word_tokenizer``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=4 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def build_tiny_llava(
    out_dir: str | Path,
    words: Iterable[str] = (),
    image_size: int = 96,
    patch_size: int = 12,
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    **kw,
) -> Path:
    """Write a tiny random LLaVA-1.5 checkpoint (model, tokenizer, processor) to ``out_dir``.

    Loads back with ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir)`` (a ``LlavaProcessor`` with a
    ``CLIPImageProcessorPil``: resize shortest edge + centre crop to ``image_size``).
    Extra ``kw`` go to ``tiny_llava_config``. Returns ``Path(out_dir)``.
    """
    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(words)
    config = tiny_llava_config(
        vocab_size=len(tokenizer),
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kw,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)  # safetensors

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        # CLIP prepends a CLS token; "default" drops it again: tokens = patches + 1 - 1
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


# -----------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL


def _image_only_init(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
    # Same as Qwen2(.5)-VL's processor __init__ minus the video processor. ProcessorMixin
    # derives its sub-processor list from the __init__ signature, so leaving
    # `video_processor` out of it is what removes the slot (for save and load too).
    self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
    self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
    ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (which needs torchvision).

    Everything else - image-token expansion (``t*h*w / merge**2`` copies of
    ``<|image_pad|>``), ``mm_token_type_ids``, the chat template - is the real class's
    code. Works on real Qwen2.5-VL folders too: ``Qwen2_5_VLImageOnlyProcessor.from_pretrained(path)``.
    """

    __init__ = _image_only_init


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor; see ``Qwen2_5_VLImageOnlyProcessor``."""

    __init__ = _image_only_init


def load_processor(path: str | Path) -> ProcessorMixin:
    """Load a checkpoint's processor; Qwen-VL folders get the image-only processor.

    Why not plain ``AutoProcessor``: for a Qwen-VL folder without torchvision it cannot
    build the video processor, and for a folder saved by an image-only processor it
    silently returns just the tokenizer.
    """
    import json

    path = Path(path)
    config_file = path / "config.json"
    model_type = ""
    if config_file.exists():
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    # A folder with a processor but no model config (a LoRA adapter folder written by
    # `vif train`) names the processor class it was saved from.
    processor_file = path / "processor_config.json"
    processor_class = ""
    if processor_file.exists():
        processor_class = json.loads(processor_file.read_text()).get("processor_class", "")
    if model_type == "qwen2_5_vl" or processor_class == Qwen2_5_VLImageOnlyProcessor.__name__:
        return Qwen2_5_VLImageOnlyProcessor.from_pretrained(path)
    if model_type == "qwen2_vl" or processor_class == Qwen2VLImageOnlyProcessor.__name__:
        return Qwen2VLImageOnlyProcessor.from_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def _qwen_text_kwargs(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
) -> dict:
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    # M-RoPE splits the rotary frequencies into (temporal, height, width) sections that
    # must add up to head_dim / 2; the real models use [16, 24, 24] for head_dim 128.
    mrope_section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _save_qwen(
    out_dir: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    processor_cls: type[ProcessorMixin],
    min_pixels: int,
    max_pixels: int,
) -> Path:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    # patch 14, temporal patch 2, merge 2 as the real models: pixel_values rows are
    # 3 * 2 * 14 * 14 = 1176 wide and images are resized to multiples of 28 px.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    words: Iterable[str] = (),
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint (model, tokenizer, image-only processor).

    Load with ``Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)`` and
    ``load_processor(out_dir)`` (a ``Qwen2_5_VLImageOnlyProcessor`` with a
    ``Qwen2VLImageProcessorPil``). With the default pixel budget an image becomes
    between 2x2 and 4x4 merged tokens.
    """
    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(words, style="qwen")
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=vision_heads,
        out_hidden_size=hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,  # 2 x 2 merged tokens per window: exercises windowed attention on tiny images
        fullatt_block_indexes=[vision_depth - 1],
    )
    text = _qwen_text_kwargs(
        tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, max_position_embeddings
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _save_qwen(out_dir, model, tokenizer, Qwen2_5_VLImageOnlyProcessor, min_pixels, max_pixels)


def build_tiny_qwen2_vl(
    out_dir: str | Path,
    words: Iterable[str] = (),
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_embed_dim: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2-VL checkpoint; as ``build_tiny_qwen2_5_vl`` (``Qwen2VLImageOnlyProcessor``)."""
    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(words, style="qwen")
    vision = dict(
        depth=vision_depth,
        embed_dim=vision_embed_dim,
        hidden_size=hidden_size,  # Qwen2-VL's name for the merger's output width
        mlp_ratio=2,
        num_heads=vision_heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text = _qwen_text_kwargs(
        tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, max_position_embeddings
    )
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_token_ids(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    return _save_qwen(out_dir, model, tokenizer, Qwen2VLImageOnlyProcessor, min_pixels, max_pixels)
