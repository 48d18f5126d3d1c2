"""A training run's output folder: what may be written there, its checkpoints, its recipe fingerprint.

* :func:`check_output_dir` refuses to write where something a user made would be
  overwritten: the base model's own folder, or a folder holding a model that
  ``vif train`` did not write; and a finished or interrupted run unless it is resumed.
* :func:`find_resume_checkpoint` picks the last *complete* ``checkpoint-<step>``. A
  checkpoint is complete once the Trainer wrote ``trainer_state.json``, its last file; one
  interrupted while being written is skipped with a warning.
* :func:`check_fingerprint` compares the recipe with the one the run started with
  (``vif_run.json``), so a changed recipe does not resume silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

MARKER_NAME = "vif_run.json"  # written by vif train when a run starts: its recipe fingerprint
RECIPE_NAME = "training_recipe.json"  # written by the trainer with every save (see trainer.py)
VIF_SUBDIR = "vif"
STATE_NAME = "trainer_state.json"  # the Trainer writes it last in a checkpoint
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files a save_pretrained model folder holds; finding one in a folder vif train did not write
# means that training there would overwrite someone's model.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_config.json",
    "adapter_model.safetensors",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def written_by_vif(folder: Path) -> bool:
    """Whether ``vif train`` wrote ``folder`` (its marker, or its recipe beside the model or in a checkpoint)."""
    if (folder / MARKER_NAME).is_file() or (folder / RECIPE_NAME).is_file():
        return True
    return any((checkpoint / RECIPE_NAME).is_file() for checkpoint in checkpoints(folder))


def checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-<step>`` folders, by step."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def incomplete_reason(checkpoint: Path, recipe: Recipe) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None: it is complete)."""
    if not (checkpoint / STATE_NAME).is_file():
        return f"no {STATE_NAME} (interrupted while it was being written)"
    if recipe.uses_vif and not (checkpoint / VIF_SUBDIR / "vif_module.safetensors").is_file():
        return f"no {VIF_SUBDIR}/vif_module.safetensors"
    mode = recipe.trainable.mode
    # DeepSpeed and FSDP keep the model in their own sharded files (global_step<N>/, pytorch_model_fsdp_0/).
    sharded = any(p.name.startswith(("global_step", "pytorch_model_fsdp")) for p in checkpoint.iterdir())
    if mode == "lora" and not (checkpoint / "adapter_model.safetensors").is_file() and not sharded:
        return "no adapter_model.safetensors"
    if mode == "full" and not any((checkpoint / n).is_file() for n in MODEL_FILES[1:3]) and not sharded:
        return "no model weights"
    return None


def find_resume_checkpoint(output_dir: Path, recipe: Recipe) -> Path | None:
    """The checkpoint ``recipe.resume`` asks for, checked complete; None when not resuming.

    ``resume: true`` takes the last complete checkpoint of ``output_dir`` (skipping, with a
    warning, any written later but left incomplete); a path must be a complete checkpoint.
    """
    if recipe.resume is False:
        return None
    if isinstance(recipe.resume, str):
        checkpoint = Path(recipe.resume)
        if not checkpoint.is_dir():
            raise RecipeError(f"resume: {recipe.resume!r} is not a checkpoint directory.")
        reason = incomplete_reason(checkpoint, recipe)
        if reason:
            raise RecipeError(
                f"resume: {recipe.resume} is incomplete ({reason}); resume from an earlier checkpoint, "
                "or with resume: true (the last complete one)."
            )
        return checkpoint
    found = checkpoints(output_dir)
    for checkpoint in reversed(found):
        reason = incomplete_reason(checkpoint, recipe)
        if reason is None:
            return checkpoint
        logger.warning("skipping %s: it is incomplete (%s)", checkpoint, reason)
    detail = f" ({len(found)} incomplete ones skipped)" if found else ""
    raise RecipeError(
        f"resume: true but {output_dir} holds no complete checkpoint-<step> folder to resume from{detail}; "
        "start without resume, or give the checkpoint path."
    )


