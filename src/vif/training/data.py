"""Training data: the shared LLaVA-format dataset, checked sample by sample against the model.

:class:`~vif.data.llava_format.LlavaFormatDataset` builds prompts with the backbone's
chat template and labels the assistant turns. What it cannot know is whether the
processor's image-token expansion matches what the *model* expects (a processor saved
for another resolution, a literal image token typed into the text): the model would
fail deep inside a forward with a batch index. :class:`CheckedDataset` checks every
item with the backbone adapter and names the sample id instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..backbones import BackboneError, get_backbone
from ..data.llava_format import BadImageError, LlavaFormatDataset, LlavaFormatError
from .recipe import Recipe, RecipeError


class TrainingDataError(ValueError):
    """A training sample that the model cannot take; names the sample id and the fix."""


class CheckedDataset(torch.utils.data.Dataset):
    """Items of ``dataset`` whose image tokens match their images, as the model counts them."""

    def __init__(self, dataset: LlavaFormatDataset, model: torch.nn.Module) -> None:
        self.dataset = dataset
        self.backbone = get_backbone(model)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        inputs = {"input_ids": item["input_ids"][None]}
        for key in ("pixel_values", "image_grid_thw"):
            if item.get(key) is not None:
                inputs[key] = item[key]
        if "mm_token_type_ids" in item:
            inputs["mm_token_type_ids"] = item["mm_token_type_ids"][None]
        try:
            self.backbone.vision_layout(inputs)
        except BackboneError as err:
            raise TrainingDataError(
                f"sample {item['id']!r} (item {i}): its image tokens do not match its image(s): {err} "
                "Check that the processor saved with the model is the one it was trained with, and that the "
                "text holds no literal image-placeholder tokens."
            ) from err
        return item


def build_dataset(recipe: Recipe, processor: Any, model: torch.nn.Module) -> CheckedDataset:
    """The recipe's training set; fails now (before training) on format errors and missing files."""
    data = recipe.data
    if not Path(data.json).is_file():
        raise RecipeError(f"data.json {data.json!r} does not exist.")
    if data.image_folder is not None and not Path(data.image_folder).is_dir():
        raise RecipeError(f"data.image_folder {data.image_folder!r} is not a directory.")
    dataset = LlavaFormatDataset(
        data.json,
        image_folder=data.image_folder,
        processor=processor,
        image_aspect=data.image_aspect,
        on_bad_image=data.on_bad_image,
        max_length=data.max_length,
    )
    if len(dataset) == 0:
        raise RecipeError(f"{data.json} holds no usable samples (skipped: {len(dataset.skipped)}).")
    if data.on_bad_image == "raise":
        # Missing files are cheap to find up front (a stat per image); corrupt ones are only found
        # when decoded, and then raise BadImageError naming the sample and the file.
        missing = [(sid, str(p)) for sid, _, paths in dataset.samples for p in paths if not p.is_file()]
        if missing:
            raise BadImageError(
                f"{len(missing)} image file(s) of {data.json} do not exist, e.g. sample {missing[0][0]!r}: "
                f"{missing[0][1]}. Fix data.image_folder, or drop such samples with data.on_bad_image: skip."
            )
    checked = CheckedDataset(dataset, model)
    checked[0]  # encode one sample now: template, processor and model mismatches fail before training
    return checked


__all__ = ["BadImageError", "CheckedDataset", "LlavaFormatError", "TrainingDataError", "build_dataset"]
