"""Every check of a training run that needs no model weights, run before any weights load.

:func:`preflight` is the first thing :func:`vif.training.train` does, and all that
``vif train --check`` does (with ``decode_images=True``). In order:

1. the recipe: keys, types and values (:mod:`vif.training.recipe`);
2. the model: its ``config.json`` (local folder, LoRA folder or hub id) is a vision-language
   model VIF has a backbone adapter for;
3. VIF: the preset, layer pairs and values against that config (``alpha`` in [0, 1], layers
   in range, ...); an ``init_adapter`` against it too (backbone and tensor shapes, from the
   safetensors header);
4. the output folder: not the base model's folder, no model VIF did not write, no earlier
   run unless resuming; on resume, the last complete checkpoint, the recipe fingerprint
   (:mod:`vif.training.rundir`) and the checkpoint's VIF module shapes;
5. precision and device: bf16 / fp16 where this machine runs them;
6. the Trainer's arguments: built by ``TrainingArguments`` itself (it validates ``optim``,
   schedulers, eval strategy, ...), and every ``report_to`` integration available;
7. the data (and eval set): every sample parsed and validated, every image present (decoded
   too with ``decode_images``), the first sample encoded by the processor and its image
   tokens checked against the model config.

A failure raises an error whose message names the problem and the fix (the CLI prints it as
one ``error:`` line).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter_io import expected_shapes, inspect_adapter, resolve_adapter, saved_shapes
from ..config import VIFConfig, VIFConfigError
from .distributed import device_arguments
from .recipe import Recipe, RecipeError, load_recipe
from .rundir import VIF_SUBDIR, check_fingerprint, check_output_dir, find_resume_checkpoint


@dataclass
class Preflight:
    """What the checks found, for :func:`vif.training.api.build_trainer` to use."""

    recipe: Recipe
    model_path: str  # an absolute local path, or the hub id
    model_config: Any
    vif_config: VIFConfig | None
    processor: Any
    train_data: Any  # LlavaFormatDataset
    eval_data: Any | None
    training_args: Any  # TrainingArguments
    resume_checkpoint: Path | None = None
    forced_changes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            self.model_config.text_config if hasattr(self.model_config, "text_config") else self.model_config
        )
        images = sum(len(paths) for _, _, paths in self.train_data.samples)
        lines = [
            f"model: {self.model_path} ({self.model_config.model_type}, {text.num_hidden_layers} layers)",
            f"data: {len(self.train_data)} samples, {images} images"
            + (f"; eval set: {len(self.eval_data)} samples" if self.eval_data is not None else ""),
            "vif: "
            + (
                "none (control run)"
                if self.vif_config is None
                else f"pairs {self.vif_config.pairs}, alpha {self.vif_config.alpha}, latent {self.vif_config.latent_size}"
            ),
            f"output_dir: {self.recipe.output_dir}"
            + (f" (resuming from {self.resume_checkpoint.name})" if self.resume_checkpoint else ""),
        ]
        return "\n".join(lines)


def preflight(
    recipe: str | Path | dict[str, Any] | Recipe,
    *,
    force: bool = False,
    decode_images: bool = False,
    **overrides: Any,
) -> Preflight:
    """Runs every weight-free check of a run (see the module docstring); returns what they found."""
    from ..loading import check_vision_language, model_config
    from ..tiny import load_processor
    from .data import load_training_data

    recipe = load_recipe(recipe, **overrides)
    # An absolute path, so that a saved LoRA adapter finds its base model from anywhere.
    model_path = str(Path(recipe.model).resolve()) if Path(recipe.model).exists() else recipe.model
    config = model_config(model_path)
    check_vision_language(config, recipe.model)
    vif_config = _vif_config(recipe, config)

    check_output_dir(recipe, model_path)
    checkpoint = find_resume_checkpoint(Path(recipe.output_dir), recipe)
    changed: list[str] = []
    if checkpoint is not None:
        changed = check_fingerprint(recipe, checkpoint, force)
        if vif_config is not None:
            _check_checkpoint_vif(checkpoint, vif_config)

    bf16, fp16 = precision_flags(recipe.precision, config)
    has_eval = recipe.data.eval_json is not None
    args = training_arguments(recipe, bf16, fp16, has_eval)

    processor = load_processor(model_path)
    data = recipe.data
    train_data = load_training_data(data.json, data.image_folder, recipe, processor, config, decode_images)
    eval_data = None
    if has_eval:
        eval_data = load_training_data(
            data.eval_json, data.eval_image_folder, recipe, processor, config, decode_images, "data.eval_json"
        )
    return Preflight(
        recipe, model_path, config, vif_config, processor, train_data, eval_data, args, checkpoint, changed
    )


def _vif_config(recipe: Recipe, config: Any) -> VIFConfig | None:
    """The run's VIF config, validated against the model's config (None: a run without VIF)."""
    if recipe.init_adapter is not None:
        try:
            return inspect_adapter(resolve_adapter(recipe.init_adapter), config)
        except (ValueError, VIFConfigError) as err:
            raise RecipeError(f"init_adapter: {err}") from None
    vif = recipe.vif_config(config)
    if vif is None:
        return None
    text = getattr(config, "text_config", None) or config
    if vif.hidden_size is None:
        vif = VIFConfig.from_dict({**vif.to_dict(), "hidden_size": int(text.hidden_size)})
    try:
        vif.validate(num_layers=int(text.num_hidden_layers))
    except VIFConfigError as err:
        raise RecipeError(f"recipe key 'vif': {err}") from None
    return vif


def _check_checkpoint_vif(checkpoint: Path, vif_config: VIFConfig) -> None:
    weights = checkpoint / VIF_SUBDIR / "vif_module.safetensors"
    have, want = saved_shapes(weights), expected_shapes(vif_config)
    if have != want:
        differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise RecipeError(
            f"{checkpoint}'s VIF module was saved with another VIF config than this recipe builds (e.g. "
            f"{differ[0]}: saved {have.get(differ[0])}, now {want.get(differ[0])}); a run cannot continue with "
            "another VIF preset or size. Restore the recipe's 'vif', or train into a new output_dir."
        )


# -----------------------------------------------------------------------------
# Precision and the Trainer's arguments


def _cpu_has_bf16() -> bool:
    """Native bfloat16 on this CPU (AVX512-BF16 / AMX); without it, bf16 autocast is emulated and slow."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _unavailable(precision: str) -> str | None:
    """Why this machine cannot train in ``precision`` (None: it can)."""
    if precision == "fp32":
        return None
    if torch.cuda.is_available():
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return f"needs bfloat16, which {torch.cuda.get_device_name()} does not support"
        return None
    if precision == "fp16":
        return "needs a CUDA GPU (none is available)"
    if not _cpu_has_bf16():
        return (
            "needs a CUDA GPU or a CPU with native bfloat16 (AVX512-BF16 / AMX), and this machine has neither"
        )
    return None


