"""Backbone adapters, one file per model family."""

from . import llava  # noqa: F401  (registers the adapter)
from .base import BackboneAdapter, BackboneError, VisionLayout, build_layout, get_backbone, register_backbone

__all__ = ["BackboneAdapter", "BackboneError", "VisionLayout", "build_layout", "get_backbone", "register_backbone"]
