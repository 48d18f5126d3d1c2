"""`VIFTrainer`: the transformers ``Trainer`` with three small changes.

1. ``compute_loss`` keeps the parts of VIF's loss (LM loss, KL, sparsity, importance
   entropy, mean sigma) and ``log`` reports their averages since the last log, next to
   the Trainer's ``loss``.
2. ``_save`` writes an output folder that :func:`vif.loading.load_model` reads:
   the full model (``save_pretrained``, safetensors) or the LoRA adapter (PEFT format),
   the processor, and the VIF module in ``vif/`` (``VIFModel.save_pretrained`` format).
3. ``_load_from_checkpoint`` reads that folder back on ``resume`` (VIF weights included);
   optimiser, scheduler, RNG and data position are restored by the Trainer as usual.

Everything else - DDP, DeepSpeed, FSDP, gradient accumulation, mixed precision,
``accelerate launch`` - is the Trainer's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer

from .data import TrainingDataError
from .parts import TrainingModel, parameter_groups

VIF_SUBDIR = "vif"  # VIFModel.save_pretrained folder inside every checkpoint / output dir
RECIPE_NAME = "training_recipe.json"
LOGGED_PARTS = ("lm_loss", "kl", "sparsity", "entropy", "mean_sigma")


class VIFTrainer(Trainer):
    """``Trainer`` for a :class:`~vif.training.parts.TrainingModel` (VIF, LoRA, full or VIF-only)."""

    # The loss is a per-micro-batch mean: LM loss + beta * KL + gamma * sparsity. KL and sparsity
    # are means over the batch, so letting the model normalise the LM part by the token count of
    # the whole accumulated batch (num_items_in_batch) would weight the two inconsistently.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        parts: TrainingModel,
        lrs: dict[str, float],
        recipe_dict: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # see loss_is_scaled_for_ga
        self.parts = parts
        self.lrs = lrs
        self.recipe_dict = recipe_dict
        self._part_sums: dict[str, float] = {}
        self._part_count = 0
        self.last_parts: dict[str, float] = {}

    # ---------------------------------------------------------------- optimiser
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW (or ``args.optim``) over the groups ``vif`` / ``projector`` / ``language``, each with its lr."""
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(
                model, self.lrs["lr"], self.lrs["vif_lr"], self.lrs["projector_lr"], self.args.weight_decay
            )
            if not groups:
                raise ValueError("no trainable parameters: check the recipe's 'trainable' section.")
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)  # every group has its own
            self.optimizer = optimizer_cls(groups, lr=self.lrs["lr"], **optimizer_kwargs)
        return self.optimizer

    # ---------------------------------------------------------------- loss + logging
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        ids = inputs.pop("ids", None)
        try:
            outputs = model(**inputs)
        except ValueError as err:  # BackboneError and the model's own input checks
            raise TrainingDataError(f"batch with sample ids {ids}: {err}") from err
        loss = outputs.loss
        vif = getattr(outputs, "vif", None)
        parts = {"lm_loss": loss if vif is None else vif.lm_loss}
        if vif is not None:
            parts.update(kl=vif.kl, sparsity=vif.sparsity, entropy=vif.entropy, mean_sigma=vif.mean_sigma)
        if model.training:
            for name, value in parts.items():
                if value is not None:
                    self._part_sums[name] = self._part_sums.get(name, 0.0) + float(value.detach())
            self._part_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._part_count:
            names = [n for n in LOGGED_PARTS if n in self._part_sums]
            means = torch.tensor(
                [self._part_sums[n] / self._part_count for n in names], device=self.args.device
            )
            if self.args.world_size > 1:
                # Every rank logs at the same step, so this collective is matched on all of them.
                means = self.accelerator.reduce(means, reduction="mean")
            self.last_parts = {n: round(float(v), 6) for n, v in zip(names, means.tolist())}
            logs.update(self.last_parts)
            self._part_sums, self._part_count = {}, 0
        super().log(logs, start_time)

    # ---------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        parts = self.parts
        # Under DeepSpeed / FSDP the Trainer gathers the full state dict and hands it over;
        # otherwise read the live modules. Keys are those of `parts.top`.
        if state_dict is None:
            state_dict = parts.top.state_dict()
        prefix = "base_model." if parts.vif is not None else ""
        base_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if parts.vif is not None:
            base_state = {k: v for k, v in base_state.items() if not k.startswith("vif_module.")}
            # save_pretrained writes the config (and the live weights); the weights are then rewritten
            # from the state dict, which under ZeRO-3 / FSDP is the gathered one.
            parts.vif.save_pretrained(output_dir / VIF_SUBDIR)
            vif_state = {
                k[len("vif_module.") :]: v for k, v in state_dict.items() if k.startswith("vif_module.")
            }
            _save_vif_weights(vif_state, output_dir / VIF_SUBDIR)
        if parts.peft is not None:
            peft_state = {"base_model.model." + k: v for k, v in base_state.items()}
            parts.peft.save_pretrained(output_dir, state_dict=peft_state, safe_serialization=True)
        elif self.recipe_dict is None or self.recipe_dict["trainable"]["mode"] == "full":
            parts.base.save_pretrained(output_dir, state_dict=base_state, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.recipe_dict is not None:
            (output_dir / RECIPE_NAME).write_text(json.dumps(self.recipe_dict, indent=2) + "\n")

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """Restores the trained weights of a checkpoint written by :meth:`_save`."""
        checkpoint = Path(resume_from_checkpoint)
        parts = self.parts
        if parts.vif is not None:
            weights = checkpoint / VIF_SUBDIR / "vif_module.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(
                    f"{weights} is missing: {checkpoint} was not written by a VIF training run with VIF enabled."
                )
            state = load_file(weights, device=str(parts.vif.device))
            parts.vif.vif_module.load_state_dict(state, strict=True)
        if parts.peft is not None:
            from peft import set_peft_model_state_dict

            weights = checkpoint / "adapter_model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} is missing: not a LoRA checkpoint of this run.")
            result = set_peft_model_state_dict(parts.peft, load_file(weights))  # copied onto the live weights
            if result.unexpected_keys:
                raise ValueError(f"{weights} has weights this LoRA model lacks: {result.unexpected_keys[:5]}")
        elif self.recipe_dict is None or self.recipe_dict["trainable"]["mode"] == "full":
            if not (checkpoint / "config.json").is_file():
                raise FileNotFoundError(f"{checkpoint} holds no full model (config.json missing).")
            # from_pretrained undoes the checkpoint-format key renames of save_pretrained.
            param = next(parts.base.parameters())
            saved = type(parts.base).from_pretrained(checkpoint, dtype=param.dtype)
            parts.base.load_state_dict(saved.state_dict(), strict=True)
            del saved


def _save_vif_weights(state: dict[str, torch.Tensor], directory: Path) -> None:
    from safetensors.torch import save_file

    from ..model import WEIGHTS_NAME

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "vif_version": "1"})
