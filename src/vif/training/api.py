"""`train(recipe)`: one function from a recipe to a saved, loadable model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .preflight import Preflight, preflight
from .recipe import Recipe

if TYPE_CHECKING:
    from .trainer import VIFTrainer

# Trainer log keys that are per-step bookkeeping, not metrics.
_NOT_METRICS = ("epoch", "step", "learning_rate", "grad_norm")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    output_dir: the run's folder (checkpoints ``checkpoint-<step>/`` inside).
    model_path: what to pass to :func:`vif.loading.load_model` as ``path``: ``output_dir`` for
        full and LoRA runs (a PEFT adapter folder is merged onto its base on load), the base
        model for VIF-only runs.
    vif_adapter: the saved VIF module (``output_dir / "vif"``) for ``load_model(..., adapter=)``;
        None for a run without VIF.
    global_step: optimiser steps done (counting those before a resume).
    metrics: the Trainer's final metrics (``train_loss``, ``train_runtime``, ...) plus the last
        logged ``loss``, ``lm_loss``, ``kl``, ``sparsity``, ``entropy``, ``mean_sigma``.
    log_history: every log entry (one dict per ``logging_steps``), as the Trainer keeps it.
    trainable: trainable parameter counts per part (``vif``, ``projector``, ``language``, ``trainable``).
    """

    output_dir: Path
    model_path: Path
    vif_adapter: Path | None
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "model_path": str(self.model_path),
            "vif_adapter": None if self.vif_adapter is None else str(self.vif_adapter),
            "global_step": self.global_step,
            "metrics": self.metrics,
            "log_history": self.log_history,
            "trainable": self.trainable,
        }


def train(
    recipe: str | Path | dict[str, Any] | Recipe, *, force: bool = False, **overrides: Any
) -> TrainResult:
    """Trains a vision-language model (with or without VIF) as ``recipe`` says; saves and returns.

    Args:
        recipe: a YAML / JSON file, a dict or a :class:`Recipe`. Schema (defaults in brackets;
            full reference in :mod:`vif.training.recipe` and docs/training.md)::

                model                       base model folder / hub id (required)
                vif                         "compact" | "large" | "paper" | "released" | {preset, <VIFConfig field>: ...} | null  ["compact"]
                init_adapter                a saved VIF module (folder or hub id) to continue from  [null]
                attn_implementation         sdpa | eager  [sdpa]
                data.json                   LLaVA-format JSON / JSONL (required)
                data.image_folder           image root  [the JSON's folder]
                data.image_aspect           pad | resize | keep  [pad]
                data.on_bad_image           raise | skip  [raise]
                data.max_length             [2048]
                data.eval_json              an evaluation set (eval loss every logging_steps)  [null]
                data.eval_image_folder      its image root  [the eval JSON's folder]
                trainable.mode              full | lora | vif-only  [full]; vision tower always frozen
                trainable.projector         train the projector  [true for full, else false]
                trainable.lora              {r [128], alpha [256], dropout [0.05], target_modules [LLM q/k/v/o/gate/up/down]}
                optimizer                   {lr [2e-5], vif_lr [lr], projector_lr [lr], weight_decay [0], max_grad_norm [1]}
                schedule                    {scheduler [cosine], warmup_ratio [0.03], epochs [1], max_steps [-1],
                                             per_device_batch_size [16], grad_accumulation [1]}
                precision                   auto | bf16 | fp16 | fp32 (or the long names)  [auto: the checkpoint's dtype]
                activation_checkpointing    [true]
                seed [42], logging_steps [10], save_steps [500], save_total_limit [2],
                dataloader_num_workers [0], report_to [none; a name or a list], deepspeed [null: a DeepSpeed JSON],
                output_dir [runs/vif]
                resume                      false | true (last complete checkpoint in output_dir) | a checkpoint path
                <any other TrainingArguments field>   passed through, e.g. optim, run_name, warmup_steps

        force: resume even though the recipe differs from the one the run started with.
        overrides: dotted keys replacing recipe values, e.g. ``**{"schedule.max_steps": 10}``.

    Returns:
        a :class:`TrainResult`: ``output_dir``, ``model_path``, ``vif_adapter``, ``global_step``,
        ``metrics``, ``log_history``, ``trainable``.

    Every check that needs no weights runs first (:func:`vif.training.preflight.preflight`).
    Runs under ``torchrun`` / ``accelerate launch`` (DDP, DeepSpeed, FSDP) like any Trainer script;
    every process returns a result, process 0 writes the files.
    """
    from .parts import count_parameters
    from .trainer import VIF_SUBDIR

    trainer = build_trainer(recipe, force=force, **overrides)
    recipe = trainer.recipe
    checkpoint = trainer.resume_checkpoint
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    output_dir = Path(recipe.output_dir)
    trainer.save_model(str(output_dir))
    trainer.save_state()

    metrics = {k: v for k, v in output.metrics.items() if isinstance(v, (int, float))}
    last_loss = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if last_loss:
        metrics["loss"] = last_loss[-1]
    metrics.update(trainer.last_parts)
    metrics = {k: v for k, v in metrics.items() if k not in _NOT_METRICS and math.isfinite(v)}
    parts = trainer.parts
    return TrainResult(
        output_dir=output_dir,
        model_path=output_dir if recipe.trainable.mode in ("full", "lora") else Path(trainer.model_path),
        vif_adapter=output_dir / VIF_SUBDIR if parts.vif is not None else None,
        global_step=trainer.state.global_step,
        metrics=metrics,
        log_history=list(trainer.state.log_history),
        trainable=count_parameters(parts.top),
    )


