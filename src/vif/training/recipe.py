"""The training recipe: one YAML / JSON file (or dict) that says everything about a run.

A recipe is nested plain data, validated before any model is loaded, so a typo fails
in a second with a message that names the key and lists the valid ones, instead of an
hour into a job. Schema (every key but ``model`` and ``data.json`` has a default)::

    model: path/to/llava-1.5-7b-hf        # a save_pretrained folder (model + processor) or hub id
    vif: compact                          # preset name ("compact" | "large": vif's method; "paper" |
                                          # "released": the paper's), or a mapping
                                          # {preset: compact, <any VIFConfig field>: value, ...},
                                          # or null: train WITHOUT VIF (the control arm)
    init_adapter: null                    # start from a saved VIF module (VIFModel.save_pretrained dir)
    attn_implementation: sdpa             # the language model's base attention: sdpa | eager
    data:
      json: data/llava_v1_5_mix665k.json  # LLaVA-format JSON list or JSONL
      image_folder: data/images           # root of relative image paths (default: the JSON's folder)
      image_aspect: pad                   # pad (LLaVA-1.5) | resize | keep
      on_bad_image: raise                 # raise | skip (check every image first, drop bad samples)
      max_length: 2048
      eval_json: null                     # an evaluation set in the same format (eval loss; set eval_strategy)
      eval_image_folder: null             # its image root (default: the eval JSON's folder)
    trainable:
      mode: full                          # full | lora | vif-only (vision tower always frozen)
      projector: null                     # train the projector? default: yes for full, no otherwise
      lora: {r: 128, alpha: 256, dropout: 0.05, target_modules: null}   # mode: lora only
    optimizer:
      lr: 2.0e-5                          # language model (full) or LoRA weights
      vif_lr: null                        # VIF module (default: lr)
      projector_lr: null                  # projector (default: lr)
      weight_decay: 0.0
      max_grad_norm: 1.0
    schedule:
      scheduler: cosine                   # any transformers SchedulerType: cosine, linear, constant, ...
      warmup_ratio: 0.03
      epochs: 1
      max_steps: -1                       # > 0 overrides epochs
      per_device_batch_size: 16
      grad_accumulation: 1
    precision: auto                       # auto (the checkpoint's dtype where the machine runs it, else fp32)
                                          # | bf16 | fp16 | fp32 (or bfloat16 / float16 / float32)
    activation_checkpointing: true
    seed: 42
    logging_steps: 10
    save_steps: 500
    save_total_limit: 2
    dataloader_num_workers: 0
    report_to: none                       # none | tensorboard | wandb | ... or a list (transformers integrations)
    deepspeed: null                       # a DeepSpeed JSON (e.g. recipes/deepspeed_zero2.json) for torchrun
                                          # launches; with `accelerate launch --config_file` leave it null
    output_dir: runs/llava-vif
    resume: false                         # true: continue from the last checkpoint in output_dir; or a path
    # Any other transformers TrainingArguments field passes through as a top-level key, validated
    # by TrainingArguments itself: optim, run_name, warmup_steps (replaces schedule.warmup_ratio),
    # eval_strategy, eval_steps, adam_beta2, lr_scheduler_kwargs, ... Fields the recipe sets under
    # its own name (learning_rate = optimizer.lr, bf16 = precision, ...) are refused with that name.

YAML note: PyYAML reads ``2e-5`` (no dot) as a string; numeric fields accept such
strings and convert them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import VIFConfig, VIFConfigError

PRESETS = ("paper", "released", "compact", "large")
MODES = ("full", "lora", "vif-only")
# The same dtype names as everywhere else (vif.loading.DTYPE_CHOICES); long names are stored short.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DEFAULT_WARMUP_RATIO = 0.03

# TrainingArguments fields that the recipe sets under its own key: passing them through would give
# two places for one setting, so they are refused with the recipe key to use.
MANAGED_TRAINING_ARGS = {
    "learning_rate": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "max_grad_norm": "optimizer.max_grad_norm",
    "lr_scheduler_type": "schedule.scheduler",
    "num_train_epochs": "schedule.epochs",
    "max_steps": "schedule.max_steps",
    "per_device_train_batch_size": "schedule.per_device_batch_size",
    "gradient_accumulation_steps": "schedule.grad_accumulation",
    "warmup_ratio": "schedule.warmup_ratio",
    "bf16": "precision",
    "fp16": "precision",
    "activation_checkpointing": "activation_checkpointing",
    "gradient_checkpointing": "activation_checkpointing",
    "activation_checkpointing_kwargs": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing",
    "resume_from_checkpoint": "resume",
    "remove_unused_columns": "(set by vif: the collator builds exactly the model's inputs)",
    "label_names": "(set by vif)",
}

# What the recipe fingerprint leaves out: keys that only change where the run lives, how often it
# logs, saves or evaluates, and where it reports, never what is trained. Everything else (model,
# vif, init_adapter, attn_implementation, data (with the training JSON's content), trainable,
# optimizer, schedule, precision, seed, and every other TrainingArguments field passed through)
# is part of it, so resuming with any of those changed is refused unless forced.
NOT_FINGERPRINTED = {
    "output_dir",
    "resume",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "dataloader_num_workers",
    "deepspeed",
    "activation_checkpointing",  # tested to give the same gradients
    "data.eval_json",
    "data.eval_image_folder",
}
NOT_FINGERPRINTED_PREFIXES = (
    "logging_",
    "log_",
    "save_",
    "eval_",
    "per_device_eval",
    "hub_",
    "push_to_hub",
    "run_name",
    "project",
    "trackio_",
    "disable_tqdm",
    "prediction_loss_only",
    "include_",
    "batch_eval_metrics",
    "load_best_model_at_end",
    "metric_for_best_model",
    "greater_is_better",
    "skip_memory_metrics",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "ddp_timeout",
    "torch_empty_cache_steps",
    "do_train",
    "do_eval",
    "do_predict",
    "restore_callback_states_from_checkpoint",
    "debug",
)


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the key and the fix."""