def checkpoint_precision(config: Any) -> str:
    """``"bf16" | "fp16" | "fp32"``: the dtype the checkpoint was saved in (its ``config.json``)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp32")


def precision_flags(precision: str, config: Any) -> tuple[bool, bool]:
    """``(bf16, fp16)`` flags of TrainingArguments for the recipe's precision.

    ``auto`` is transformers' meaning, the checkpoint's dtype, as the mixed-precision dtype
    where this machine runs it (else fp32). Weights stay fp32 (the master copy) either way.
    """
    if precision == "auto":
        saved = checkpoint_precision(config)
        precision = saved if _unavailable(saved) is None else "fp32"
    elif precision == "bf16" and not torch.cuda.is_available() and not _cpu_has_bf16():
        # Asked for by name: torch's CPU autocast runs bf16 without native support too, emulated and
        # slower than fp32 - right for exercising mixed precision on a CPU, not for speed.
        warnings.warn(
            "precision: bf16 on a CPU without native bfloat16 (AVX512-BF16 / AMX) is emulated: slower than fp32.",
            stacklevel=2,
        )
    elif (reason := _unavailable(precision)) is not None:
        raise RecipeError(f"precision: {precision} {reason}; use precision: fp32 (or auto).")
    return precision == "bf16", precision == "fp16"


def training_arguments(recipe: Recipe, bf16: bool, fp16: bool, has_eval: bool) -> Any:
    """``TrainingArguments`` of a recipe: its own keys, then every pass-through field, validated by transformers."""
    from transformers import TrainingArguments

    sched = recipe.schedule
    kwargs: dict[str, Any] = dict(
        output_dir=str(recipe.output_dir),
        per_device_train_batch_size=sched.per_device_batch_size,
        gradient_accumulation_steps=sched.grad_accumulation,
        num_train_epochs=sched.epochs,
        max_steps=sched.max_steps,
        learning_rate=recipe.optimizer.lr,
        weight_decay=recipe.optimizer.weight_decay,
        max_grad_norm=recipe.optimizer.max_grad_norm,
        lr_scheduler_type=sched.scheduler,
        warmup_steps=recipe.warmup,  # a float < 1 is a ratio of the total steps
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
        **device_arguments(recipe.deepspeed),  # use_cpu / ddp_backend for this machine and engine
    )
    if has_eval:
        # An eval set is for its loss: evaluate every logging_steps unless told otherwise, keep no logits.
        kwargs.update(eval_strategy="steps", prediction_loss_only=True)
        kwargs["per_device_eval_batch_size"] = sched.per_device_batch_size
    kwargs.update(recipe.training_args)
    if not has_eval and kwargs.get("eval_strategy", "no") != "no":
        raise RecipeError(
            f"eval_strategy: {kwargs['eval_strategy']} needs an evaluation set; give data.eval_json (LLaVA format)."
        )
    try:
        args = TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as err:
        raise RecipeError(f"transformers' TrainingArguments refused the recipe: {err}") from None
    _check_reporting(args)
    return args


def _check_reporting(args: Any) -> None:
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        for callback in get_reporting_integration_callbacks(args.report_to):
            callback()  # raises when the integration's package is not installed
    except (ValueError, RuntimeError, ImportError) as err:
        raise RecipeError(f"report_to {args.report_to}: {err}") from None
