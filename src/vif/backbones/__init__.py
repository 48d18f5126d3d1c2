"""Backbone adapters, one file per model family."""

from . import llava, qwen2_vl  # noqa: F401  (each registers its adapter)
from .base import BackboneAdapter, BackboneError, VisionLayout, build_layout, get_backbone, register_backbone

__all__ = [
    "BackboneAdapter",
    "BackboneError",
    "VisionLayout",
    "build_layout",
    "get_backbone",
    "register_backbone",
]
