"""Which parameters train: model parts, freezing, LoRA, and the optimiser's groups.

A vision-language model is three parts, told apart by parameter name so that nothing
here is specific to one family:

* ``vision``    - the vision tower (LLaVA ``vision_tower``, Qwen-VL ``visual`` minus its merger): always frozen;
* ``projector`` - vision -> LLM connector (LLaVA ``multi_modal_projector``, Qwen-VL ``visual.merger``);
* ``language``  - everything else (the LLM, its embeddings and LM head).

The VIF module (``vif_module.*`` of the :class:`~vif.model.VIFModel`) is a fourth
group, always trained in full.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .distributed import canonical_name, fsdp_checkpoints_layers
from .recipe import Recipe

PROJECTOR_NAMES = ("multi_modal_projector", "visual.merger")
VISION_NAMES = ("vision_tower", "visual.", "vision_model")
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def part_of(name: str) -> str:
    """``"projector" | "vision" | "language"`` for a parameter or module name of a VLM."""
    if any(p in name for p in PROJECTOR_NAMES):
        return "projector"
    if any(v in name for v in VISION_NAMES):
        return "vision"
    return "language"


def lora_target_regex(target_modules: list[str] | None) -> str:
    """A PEFT ``target_modules`` regex for the language model's linear layers only.

    A plain list like ``["q_proj", ...]`` would also wrap the vision tower's layers of
    the same name (Qwen-VL's vision MLP is ``gate_proj / up_proj / down_proj``).
    """
    names = target_modules or list(LLM_PROJECTIONS)
    return r".*language_model.*\.(" + "|".join(re.escape(n) for n in names) + r")$"


@dataclass
class TrainingModel:
    """The pieces of the model being trained.

    base: the transformers VLM (with LoRA layers injected in ``lora`` mode).
    peft: the ``PeftModel`` wrapping ``base`` in ``lora`` mode (used to save the adapter), else None.
    vif: the :class:`~vif.model.VIFModel` around ``base``, or None when training without VIF.
    """

    base: nn.Module
    peft: Any | None
    vif: Any | None

    @property
    def top(self) -> nn.Module:
        """What the Trainer trains and calls: the VIFModel (so its module is trained and saved) or the VLM."""
        return self.vif if self.vif is not None else self.base


def build_training_model(recipe: Recipe, base: nn.Module) -> TrainingModel:
    """Freezes, wraps with LoRA and attaches VIF as the recipe says. ``base`` is a loaded VLM."""
    from ..model import VIFModel, attach

    mode = recipe.trainable.mode
    projector_modules = [n for n, _ in base.named_modules() if n.endswith(PROJECTOR_NAMES)]
    peft_model = None
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = recipe.trainable.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(lora.target_modules),
            # A trained projector is saved inside the adapter (PEFT's format for fully trained modules).
            modules_to_save=projector_modules if recipe.train_projector else None,
            bias="none",
        )
        peft_model = get_peft_model(base, config)  # freezes every non-LoRA weight
        base = peft_model.base_model.model
    else:
        for name, param in base.named_parameters():
            part = part_of(name)
            param.requires_grad_(
                mode == "full" and (part == "language" or (part == "projector" and recipe.train_projector))
            )
    for name, param in base.named_parameters():
        if part_of(name) == "vision":
            param.requires_grad_(False)  # frozen in every mode, as in the paper
    if not recipe.train_projector:
        for name, param in base.named_parameters():
            if part_of(name) == "projector":
                param.requires_grad_(False)

    if recipe.activation_checkpointing and not fsdp_checkpoints_layers():
        # (With FSDP's own activation checkpointing on, FSDP wraps the same layers itself.)
        # Non-reentrant checkpointing: the VIF map computed in an extraction layer's hook flows
        # into the checkpointed injection layers as a closure, which only this variant differentiates.
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    vmodel = None
    if recipe.init_adapter is not None:
        vmodel = VIFModel.from_pretrained(base, recipe.init_adapter)
    elif recipe.vif is not None:
        vmodel = attach(base, recipe.vif_config(base), dtype=next(base.parameters()).dtype)
    if vmodel is not None:
        vmodel.vif_module.requires_grad_(True)
    return TrainingModel(base=base, peft=peft_model, vif=vmodel)


def parameter_groups(
    model: nn.Module, lr: float, vif_lr: float, projector_lr: float, weight_decay: float
) -> list[dict]:
    """Optimiser groups of ``model``'s trainable parameters: ``vif``, ``projector``, ``language``.

    Each group carries its own ``lr``; the scheduler scales all of them alike.
    """
    groups: dict[str, list] = {"vif": [], "projector": [], "language": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = canonical_name(name)  # FSDP / DDP / DeepSpeed wrappers prefix the names
        key = "vif" if name.startswith("vif_module.") else part_of(name)
        if key == "vision":
            raise AssertionError(f"vision tower parameter {name} is trainable")
        groups[key].append(param)
    rates = {"vif": vif_lr, "projector": projector_lr, "language": lr}
    return [
        {"params": params, "lr": rates[key], "weight_decay": weight_decay}
        for key, params in groups.items()
        if params
    ]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per part (``vif``, ``projector``, ``language``) and the total."""
    counts = {"vif": 0, "projector": 0, "language": 0, "vision": 0, "frozen": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            counts["frozen"] += param.numel()
            continue
        name = canonical_name(name)
        counts["vif" if name.startswith("vif_module.") else part_of(name)] += param.numel()
    counts["trainable"] = counts["vif"] + counts["projector"] + counts["language"] + counts["vision"]
    return counts
