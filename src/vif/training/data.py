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
from ..data.llava_format import BadImageError, LlavaFormatDataset, LlavaFormatError, check_image
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
        item["index"] = i  # the trainer seeds this sample's posterior noise from it
        return item


class ModelConfigOnly:
    """Stands in for a model where only its config is read (the backbone adapter's layout check),
    so a sample's image tokens can be checked before any weights load."""

    def __init__(self, config: Any) -> None:
        self.config = config


def load_training_data(
    json_path: str,
    image_folder: str | None,
    recipe: Recipe,
    processor: Any,
    model_config: Any,
    decode_images: bool = False,
    what: str = "data.json",
) -> LlavaFormatDataset:
    """A recipe's data file, checked without model weights; raises naming the file, sample and fix.

    Every sample is parsed and validated (format, types, ``<image>`` markers); every image file
    must exist (``on_bad_image: raise``; ``decode_images`` also decodes each one, as
    ``vif train --check`` does); the first sample is encoded with the processor and its image
    tokens checked against the model's config.
    """
    if not Path(json_path).is_file():
        raise RecipeError(f"{what} {json_path!r} does not exist.")
    if image_folder is not None and not Path(image_folder).is_dir():
        folder_key = "data.image_folder" if what == "data.json" else "data.eval_image_folder"
        raise RecipeError(f"{folder_key} {image_folder!r} is not a directory.")
    data = recipe.data
    dataset = LlavaFormatDataset(
        json_path,
        image_folder=image_folder,
        processor=processor,
        image_aspect=data.image_aspect,
        on_bad_image=data.on_bad_image,
        max_length=data.max_length,
    )
    if len(dataset) == 0:
        raise RecipeError(f"{json_path} holds no usable samples (skipped: {len(dataset.skipped)}).")
    if data.on_bad_image == "raise":
        # A stat per image finds missing files; decoding (--check) finds corrupt ones too. Without
        # it, a corrupt file fails when its sample is read, naming the sample and the file.
        images = [(sid, p) for sid, _, paths in dataset.samples for p in paths]
        missing = [(sid, str(p)) for sid, p in images if not p.is_file()]
        if missing:
            raise BadImageError(
                f"{len(missing)} image file(s) of {json_path} do not exist, e.g. sample {missing[0][0]!r}: "
                f"{missing[0][1]}. Fix data.image_folder, or drop such samples with data.on_bad_image: skip."
            )
        if decode_images:
            bad = [(sid, str(p), reason) for sid, p in images if (reason := check_image(p)) is not None]
            if bad:
                raise BadImageError(
                    f"{len(bad)} image file(s) of {json_path} cannot be read, e.g. sample {bad[0][0]!r}: "
                    f"{bad[0][1]} ({bad[0][2]}). Fix or remove them, or drop such samples with "
                    "data.on_bad_image: skip."
                )
    # Template, processor and image-token layout: encode one sample now, against the config only.
    CheckedDataset(dataset, ModelConfigOnly(model_config))[0]
    return dataset


def build_dataset(recipe: Recipe, processor: Any, model: torch.nn.Module) -> CheckedDataset:
    """The recipe's training set; fails now (before training) on format errors and missing files."""
    data = recipe.data
    dataset = load_training_data(data.json, data.image_folder, recipe, processor, model.config)
    return CheckedDataset(dataset, model)


__all__ = [
    "BadImageError",
    "CheckedDataset",
    "LlavaFormatError",
    "ModelConfigOnly",
    "TrainingDataError",
    "build_dataset",
    "load_training_data",
]
