"""`VIFTrainer`: the transformers ``Trainer`` with a few small changes.

1. ``compute_loss`` keeps the parts of VIF's loss (LM loss, KL, sparsity, importance
   entropy, mean sigma) and ``log`` reports their averages since the last log, next to
   the Trainer's ``loss``. It also seeds each sample's posterior noise from (seed, step,
   sample index), so that data-parallel runs match the one-process run.
2. ``_save`` writes an output folder that :func:`vif.loading.load_model` reads:
   the full model (``save_pretrained``, safetensors) or the LoRA adapter (PEFT format),
   the processor, and the VIF module in ``vif/`` (``VIFModel.save_pretrained`` format).
3. ``_load_from_checkpoint`` reads that folder back on ``resume`` (VIF weights included);
   optimiser, scheduler, RNG and data position are restored by the Trainer as usual.

DDP, DeepSpeed, FSDP, gradient accumulation, mixed precision and ``accelerate launch`` are
the Trainer's own; where an engine would lose something of VIF's (FSDP on CPU, sharded
saving and resuming, renamed parameters) the fix is in :mod:`vif.training.distributed`,
called from the methods below.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer
from transformers.utils import logging

from . import distributed
from .data import TrainingDataError
from .parts import TrainingModel, parameter_groups

VIF_SUBDIR = "vif"  # VIFModel.save_pretrained folder inside every checkpoint / output dir
RECIPE_NAME = "training_recipe.json"
ENGINE_NAME = "engine.json"  # how the run was sharded (written at the end by process 0)
logger = logging.get_logger(__name__)
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
        self.engine = distributed.engine_name(self.accelerator)
        if self.engine == "fsdp":
            distributed.set_fsdp_wrap_classes(self.accelerator.state.fsdp_plugin, parts.base)
        if self.engine == "deepspeed":
            distributed.keep_used_key_conversions(parts.base)
        self.data_collator = _WithSampleIndex(self.data_collator)
        # (ds_numel: a model loaded under DeepSpeed's ZeRO-3 init holds empty partitions)
        self.trainable_elements = sum(
            getattr(p, "ds_numel", p.numel()) for p in parts.top.parameters() if p.requires_grad
        )
        self.engine_report: dict[str, Any] = {}

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if distributed.enable_fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True

    # ---------------------------------------------------------------- optimiser
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW (or ``args.optim``) over the groups ``vif`` / ``projector`` / ``language``, each with its lr."""
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.engine == "fsdp":
                self._check_fsdp(model)
            groups = parameter_groups(
                model, self.lrs["lr"], self.lrs["vif_lr"], self.lrs["projector_lr"], self.args.weight_decay
            )
            if not groups:
                raise ValueError("no trainable parameters: check the recipe's 'trainable' section.")
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)  # every group has its own
            self.optimizer = optimizer_cls(groups, lr=self.lrs["lr"], **optimizer_kwargs)
        return self.optimizer

    def train(self, *args: Any, **kwargs: Any) -> Any:
        output = super().train(*args, **kwargs)
        self.engine_report = self._report_engine()
        if self.args.should_save:
            path = Path(self.args.output_dir) / ENGINE_NAME
            path.write_text(json.dumps(self.engine_report, indent=2) + "\n")
        return output

    def _report_engine(self) -> dict[str, Any]:
        """How this run was sharded: the engine and the optimiser elements each process holds.

        Every process calls it (the counts are gathered). A sharded engine whose processes each
        hold the whole optimiser has silently fallen back to plain data parallelism: warned here.
        """
        local = distributed.optimizer_state_elements(self.optimizer)
        counts = self.accelerator.gather(torch.tensor([local], device=self.args.device)).tolist()
        state = self.accelerator.state
        report: dict[str, Any] = {
            "engine": self.engine,
            "processes": self.args.world_size,
            "mixed_precision": str(self.accelerator.mixed_precision),
            "trainable_elements": self.trainable_elements,
            "optimizer_elements_per_process": counts,
        }
        if self.engine == "fsdp":
            plugin = state.fsdp_plugin
            report["fsdp_sharding"] = getattr(plugin.sharding_strategy, "name", str(plugin.sharding_strategy))
            report["fsdp_activation_checkpointing"] = bool(plugin.activation_checkpointing)
        if self.engine == "deepspeed":
            report["zero_stage"] = state.deepspeed_plugin.zero_stage
        sharded = self.engine == "fsdp" or report.get("zero_stage", 0) >= 1
        if sharded and len(counts) > 1 and max(counts) >= self.trainable_elements:
            logger.warning(
                f"{self.engine} was requested but a process holds all {self.trainable_elements} optimiser "
                f"elements ({counts}): the optimiser state is not sharded."
            )
        return report

    def _check_fsdp(self, model: torch.nn.Module) -> None:
        distributed.check_fsdp_wrapping(model)
        plugin = self.accelerator.state.fsdp_plugin
        if not plugin.use_orig_params and len(set(self.lrs.values())) > 1:
            raise ValueError(
                f"separate learning rates {self.lrs} need fsdp_use_orig_params: true in the accelerate "
                "config (FSDP otherwise hands the optimiser one flat tensor per layer); set it, or give every "
                "part the same lr."
            )

    # ---------------------------------------------------------------- loss + logging
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        ids = inputs.pop("ids", None)
        index = inputs.pop("index", None)
        if self.parts.vif is not None:
            # Noise keyed by sample, not by process; it stays set through backward, where activation
            # checkpointing recomputes the attender and must draw the same noise again.
            training = model.training and index is not None
            seeds = (
                distributed.sample_seeds(self.args.seed, self.state.global_step, index) if training else None
            )
            self.parts.vif._runtime.noise_seeds = seeds
        if model.training:
            # No KV cache in training: under FSDP's activation checkpointing the recomputed layers
            # would append to it a second time (transformers only turns it off for its own checkpointing).
            inputs = {**inputs, "use_cache": False}
        try:
            outputs = model(**inputs)
        except ValueError as err:  # BackboneError and the model's own input checks
            raise TrainingDataError(f"batch with sample ids {ids}: {err}") from err
        loss = outputs.loss
        vif = getattr(outputs, "vif", None)
        if vif is None and self.parts.vif is not None:
            # FSDP and accelerate's mixed-precision output conversion rebuild the output without `vif`.
            vif = self.parts.vif.last_vif
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
    @property
    def _saves_base_weights(self) -> bool:
        """Full and LoRA runs save the (adapted) base model; VIF-only runs only the VIF module."""
        return self.recipe_dict is None or self.recipe_dict["trainable"]["mode"] in ("full", "lora")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.engine != "fsdp" or not _is_fsdp(self.model_wrapped):
            return super().save_model(output_dir, _internal_call)
        # FSDP with sharded state dicts: the Trainer would write nothing of ours. A checkpoint gets the
        # gathered VIF module (the model and optimiser shards that --resume reads are the Trainer's);
        # the end of training gets everything, as without FSDP. All ranks gather; rank 0 writes.
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        model, parts = self.model_wrapped, self.parts
        if not _internal_call and self._saves_base_weights:
            state, base = distributed.gather_full_state(model), True
        elif parts.vif is not None:
            vif_state = distributed.gather_vif_state(model, parts.vif.vif_module)
            state, base = {"vif_module." + k: v for k, v in vif_state.items()}, False
        else:
            state, base = {}, False
        if self.args.should_save:
            self._write(output_dir, state, base=base)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        if self.engine == "deepspeed" and state_dict is not None and not state_dict:
            raise ValueError(
                "DeepSpeed handed over no weights to save: with ZeRO-3 set "
                '"stage3_gather_16bit_weights_on_model_save": true (as recipes/deepspeed_zero3.json does).'
            )
        self._write(Path(output_dir if output_dir is not None else self.args.output_dir), state_dict)

    def _write(self, output_dir: Path, state_dict: dict | None, base: bool = True) -> None:
        """Writes the output folder from ``state_dict`` (keys of ``parts.top``; None: the live modules).

        ``base=False`` writes the VIF module, processor and recipe only (FSDP checkpoints).
        """
        output_dir.mkdir(parents=True, exist_ok=True)
        parts = self.parts
        # Under DeepSpeed / FSDP the state dict is the gathered one; otherwise read the live modules.
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
        if base and parts.peft is not None:
            peft_state = {"base_model.model." + k: v for k, v in base_state.items()}
            unwrapped = distributed.unwrapped_module_names if self.engine == "fsdp" else _no_change
            with unwrapped(parts.peft):
                parts.peft.save_pretrained(output_dir, state_dict=peft_state, safe_serialization=True)
        elif base and self._saves_base_weights:
            parts.base.save_pretrained(output_dir, state_dict=base_state, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.recipe_dict is not None:
            (output_dir / RECIPE_NAME).write_text(json.dumps(self.recipe_dict, indent=2) + "\n")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.engine == "fsdp":
            # The Trainer's FSDP route fills a template taken from the fresh optimiser, which has no
            # Adam moments yet, so nothing of them was restored. Load the same files again through
            # get/set_optimizer_state_dict, whose template has every state entry.
            directory = Path(checkpoint) / distributed.FSDP_OPTIMIZER_DIR
            if directory.is_dir():
                distributed.load_sharded_optimizer(self.model_wrapped, self.optimizer, directory)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """Restores the trained weights of a checkpoint written by :meth:`_save`."""
        checkpoint = Path(resume_from_checkpoint)
        if self.engine == "fsdp":
            # The model's shards (VIF module included) are the Trainer's files; vif/ is an output there.
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if any(p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir()):
            raise ValueError(
                f"{checkpoint} was written by an FSDP run; resume it under accelerate launch with the same FSDP config."
            )
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


@contextlib.contextmanager
def _no_change(_model: torch.nn.Module) -> Iterator[None]:
    yield


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(model, FSDP)


class _WithSampleIndex:
    """Adds ``index`` ``(B,)`` (each item's dataset index) to the batches of ``collator``.

    The trainer seeds each sample's posterior noise from it; items without an index (a dataset
    other than vif's) leave the batch as it was, and the noise then comes from the global RNG.
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(items)
        if items and all("index" in item for item in items):
            batch["index"] = torch.tensor([item["index"] for item in items])
        return batch
