"""The backbone adapter interface: what VIF needs to know about a model family.

An adapter provides three things:

1. **where the decoder layers are** - :meth:`BackboneAdapter.decoder_layers` (and the
   attention module inside a layer, :meth:`BackboneAdapter.attention_module`);
2. **where the image tokens are** - positions in the sequence of every image token,
   found from the forward's inputs (:meth:`BackboneAdapter.image_token_mask`);
3. **each image's grid** - the ``(rows, cols)`` token grid of every image, in the order
   the images' tokens appear (:meth:`BackboneAdapter.image_grids`).

From these the shared code builds a :class:`VisionLayout` (positions and per-token
coordinates in each image's unit square). Adding a model family is one file with
one subclass, registered with :func:`register_backbone`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..gmm import grid_coordinates


class BackboneError(ValueError):
    """Inputs or a model that a backbone adapter cannot handle; the message names the fix."""


@dataclass
class VisionLayout:
    """Where the image tokens of a batch are.

    positions: ``(B, Nv)`` sequence index of each image token, ascending per sample,
        padded with ``seq_len`` (past the end) where a sample has fewer tokens.
    valid: ``(B, Nv)`` bool, False on padding entries.
    coords: ``(B, Nv, 2)`` each token's ``(x, y)`` centre in its image's unit square.
    grids: per sample, the ``(rows, cols)`` grid of each of its images, in sequence order.
    seq_len: length of the sequence the layout was computed for (the prompt at generation).
    span: ``(first, end)``: every image token of the batch lies in sequence slots
        ``first <= i < end`` (``(0, 0)`` without images).
    inside: ``(lo, hi)``: the slots from a sample's first image token up to (not including)
        its last, joined over the batch: the rows that see only part of their sample's
        images (``(0, 0)``: none).
    gaps: ``(lo, hi)``: as ``inside``, but only where a sample's images are not one
        contiguous run (text between images): the text rows that see part of the images.
    first_after: the first slot that follows every image token of some sample: text
        rows before it see none or part of their sample's images.
    image_rows: ``(B_img,)`` index of the samples that hold an image token.

    The host-side facts (``span``, ``inside``, ``gaps``, the counts) are read once per
    prompt, in one host sync, so the per-layer work of VIF never waits on the device.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    coords: torch.Tensor
    grids: list[list[tuple[int, int]]]
    seq_len: int
    span: tuple[int, int] = (0, 0)
    inside: tuple[int, int] = (0, 0)
    gaps: tuple[int, int] = (0, 0)
    first_after: int = 0
    image_rows: torch.Tensor | None = None

    @property
    def has_image(self) -> torch.Tensor:
        """``(B,)`` bool: which samples hold at least one image token."""
        return self.valid.any(-1)

    def token_mask(self, length: int | None = None) -> torch.Tensor:
        """``(B, length)`` bool, True at image-token positions (length defaults to ``seq_len``)."""
        length = self.seq_len if length is None else length
        mask = torch.zeros(
            self.positions.shape[0], length + 1, dtype=torch.bool, device=self.positions.device
        )
        mask.scatter_(1, self.positions.clamp(max=length), self.valid)
        return mask[:, :length]

    def select(self, index: torch.Tensor) -> VisionLayout:
        """The layout of batch rows ``index`` (row ``r`` becomes old row ``index[r]``), e.g. after a beam reorder.

        ``span``, ``inside``, ``gaps`` and ``first_after`` cover the whole old batch, so they
        stay true (conservative) for any selection of its rows.
        """
        host = index.tolist()
        rows = index.to(self.positions.device)
        return dataclasses.replace(
            self,
            positions=self.positions.index_select(0, rows),
            valid=self.valid.index_select(0, rows),
            coords=self.coords.index_select(0, rows),
            grids=[self.grids[i] for i in host],
            image_rows=torch.tensor(
                [r for r, i in enumerate(host) if self.grids[i]], dtype=torch.long, device=rows.device
            ),
        )


def _union(ranges: list[tuple[int, int]]) -> tuple[int, int]:
    ranges = [r for r in ranges if r[1] > r[0]]
    return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0, 0)


