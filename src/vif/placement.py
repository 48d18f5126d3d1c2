"""Where a model computes, also when accelerate placed it (``device_map``, CPU / disk offload).

With accelerate, an offloaded module's weights sit on the ``meta`` device and are brought in
by a hook for each call, so "the device of the first parameter" may be no device at all. These
two functions ask the hook first.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def execution_device(module: nn.Module) -> torch.device | None:
    """accelerate's execution device of ``module``, else the device of its first real parameter."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the execution device of its input embeddings."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    found = execution_device(embeddings) if embeddings is not None else None
    return found or execution_device(model) or torch.device("cpu")