def check_output_dir(recipe: Recipe, model_path: str) -> None:
    """Refuses an output folder where training would overwrite a model or an earlier run."""
    output_dir = Path(recipe.output_dir)
    if Path(model_path).exists() and output_dir.resolve() == Path(model_path).resolve():
        raise RecipeError(
            f"output_dir {str(output_dir)!r} is the base model's own folder; training would overwrite it. "
            "Choose another output_dir."
        )
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise RecipeError(f"output_dir {str(output_dir)!r} is a file; choose a folder.")
    if not written_by_vif(output_dir):
        found = [n for n in MODEL_FILES if (output_dir / n).exists()] + [
            p.name for p in checkpoints(output_dir)
        ]
        if found:
            raise RecipeError(
                f"output_dir {str(output_dir)!r} holds a model vif train did not write ({', '.join(found[:4])}); "
                "training would overwrite it. Choose another output_dir."
            )
        return
    if recipe.resume is not False:
        return
    earlier = [p.name for p in checkpoints(output_dir)]
    if earlier:
        raise RecipeError(
            f"output_dir {str(output_dir)!r} already holds checkpoints of an earlier run (e.g. {earlier[-1]}); "
            "continue it with resume: true (CLI: --resume), or choose a new output_dir."
        )
    finished = [n for n in (RECIPE_NAME, STATE_NAME, *MODEL_FILES) if (output_dir / n).exists()]
    if finished:
        raise RecipeError(
            f"output_dir {str(output_dir)!r} holds a finished run ({', '.join(finished[:3])}); choose a new "
            "output_dir (or delete this one to train again)."
        )


# -----------------------------------------------------------------------------
# The recipe fingerprint


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(recipe: Recipe, with_data_hash: bool = True) -> dict[str, Any]:
    """``{"keys": {dotted key: value}, "sha256": ...}`` of what defines the run (``Recipe.fingerprinted``).

    Local paths are made absolute (the same run may be resumed from another directory), and the
    training JSON enters with its content's hash, so an edited data file counts as a change.
    """
    keys = recipe.fingerprinted()
    for key in ("model", "data.json", "data.image_folder", "init_adapter"):
        value = keys.get(key)
        if isinstance(value, str) and Path(value).exists():
            keys[key] = str(Path(value).resolve())
    if with_data_hash and Path(recipe.data.json).is_file():
        keys["data.json.sha256"] = _file_sha256(Path(recipe.data.json))
    text = json.dumps(keys, sort_keys=True, default=str)
    return {"keys": json.loads(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _saved_fingerprint(output_dir: Path, checkpoint: Path | None) -> dict[str, Any] | None:
    marker = output_dir / MARKER_NAME
    if marker.is_file():
        return json.loads(marker.read_text())["fingerprint"]
    for folder in (checkpoint, output_dir):  # runs started before vif_run.json existed
        if folder is not None and (folder / RECIPE_NAME).is_file():
            saved = Recipe.from_dict(json.loads((folder / RECIPE_NAME).read_text()))
            return fingerprint(saved, with_data_hash=False)
    return None


def check_fingerprint(recipe: Recipe, checkpoint: Path, force: bool) -> list[str]:
    """The fingerprinted keys that changed since the run started; refused unless ``force``."""
    output_dir = Path(recipe.output_dir)
    saved = _saved_fingerprint(output_dir, checkpoint)
    if saved is None:
        logger.warning(
            "%s has no recorded recipe; resuming without checking that it is unchanged", output_dir
        )
        return []
    now = fingerprint(recipe)
    if now["sha256"] == saved["sha256"]:
        return []
    old, new = saved["keys"], now["keys"]
    if "data.json.sha256" not in old:
        new.pop("data.json.sha256", None)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not changed:
        return []
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
    if not force:
        raise RecipeError(
            f"the recipe differs from the one {output_dir} was started with ({shown}); resuming would not "
            "continue the same run. Undo the change, train into a new output_dir, or pass --force "
            "(train(..., force=True)) to resume anyway."
        )
    logger.warning("resuming %s with a changed recipe (--force): %s", output_dir, shown)
    return changed


def write_marker(recipe: Recipe, changed: list[str] | None = None) -> None:
    """Records the recipe's fingerprint in ``output_dir/vif_run.json`` (process 0 only)."""
    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"fingerprint": fingerprint(recipe)}
    if changed:
        data["forced_changes"] = changed
    (output_dir / MARKER_NAME).write_text(json.dumps(data, indent=2) + "\n")
