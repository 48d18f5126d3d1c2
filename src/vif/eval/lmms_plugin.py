"""Registration of the VIF models with lmms-eval (>= 0.7), read through an entry point.

pyproject.toml declares::

    [project.entry-points."lmms_eval.models"]
    vif = "vif.eval.lmms_plugin:manifests"

lmms-eval calls :func:`manifests` while it builds its model registry, so this module
must stay cheap: the model classes in :mod:`vif.eval.lmms_model` (torch, transformers)
are imported only when one is chosen with ``--model``.

    python -m lmms_eval --model vif_llava --model_args pretrained=DIR,vif=ADAPTER_DIR --tasks gqa
"""

from __future__ import annotations

from typing import Any

MODEL_CLASSES = {
    "vif": "vif.eval.lmms_model.VIFChat",  # any backbone vif knows; the folder decides
    "vif_llava": "vif.eval.lmms_model.VIFLlava",
    "vif_qwen2_5_vl": "vif.eval.lmms_model.VIFQwen2_5_VL",
}


def manifests() -> list[Any]:
    """One lmms-eval ``ModelManifest`` per model name (chat-style classes: prompts go through
    the processor's chat template)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, chat_class_path=path) for name, path in MODEL_CLASSES.items()]
