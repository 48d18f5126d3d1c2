"""LLaVA-1.5 family (``LlavaForConditionalGeneration``): fixed square grid per image."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .base import BackboneAdapter, BackboneError, register_backbone


@register_backbone
class LlavaAdapter(BackboneAdapter):
    """Image tokens are ``config.image_token_id`` placeholders, ``(S/P)^2`` per image, row-major.

    LLaVA-1.5 (CLIP ViT-L/14 at 336 px, "default" feature strategy that drops CLS)
    gives 24 x 24 = 576 tokens per image.
    """

    model_types = ("llava",)

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def vision_encoder_output(self) -> nn.Module:
        # The projector reads the CLIP features of every image token (CLS dropped), image by image.
        return self.model.model.multi_modal_projector

    def grid(self) -> tuple[int, int]:
        config = self.model.config
        if config.vision_feature_select_strategy != "default":
            raise BackboneError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} keeps the CLS "
                "token, which has no place on the image grid; VIF supports the 'default' strategy "
                "(LLaVA-1.5's), one token per patch."
            )
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side, side

    def image_token_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        return inputs["input_ids"] == self.model.config.image_token_id

    def image_grids(self, inputs: dict[str, Any], image_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
        rows, cols = self.grid()
        per_image = rows * cols
        counts = image_mask.sum(-1).tolist()
        grids = []
        for b, count in enumerate(counts):
            if count % per_image:
                raise BackboneError(
                    f"sample {b} has {count} image tokens, not a multiple of the {per_image} tokens "
                    f"({rows} x {cols}) one image fills. Build prompts with the model's processor so each "
                    "<image> placeholder is expanded to exactly one image's tokens."
                )
            grids.append([(rows, cols)] * (count // per_image))
        pixel_values = inputs.get("pixel_values")
        n_images = sum(len(g) for g in grids)
        if pixel_values is not None and pixel_values.shape[0] != n_images:
            raise BackboneError(
                f"input_ids hold image tokens for {n_images} images but pixel_values has "
                f"{pixel_values.shape[0]} images; give one image per <image> placeholder."
            )
        return grids