def check(
    recipe: str | Path | dict[str, Any] | Recipe,
    *,
    force: bool = False,
    decode_images: bool = True,
    **overrides: Any,
) -> Preflight:
    """Every check of :func:`train` that needs no weights (what ``vif train --check`` runs); trains nothing."""
    return preflight(recipe, force=force, decode_images=decode_images, **overrides)


def build_trainer(
    recipe: str | Path | dict[str, Any] | Recipe, *, force: bool = False, **overrides: Any
) -> VIFTrainer:
    """Everything :func:`train` sets up - checks, model, data, Trainer - without training.

    The returned :class:`~vif.training.trainer.VIFTrainer` also carries ``.recipe`` (validated),
    ``.parts`` (:class:`~vif.training.parts.TrainingModel`), ``.model_path`` and
    ``.resume_checkpoint`` (the complete checkpoint to resume from, or None).
    """
    from ..data.llava_format import VIFCollator
    from ..loading import load_model
    from .data import CheckedDataset
    from .parts import build_training_model
    from .rundir import write_marker
    from .trainer import VIFTrainer

    checked = preflight(recipe, force=force, **overrides)  # before any weights load
    recipe, args = checked.recipe, checked.training_args

    model, processor = load_model(
        checked.model_path, device="cpu", dtype="float32", attn_implementation=recipe.attn_implementation
    )
    # LoRA's and the VIF module's initialisation. Seeded after loading: under ZeRO-3 transformers
    # builds the model inside deepspeed.zero.Init, which draws random weights before the checkpoint
    # overwrites them, so a seed set before loading gave the LoRA matrices other values than one process.
    torch.manual_seed(recipe.seed)
    parts = build_training_model(recipe, model)
    train_data = CheckedDataset(checked.train_data, parts.base)
    eval_data = CheckedDataset(checked.eval_data, parts.base) if checked.eval_data is not None else None
    if args.should_save and (checked.resume_checkpoint is None or checked.forced_changes):
        write_marker(recipe, checked.forced_changes)

    lrs = {
        "lr": recipe.optimizer.lr,
        "vif_lr": recipe.optimizer.vif_lr or recipe.optimizer.lr,
        "projector_lr": recipe.optimizer.projector_lr or recipe.optimizer.lr,
    }
    trainer = VIFTrainer(
        model=parts.top,
        args=args,
        data_collator=VIFCollator(processor, return_ids=True, return_boxes=_needs_boxes(parts)),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=processor,
        parts=parts,
        lrs=lrs,
        recipe_dict=recipe.to_dict(),
    )
    trainer.recipe = recipe
    trainer.model_path = checked.model_path
    trainer.resume_checkpoint = checked.resume_checkpoint
    return trainer


def _needs_boxes(parts: Any) -> bool:
    """Whether the model reads the samples' evidence boxes (``map_source="boxes"``)."""
    return parts.vif is not None and parts.vif.config_vif.map_source == "boxes"