def build_layout(
    image_mask: torch.Tensor, grids: list[list[tuple[int, int]]], grid_mode: str = "centers"
) -> VisionLayout:
    """Turns an image-token mask ``(B, L)`` and per-sample image grids into a :class:`VisionLayout`.

    Image tokens of one sample are assigned to its images in order; each image's
    tokens are its grid in row-major order. Raises :class:`BackboneError` if a sample's
    token count does not equal the sum of its images' grid sizes.
    """
    batch, seq_len = image_mask.shape
    device = image_mask.device
    slot = torch.arange(seq_len, device=device)
    first = torch.where(image_mask, slot, seq_len).amin(-1) if seq_len else slot.new_zeros(batch)
    last = torch.where(image_mask, slot, -1).amax(-1) if seq_len else slot.new_zeros(batch)
    # The layout's only host sync: counts and first / last image slot of every sample.
    counts, firsts, lasts = torch.stack([image_mask.sum(-1), first, last]).tolist() if batch else ([], [], [])
    for b, (count, sample_grids) in enumerate(zip(counts, grids)):
        expected = sum(h * w for h, w in sample_grids)
        if count != expected:
            raise BackboneError(
                f"sample {b} has {count} image tokens in input_ids but its images' grids "
                f"{sample_grids} need {expected}. The prompt's image placeholders must be expanded "
                "by the model's processor (one placeholder per image token)."
            )
    width = max(counts) if counts else 0
    # Image slots first, each sample's in sequence order; then padding entries at seq_len.
    order = torch.where(image_mask, slot, slot + seq_len).sort(dim=1).values[:, :width]
    valid = torch.arange(width, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    positions = torch.where(valid, order, seq_len)
    coords = torch.zeros(batch, width, 2, dtype=torch.float32)
    for b, n in enumerate(counts):
        if n:
            coords[b, :n] = torch.cat([grid_coordinates(h, w, grid_mode) for h, w in grids[b]])
    with_image = [b for b, n in enumerate(counts) if n]
    span = _union([(firsts[b], lasts[b] + 1) for b in with_image])
    inside = _union([(firsts[b], lasts[b]) for b in with_image])
    gaps = _union([(firsts[b] + 1, lasts[b]) for b in with_image if lasts[b] - firsts[b] + 1 > counts[b]])
    first_after = min((lasts[b] + 1 for b in with_image), default=0)
    return VisionLayout(
        positions,
        valid,
        coords.to(device),
        grids,
        seq_len,
        span,
        inside,
        gaps,
        first_after,
        torch.tensor(with_image, dtype=torch.long, device=device),
    )


class BackboneAdapter:
    """Base class: subclass once per model family (see ``llava.py``)."""

    #: ``config.model_type`` values this adapter handles.
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # 1. where the decoder layers are --------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def text_config(self) -> Any:
        return self.model.config.text_config

    def vision_encoder_output(self) -> nn.Module | None:
        """The module whose forward's first input is the vision encoder's output, one row per image
        token in the order of the image tokens (``(..., Dv)``); None when the LLM's input
        embeddings at the image tokens are that output already (no separate projector)."""
        return None

    # 2. where the image tokens are ----------------------------------------------
    def image_token_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``(B, L)`` bool, True at image-token positions of ``inputs["input_ids"]``."""
        raise NotImplementedError

    # 3. each image's grid --------------------------------------------------------
    def image_grids(self, inputs: dict[str, Any], image_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per sample, the ``(rows, cols)`` token grid of each image, in sequence order."""
        raise NotImplementedError

    # shared -------------------------------------------------------------------------
    def vision_layout(self, inputs: dict[str, Any], grid_mode: str = "centers") -> VisionLayout:
        if inputs.get("input_ids") is None:
            raise BackboneError(
                "VIF needs input_ids to find the image tokens; calling the model with inputs_embeds "
                "only is not supported. Pass input_ids (and pixel_values) instead."
            )
        image_mask = self.image_token_mask(inputs)
        return build_layout(image_mask, self.image_grids(inputs, image_mask), grid_mode)


_REGISTRY: dict[str, type[BackboneAdapter]] = {}


def register_backbone(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Class decorator: makes an adapter available to :func:`get_backbone`."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def get_backbone(model: nn.Module) -> BackboneAdapter:
    """The adapter for ``model``, looked up by ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise BackboneError(
            f"VIF does not know the model type {model_type!r} ({type(model).__name__}). Known model types: "
            f"{sorted(_REGISTRY)}. To add one, write a BackboneAdapter subclass (see vif/backbones/base.py) "
            "and decorate it with @vif.register_backbone."
        )
    return _REGISTRY[model_type](model)
