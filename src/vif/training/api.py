"""`train(recipe)`: one function from a recipe to a saved, loadable model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .recipe import Recipe, RecipeError, load_recipe

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


def train(recipe: str | Path | dict[str, Any] | Recipe, **overrides: Any) -> TrainResult:
    """Trains a vision-language model (with or without VIF) as ``recipe`` says; saves and returns.

    Args:
        recipe: a YAML / JSON file, a dict or a :class:`Recipe`. Schema (defaults in brackets;
            full reference in :mod:`vif.training.recipe` and docs/training.md)::

                model                       base model folder / hub id (required)
                vif                         "paper" | "released" | "compact" | {preset, <VIFConfig field>: ...} | null  ["paper"]
                init_adapter                a saved VIF module to continue from  [null]
                attn_implementation         sdpa | eager  [sdpa]
                data.json                   LLaVA-format JSON / JSONL (required)
                data.image_folder           image root  [the JSON's folder]
                data.image_aspect           pad | resize | keep  [pad]
                data.on_bad_image           raise | skip  [raise]
                data.max_length             [2048]
                trainable.mode              full | lora | vif-only  [full]; vision tower always frozen
                trainable.projector         train the projector  [true for full, else false]
                trainable.lora              {r [128], alpha [256], dropout [0.05], target_modules [LLM q/k/v/o/gate/up/down]}
                optimizer                   {lr [2e-5], vif_lr [lr], projector_lr [lr], weight_decay [0], max_grad_norm [1]}
                schedule                    {scheduler [cosine], warmup_ratio [0.03], epochs [1], max_steps [-1],
                                             per_device_batch_size [16], grad_accumulation [1]}
                precision                   auto | bf16 | fp16 | fp32  [auto: bf16 on a GPU that has it]
                activation_checkpointing    [true]
                seed [42], logging_steps [10], save_steps [500], save_total_limit [2],
                dataloader_num_workers [0], report_to [none], deepspeed [null: a DeepSpeed JSON],
                output_dir [runs/vif]
                resume                      false | true (last checkpoint in output_dir) | a checkpoint path

        overrides: dotted keys replacing recipe values, e.g. ``**{"schedule.max_steps": 10}``.

    Returns:
        a :class:`TrainResult`: ``output_dir``, ``model_path``, ``vif_adapter``, ``global_step``,
        ``metrics``, ``log_history``, ``trainable``.

    Runs under ``torchrun`` / ``accelerate launch`` (DDP, DeepSpeed, FSDP) like any Trainer script;
    every process returns a result, process 0 writes the files.
    """
    from .parts import count_parameters
    from .trainer import VIF_SUBDIR

    trainer = build_trainer(recipe, **overrides)
    recipe = trainer.recipe
    output = trainer.train(resume_from_checkpoint=recipe.resume or None)
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


def build_trainer(recipe: str | Path | dict[str, Any] | Recipe, **overrides: Any) -> VIFTrainer:
    """Everything :func:`train` sets up - model, data, Trainer - without training.

    The returned :class:`~vif.training.trainer.VIFTrainer` also carries ``.recipe`` (validated),
    ``.parts`` (:class:`~vif.training.parts.TrainingModel`) and ``.model_path``.
    """
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from ..data.llava_format import VIFCollator
    from ..loading import load_model
    from .data import build_dataset
    from .parts import build_training_model
    from .trainer import VIFTrainer

    recipe = load_recipe(recipe, **overrides)
    output_dir = Path(recipe.output_dir)
    resume = recipe.resume
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise RecipeError(f"resume: {resume!r} is not a checkpoint directory.")
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume is True and last is None:
        raise RecipeError(
            f"resume: true but {output_dir} holds no checkpoint-<step> folder to resume from; "
            "start without resume, or give the checkpoint path."
        )
    if resume is False and last is not None:
        raise RecipeError(
            f"output_dir {output_dir} already holds checkpoints of an earlier run (e.g. {last}); continue it "
            "with resume: true (CLI: --resume), or choose a new output_dir."
        )

    bf16, fp16 = _precision(recipe.precision)
    torch.manual_seed(recipe.seed)  # the VIF module's initialisation
    # An absolute path, so that a saved LoRA adapter finds its base model from anywhere.
    model_path = str(Path(recipe.model).resolve()) if Path(recipe.model).exists() else recipe.model
    model, processor = load_model(
        model_path, device="cpu", dtype="float32", attn_implementation=recipe.attn_implementation
    )
    parts = build_training_model(recipe, model)
    dataset = build_dataset(recipe, processor, parts.base)

    sched = recipe.schedule
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=sched.per_device_batch_size,
        gradient_accumulation_steps=sched.grad_accumulation,
        num_train_epochs=sched.epochs,
        max_steps=sched.max_steps,
        learning_rate=recipe.optimizer.lr,
        weight_decay=recipe.optimizer.weight_decay,
        max_grad_norm=recipe.optimizer.max_grad_norm,
        lr_scheduler_type=sched.scheduler,
        warmup_steps=sched.warmup_ratio,  # a float < 1 is a ratio of the total steps
        bf16=bf16,
        fp16=fp16,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        dataloader_num_workers=recipe.dataloader_num_workers,
        report_to=recipe.report_to,
        deepspeed=recipe.deepspeed,
        remove_unused_columns=False,  # the collator builds exactly the model's inputs
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )
    lrs = {
        "lr": recipe.optimizer.lr,
        "vif_lr": recipe.optimizer.vif_lr or recipe.optimizer.lr,
        "projector_lr": recipe.optimizer.projector_lr or recipe.optimizer.lr,
    }
    trainer = VIFTrainer(
        model=parts.top,
        args=args,
        data_collator=VIFCollator(processor, return_ids=True, return_boxes=_needs_boxes(parts)),
        train_dataset=dataset,
        processing_class=processor,
        parts=parts,
        lrs=lrs,
        recipe_dict=recipe.to_dict(),
    )
    trainer.recipe = recipe
    trainer.model_path = model_path
    return trainer


def _needs_boxes(parts: Any) -> bool:
    """Whether the model reads the samples' evidence boxes (``map_source="boxes"``)."""
    return parts.vif is not None and parts.vif.config_vif.map_source == "boxes"


def _precision(precision: str) -> tuple[bool, bool]:
    """``(bf16, fp16)`` flags of TrainingArguments for the recipe's precision."""
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        return on_gpu and torch.cuda.is_bf16_supported(), False
    if precision in ("bf16", "fp16") and not on_gpu:
        raise RecipeError(
            f"precision: {precision} needs a GPU (none is available); use 'auto' (fp32 on CPU) or 'fp32'."
        )
    return precision == "bf16", precision == "fp16"
