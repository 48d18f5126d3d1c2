"""vif: Variational Information Flow for multimodal LLMs on Hugging Face transformers.

import vif
vmodel = vif.attach(model, vif.VIFConfig.preset("paper", model))
"""

from . import convert  # noqa: F401  (vif.convert.from_authors after `import vif`)
from .backbones import BackboneAdapter, BackboneError, VisionLayout, get_backbone, register_backbone
from .config import VIFConfig, VIFConfigError
from .diagnostics import diagnose
from .model import VIFLoadError, VIFModel, VIFOutput, attach

__version__ = "0.1.0"

__all__ = [
    "BackboneAdapter",
    "BackboneError",
    "VIFConfig",
    "VIFConfigError",
    "VIFLoadError",
    "VIFModel",
    "VIFOutput",
    "VisionLayout",
    "attach",
    "diagnose",
    "get_backbone",
    "register_backbone",
]