@dataclass
class DataRecipe:
    json: str = ""
    image_folder: str | None = None
    image_aspect: str = "pad"
    on_bad_image: str = "raise"
    max_length: int = 2048
    eval_json: str | None = None
    eval_image_folder: str | None = None


@dataclass
class LoraRecipe:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # None: every attention / MLP projection of the language model (never the vision tower).
    target_modules: list[str] | None = None


@dataclass
class TrainableRecipe:
    mode: str = "full"
    projector: bool | None = None
    lora: LoraRecipe = field(default_factory=LoraRecipe)


@dataclass
class OptimizerRecipe:
    lr: float = 2e-5
    vif_lr: float | None = None
    projector_lr: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class ScheduleRecipe:
    scheduler: str = "cosine"
    warmup_ratio: float | None = None  # None: 0.03, unless the recipe gives warmup_steps
    epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 16
    grad_accumulation: int = 1


@dataclass
class Recipe:
    """A validated training recipe; see the module docstring for the schema."""

    model: str = ""
    vif: str | dict[str, Any] | None = "compact"
    init_adapter: str | None = None
    attn_implementation: str = "sdpa"
    data: DataRecipe = field(default_factory=DataRecipe)
    trainable: TrainableRecipe = field(default_factory=TrainableRecipe)
    optimizer: OptimizerRecipe = field(default_factory=OptimizerRecipe)
    schedule: ScheduleRecipe = field(default_factory=ScheduleRecipe)
    precision: str = "auto"
    activation_checkpointing: bool = True
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    dataloader_num_workers: int = 0
    report_to: str | list[str] = "none"
    deepspeed: str | None = None
    output_dir: str = "runs/vif"
    resume: bool | str = False
    # Other TrainingArguments fields, passed through (written at the recipe's top level).
    training_args: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        recipe = _build(cls, data, "recipe")
        recipe.validate()
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as a recipe file would hold it (pass-through TrainingArguments at the top level)."""
        data = dataclasses.asdict(self)
        data.update(data.pop("training_args"))
        return data

    @property
    def warmup(self) -> float | int:
        """TrainingArguments' ``warmup_steps``: a step count, or a float < 1 = a ratio of the total steps."""
        if "warmup_steps" in self.training_args:
            return self.training_args["warmup_steps"]
        return DEFAULT_WARMUP_RATIO if self.schedule.warmup_ratio is None else self.schedule.warmup_ratio

    def fingerprinted(self) -> dict[str, Any]:
        """The recipe entries that define what is trained (see ``NOT_FINGERPRINTED``), flat and dotted."""
        flat = _flatten(self.to_dict())
        return {
            key: value
            for key, value in sorted(flat.items())
            if key not in NOT_FINGERPRINTED and not key.startswith(NOT_FINGERPRINTED_PREFIXES)
        }

    @property
    def uses_vif(self) -> bool:
        return self.vif is not None or self.init_adapter is not None

    @property
    def train_projector(self) -> bool:
        if self.trainable.projector is not None:
            return self.trainable.projector
        return self.trainable.mode == "full"

    def vif_config(self, model: Any) -> VIFConfig | None:
        """The VIF config for ``model`` (None for ``vif: null`` or when starting from ``init_adapter``)."""
        if self.vif is None or self.init_adapter is not None:
            return None
        spec = {"preset": self.vif} if isinstance(self.vif, str) else dict(self.vif)
        preset = spec.pop("preset", None)
        try:
            if preset is None:
                return VIFConfig.from_dict({"hidden_size": None, **spec})
            return VIFConfig.preset(preset, model, **spec)
        except (VIFConfigError, TypeError) as err:
            raise RecipeError(f"recipe key 'vif': {err}") from err

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def choice(key: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise RecipeError(f"recipe key {key!r} is {value!r}; valid values: {list(allowed)}.")

        if not self.model:
            raise RecipeError("recipe key 'model' is missing: give the base model's folder (or hub id).")
        if not self.data.json:
            raise RecipeError("recipe key 'data.json' is missing: give the LLaVA-format training JSON.")
        choice("trainable.mode", self.trainable.mode, MODES)
        self.precision = PRECISION_ALIASES.get(self.precision, self.precision)
        choice("precision", self.precision, PRECISIONS + tuple(PRECISION_ALIASES))
        choice("data.image_aspect", self.data.image_aspect, ("pad", "resize", "keep"))
        choice("data.on_bad_image", self.data.on_bad_image, ("raise", "skip"))
        choice("attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        if isinstance(self.vif, str):
            choice("vif", self.vif, PRESETS)
        elif isinstance(self.vif, dict):
            preset = self.vif.get("preset")
            if preset is not None:
                choice("vif.preset", preset, PRESETS)
            known = {f.name for f in dataclasses.fields(VIFConfig)} | {"preset"}
            unknown = sorted(set(self.vif) - known)
            if unknown:
                raise RecipeError(f"unknown key(s) {unknown} in 'vif'; valid keys: {sorted(known)}.")
        if self.init_adapter is not None and self.vif is not None:
            raise RecipeError(
                "give either 'vif' (a new VIF module) or 'init_adapter' (continue a saved one), not both; "
                "set 'vif: null' when using init_adapter (the adapter's own config is used)."
            )
        if self.trainable.mode == "vif-only" and self.trainable.projector:
            raise RecipeError(
                "trainable.projector: true with mode 'vif-only' would change the base model, which vif-only "
                "runs do not save; use mode 'lora' or 'full' to train the projector."
            )
        if self.trainable.mode == "vif-only" and not self.uses_vif:
            raise RecipeError("trainable.mode 'vif-only' with 'vif: null' trains nothing; pick a VIF preset.")
        positive = {
            "optimizer.lr": self.optimizer.lr,
            "schedule.per_device_batch_size": self.schedule.per_device_batch_size,
            "schedule.grad_accumulation": self.schedule.grad_accumulation,
            "data.max_length": self.data.max_length,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
            "trainable.lora.r": self.trainable.lora.r,
        }
        for key, value in positive.items():
            if value <= 0:
                raise RecipeError(f"recipe key {key!r} must be > 0, got {value}.")
        for key, value in {
            "optimizer.vif_lr": self.optimizer.vif_lr,
            "optimizer.projector_lr": self.optimizer.projector_lr,
        }.items():
            if value is not None and value <= 0:
                raise RecipeError(f"recipe key {key!r} must be > 0 (or null = optimizer.lr), got {value}.")
        ratio = self.schedule.warmup_ratio
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise RecipeError(f"schedule.warmup_ratio must be in [0, 1), got {ratio}.")
        if ratio is not None and "warmup_steps" in self.training_args:
            raise RecipeError("give schedule.warmup_ratio or warmup_steps, not both.")
        if isinstance(self.report_to, list) and not all(isinstance(r, str) for r in self.report_to):
            raise RecipeError(f"report_to must be a name or a list of names, got {self.report_to!r}.")
        if self.data.eval_image_folder is not None and self.data.eval_json is None:
            raise RecipeError("data.eval_image_folder is set but data.eval_json (the evaluation set) is not.")
        if not 0.0 <= self.trainable.lora.dropout < 1.0:
            raise RecipeError(f"trainable.lora.dropout must be in [0, 1), got {self.trainable.lora.dropout}.")
        if self.optimizer.weight_decay < 0:
            raise RecipeError(f"optimizer.weight_decay must be >= 0, got {self.optimizer.weight_decay}.")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise RecipeError(f"deepspeed: {self.deepspeed!r} is not a file; give a DeepSpeed JSON config.")
        if self.schedule.max_steps <= 0 and self.schedule.epochs <= 0:
            raise RecipeError(
                "set schedule.epochs > 0 or schedule.max_steps > 0; as given, nothing would train."
            )
        from transformers import SchedulerType

        choice("schedule.scheduler", self.schedule.scheduler, tuple(s.value for s in SchedulerType))


# -----------------------------------------------------------------------------
# Reading


def load_recipe(source: str | Path | dict[str, Any] | Recipe, **overrides: Any) -> Recipe:
    """A :class:`Recipe` from a YAML / JSON file, a dict, or a Recipe.

    ``overrides`` are dotted keys, e.g. ``{"schedule.max_steps": 10, "output_dir": "x"}``,
    applied before validation (the CLI's ``--set key=value``).
    """
    if isinstance(source, Recipe):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = json.loads(json.dumps(source, default=str))  # a deep copy that turns Paths into str
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist.")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise RecipeError(f"recipe file {str(path)!r}: use a .yaml, .yml or .json file.")
        if not isinstance(data, dict):
            raise RecipeError(
                f"recipe file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}."
            )
    for dotted, value in overrides.items():
        _set_dotted(data, dotted, value)
    return Recipe.from_dict(data)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set {dotted!r}: {key!r} is not a mapping.")
    node[last] = value


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiates dataclass ``cls`` from a mapping, checking keys and types on the way."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping of keys, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = dict(data)
    passthrough: dict[str, Any] = {}
    if where == "recipe":
        passthrough = dict(data.pop("training_args", None) or {})
        for name in [k for k in data if k not in fields and k in _training_argument_names()]:
            passthrough[name] = data.pop(name)
        for name in passthrough:
            if name in MANAGED_TRAINING_ARGS or name in fields:
                raise RecipeError(
                    f"recipe key {name!r} is a TrainingArguments field the recipe sets itself; use "
                    f"{MANAGED_TRAINING_ARGS.get(name, name)!r} instead."
                )
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = "" if where == "recipe" else f"{where}."
        also = " or any transformers TrainingArguments field" if where == "recipe" else ""
        raise RecipeError(
            f"unknown recipe key(s) {[prefix + k for k in unknown]}; valid keys"
            f"{'' if where == 'recipe' else ' in ' + repr(where)}: {sorted(set(fields) - {'training_args'})}{also}."
        )
    values = {}
    for name, value in data.items():
        key = name if where == "recipe" else f"{where}.{name}"
        values[name] = _coerce(hints[name], value, key)
    if where == "recipe":
        values["training_args"] = passthrough
    return cls(**values)


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    if value is None:
        if type(None) in options:
            return None
        raise RecipeError(f"recipe key {key!r} cannot be null.")
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 2e-5 as a string
            except ValueError:
                pass
        if origin is str and isinstance(value, (str, Path)):
            return str(value)
        if origin is list and isinstance(value, list):
            return [str(v) for v in value]
        if origin is dict and isinstance(value, dict):
            return value
    names = [getattr(o, "__name__", str(o)) for o in options]
    raise RecipeError(f"recipe key {key!r} = {value!r} has the wrong type; expected {' or '.join(names)}.")
