"""Loading a saved vision-language model (+ processor, + optional VIF adapter) from a folder.

One function every entry point uses (``vif train``, ``vif eval``, ``vif diagnose``,
``vif demo``), so a tiny local checkpoint and ``llava-hf/llava-1.5-7b-hf`` go through
the same code. The checks that need no weights (:func:`model_config`, :func:`check_device`,
:func:`parse_dtype`) are separate functions, so the command lines run them before loading.

Dtype names are the same everywhere (load, CLIs, training recipes): ``fp32`` / ``float32``,
``bf16`` / ``bfloat16``, ``fp16`` / ``float16``, and ``auto`` = transformers' meaning, the
dtype the checkpoint was saved in (``config.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)  # what every --dtype / precision option accepts


class ModelLoadError(ValueError):
    """A model path, device or dtype that cannot be loaded; the message names the fix."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """A torch dtype, or ``"auto"`` (the checkpoint's dtype) for ``None`` / ``"auto"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return "auto"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {list(DTYPE_CHOICES)}.")
    return DTYPES[dtype]


def resolve_dtype(dtype: str | torch.dtype | None, device: str | None = None) -> torch.dtype | str:
    """Kept for callers of the old name: :func:`parse_dtype` after checking it fits ``device``."""
    parsed = parse_dtype(dtype)
    if device is not None:
        check_device(device, parsed)
    return parsed


def check_device(device: str | torch.device, dtype: torch.dtype | str = "auto") -> torch.device:
    """``device`` as a torch device, if this machine has it and it runs ``dtype``; else ModelLoadError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"unknown device {str(device)!r} ({err}); use cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {str(device)!r} was asked for but torch sees no CUDA GPU here "
                f"(torch {torch.__version__}); use --device cpu, or a CUDA build of torch on a GPU machine."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ModelLoadError(
                f"bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32."
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError("device 'mps' was asked for but this machine has no MPS backend.")
    elif device.type != "cpu":
        raise ModelLoadError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps.")
    return device


def _lora_base(path: Path) -> str | None:
    lora = path / "adapter_config.json"
    if not lora.is_file():
        return None
    base = json.loads(lora.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{lora} names no base_model_name_or_path; cannot find the model to merge into.")
    return base


def model_config(path: str | Path) -> Any:
    """The transformers config of a model folder, LoRA folder or hub id, without loading weights.

    Raises :class:`ModelLoadError` naming the path (and what is missing) when there is no
    model there.
    """
    from transformers import AutoConfig

    local = Path(path).expanduser()
    if local.is_dir():
        base = _lora_base(local)
        if base is not None:
            return model_config(base)
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {str(path)!r} has no config.json; give a folder written by save_pretrained "
                "(model + processor), a vif train output folder, or a hub id."
            )
    elif local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
        raise ModelLoadError(
            f"model {str(path)!r} is not a folder; give a save_pretrained folder or a hub id."
        )
    try:
        return AutoConfig.from_pretrained(str(local) if local.is_dir() else str(path))
    except Exception as err:  # no such folder / repo, offline without a cached copy, unknown model type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"cannot read the model config of {str(path)!r}: {first}. Give a local save_pretrained folder, or a "
            "hub id you can reach (offline: one in the local hub cache)."
        ) from None


def check_vision_language(config: Any, path: str | Path) -> None:
    """Refuses a config that is not a vision-language model VIF has a backbone adapter for."""
    from .backbones.base import _REGISTRY

    if getattr(config, "vision_config", None) is None:
        raise ModelLoadError(
            f"{str(path)!r} is a {getattr(config, 'model_type', '?')!r} model, not a vision-language model; VIF "
            "needs image tokens. Give a VLM such as LLaVA-1.5 or Qwen2.5-VL."
        )
    if config.model_type not in _REGISTRY:
        raise ModelLoadError(
            f"{str(path)!r} is a {config.model_type!r} model, which VIF has no backbone adapter for; known: "
            f"{sorted(_REGISTRY)} (docs/backbones.md says how to add one)."
        )


def disable_progress_bars() -> None:
    """Silences the weight-loading and download bars of transformers and huggingface_hub."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def load_model(
    path: str | Path,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str = "sdpa",
    adapter: str | Path | None = None,
    *,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
    **adapter_overrides: Any,
) -> tuple[nn.Module, Any]:
    """A saved VLM and its processor, optionally with a saved VIF adapter attached.

    Args:
        path: a folder written by ``save_pretrained`` (model + processor) or a hub id; or a PEFT
            LoRA adapter folder with its processor (``vif train`` LoRA output), merged onto its base.
        device: ``"cpu"``, ``"cuda"``, ... (default: cuda when available). Not with ``device_map``.
        dtype: ``"auto"`` (default: the checkpoint's dtype, as in transformers), ``"fp32"`` /
            ``"float32"``, ``"bf16"`` / ``"bfloat16"``, ``"fp16"`` / ``"float16"``, or a torch dtype.
        attn_implementation: the language model's base attention (``"sdpa"`` or ``"eager"``).
        adapter: a ``VIFModel.save_pretrained`` folder or hub id; the model comes back as a ``VIFModel``.
        device_map: accelerate's placement (``"auto"``, ``"balanced"``, or a module -> device dict
            with ``"cpu"`` / ``"disk"`` entries for offloading), passed to ``from_pretrained``.
        offload_folder: where ``"disk"`` entries of ``device_map`` go.
        adapter_overrides: inference-time VIF config fields (``alpha``, ``injection``, ...).

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from transformers import AutoModelForImageTextToText

    from .tiny import load_processor

    if device is not None and device_map is not None:
        raise ModelLoadError("give either device or device_map, not both.")
    torch_dtype = parse_dtype(dtype)
    if device_map is None:
        device = str(check_device(device or default_device(), torch_dtype))
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = {"device_map": device_map}
        if offload_folder is not None:
            placement["offload_folder"] = str(offload_folder)
    processor = load_processor(path)
    base_path = _lora_base(Path(path))
    if base_path is not None:
        # A PEFT (LoRA) adapter folder, as `vif train` writes for LoRA runs: load its base model
        # and merge the adapter in, so the result is a plain model of the base's class.
        if device_map is not None:
            raise ModelLoadError(
                f"{path} is a LoRA adapter folder; merging it needs the whole model on one device. Load it "
                "with device=..., save the merged model (model.save_pretrained), then use device_map on that."
            )
        from peft import PeftModel

        model = AutoModelForImageTextToText.from_pretrained(
            base_path, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, **placement
        )
    if device_map is None:
        model = model.to(device)
    model = model.eval()
    if adapter is not None:
        from .model import VIFModel

        model = VIFModel.from_pretrained(model, adapter, **adapter_overrides).eval()
    return model, processor
