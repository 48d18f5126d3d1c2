"""lmms-eval model classes for a saved VLM with an optional VIF adapter.

    python -m lmms_eval --model vif_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,vif=runs/vif-adapter \\
        --tasks gqa,vstar_bench,hrbench4k --batch_size 8 --output_path results/

``--model_args``:

* ``pretrained``: model folder or hub id (loaded with :func:`vif.loading.load_model`);
* ``vif``: a VIF adapter folder (``VIFModel.save_pretrained``); omit it for the base model;
* ``alpha``: override the adapter's injection strength (0 = no injection);
* ``dtype`` (``auto | bfloat16 | float16 | float32``), ``attn_implementation``
  (``sdpa | eager``), ``max_new_tokens`` (the default when a task sets none; 128),
  ``image_aspect`` (``pad`` - LLaVA-1.5's square padding, ``vif train``'s default - ``| resize | keep``);
* the device and batch size come from lmms-eval's ``--device`` and ``--batch_size``.

These are "chat" models (lmms-eval's default mode): the task's messages are rendered by
the processor's chat template and generated greedily in left-padded batches of
``--batch_size``, by the same code as ``vif eval`` (:mod:`vif.eval.generation`).
Generation-only: tasks scored by log-likelihood are refused with a clear error. One
process (no ``accelerate launch`` data parallelism).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from PIL import Image
from tqdm.auto import tqdm

from ..loading import load_model
from .generation import IMAGE_ASPECTS, generate_answers

DEFAULT_MAX_NEW_TOKENS = 128


def _to_image(url: Any) -> Image.Image:
    if isinstance(url, Image.Image):
        return url.convert("RGB")
    if isinstance(url, str | Path) and Path(url).is_file():
        with Image.open(url) as image:
            return image.convert("RGB")
    raise ValueError(
        f"cannot use {type(url).__name__} {str(url)[:80]!r} as an image (expected a PIL image or a file)"
    )


def messages_and_images(raw_messages: Any, task: str) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """lmms-eval chat messages -> (transformers processor messages, the images in order)."""
    chat = ChatMessages(messages=raw_messages)
    messages, images = [], []
    for message in chat.messages:
        content = []
        for item in message.content:
            if item.type == "text":
                content.append({"type": "text", "text": item.text})
            elif item.type == "image":
                content.append({"type": "image"})
                images.append(_to_image(item.url))
            else:
                raise ValueError(
                    f"task {task!r} sends {item.type} input; the vif lmms-eval models take images and text only."
                )
        messages.append({"role": message.role, "content": content})
    return messages, images


def greedy_settings(
    gen_kwargs: dict[str, Any], task: str, default_max_new_tokens: int
) -> tuple[int, list[str]]:
    """``(max_new_tokens, stop strings)`` of a task's generation kwargs; refuses sampling / beams."""
    if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
        raise ValueError(
            f"task {task!r} asks for sampling ({gen_kwargs}); the vif models generate greedily. "
            "Set do_sample: false and temperature: 0 in the task's generation_kwargs."
        )
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise ValueError(
            f"task {task!r} asks for beam search ({gen_kwargs}); the vif models generate greedily."
        )
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens), until


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string (lmms-eval's ``until`` semantics)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


class VIFChat(lmms):
    """A saved VLM (+ optional VIF adapter) as an lmms-eval chat model (``--model vif``)."""

    is_simple = False
    # model_type values this class accepts (empty: any backbone vif supports).
    model_types: tuple[str, ...] = ()

    def __init__(
        self,
        pretrained: str,
        vif: str | None = None,
        alpha: float | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        attn_implementation: str = "sdpa",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        image_aspect: str = "pad",
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown --model_args {sorted(unknown)}; the vif models take pretrained, vif, alpha, dtype, "
                "attn_implementation, max_new_tokens, image_aspect (device and batch size: lmms-eval's "
                "--device and --batch_size)."
            )
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        if str(batch_size).startswith("auto") or max_batch_size is not None:
            raise ValueError(
                "--batch_size auto / --max_batch_size are not supported by the vif models; give --batch_size N."
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "the vif lmms-eval models run in one process; launch without accelerate/torchrun."
            )
        overrides = {} if alpha is None else {"alpha": float(alpha)}
        model, processor = load_model(
            pretrained,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            adapter=vif,
            **overrides,
        )
        model_type = model.config.model_type
        if self.model_types and model_type not in self.model_types:
            raise ValueError(
                f"{pretrained} is a {model_type!r} model but this lmms-eval model name expects "
                f"{' / '.join(self.model_types)}; use --model vif (any backbone) or the matching vif_<backbone>."
            )
        self._model = model
        self.processor = processor
        self.pretrained = pretrained
        self.adapter = vif
        self.batch_size_per_gpu = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)
        self.image_aspect = image_aspect

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    def _conversation(self, request: Instance) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        _ctx, doc_to_messages, _gen_kwargs, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        return messages_and_images(doc_to_messages(doc), task)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, batched over requests that share generation kwargs, in request order."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[2], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)

        answers: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="vif responding", unit="sample", disable=self.rank != 0) as bar:
            for indices in groups.values():
                first = requests[indices[0]].args
                max_new_tokens, until = greedy_settings(first[2], first[4], self.default_max_new_tokens)
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    conversations, images = zip(*(self._conversation(requests[i]) for i in chunk))
                    texts = generate_answers(
                        self._model,
                        self.processor,
                        conversations,
                        images,
                        max_new_tokens,
                        image_aspect=self.image_aspect,
                    )
                    for i, text in zip(chunk, texts):
                        answers[i] = cut_at_stop(text, until)
                        self.cache_hook.add_partial("generate_until", requests[i].args[:1], answers[i])
                    bar.update(len(chunk))
        return [answer if answer is not None else "" for answer in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the vif lmms-eval models only generate; this task is scored by log-likelihood. "
            "Use the generation variant of the task (output_type: generate_until)."
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vif lmms-eval models do not support multi-round tasks.")


class VIFLlava(VIFChat):
    """``--model vif_llava``: a LLaVA-1.5 folder (+ VIF adapter)."""

    model_types = ("llava",)


class VIFQwen2_5_VL(VIFChat):
    """``--model vif_qwen2_5_vl``: a Qwen2.5-VL folder (+ VIF adapter)."""

    model_types = ("qwen2_5_vl",)
