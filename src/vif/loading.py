"""Loading a saved vision-language model (+ processor, + optional VIF adapter) from a folder.

One function every entry point uses (``vif train``, ``vif eval``, ``vif diagnose``,
``vif demo``), so a tiny local checkpoint and ``llava-hf/llava-1.5-7b-hf`` go through
the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` / ``"auto"``: bfloat16 on a GPU that has it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'.")
    return DTYPES[dtype]


def load_model(
    path: str | Path,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    adapter: str | Path | None = None,
    **adapter_overrides: Any,
) -> tuple[nn.Module, Any]:
    """A saved VLM and its processor, optionally with a saved VIF adapter attached.

    Args:
        path: a folder written by ``save_pretrained`` (model + processor) or a hub id; or a PEFT
            LoRA adapter folder with its processor (``vif train`` LoRA output), merged onto its base.
        device: ``"cpu"``, ``"cuda"``, ... (default: cuda when available).
        dtype: ``"float32" | "bfloat16" | "float16" | "auto"`` or a torch dtype.
        attn_implementation: the language model's base attention (``"sdpa"`` or ``"eager"``).
        adapter: a ``VIFModel.save_pretrained`` folder; the model comes back as a ``VIFModel``.
        adapter_overrides: inference-time VIF config fields (``alpha``, ``injection``, ...).

    Returns:
        ``(model, processor)``, the model in eval mode on ``device``.
    """
    from transformers import AutoModelForImageTextToText

    from .tiny import load_processor

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    processor = load_processor(path)
    lora = Path(path) / "adapter_config.json"
    if lora.is_file():
        # A PEFT (LoRA) adapter folder, as `vif train` writes for LoRA runs: load its base model
        # and merge the adapter in, so the result is a plain model of the base's class.
        import json

        from peft import PeftModel

        base_path = json.loads(lora.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{lora} names no base_model_name_or_path; cannot find the model to merge into.")
        model = AutoModelForImageTextToText.from_pretrained(
            base_path, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation
        )
    model = model.to(device).eval()
    if adapter is not None:
        from .model import VIFModel

        model = VIFModel.from_pretrained(model, adapter, **adapter_overrides).eval()
    return model, processor
