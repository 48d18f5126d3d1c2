"""A saved VIF module (``vif_config.json`` + ``vif_module.safetensors``): finding it, checking it.

:func:`resolve_adapter` turns what a user passes as an adapter - a local folder, or a
Hugging Face hub id like ``someone/llava-vif`` - into a local folder (the hub through
``huggingface_hub``, so its cache, ``HF_HUB_OFFLINE`` and tokens work as for any model).

:func:`inspect_adapter` checks a saved module against a model's *config* without
loading any weights: the saved config must describe the same backbone, and the shapes
in the safetensors header must be those of the module the config builds. Everything
that can go wrong when loading is found here, before a model is touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, LEGACY_VALUES, VIFConfig, VIFConfigError

WEIGHTS_NAME = "vif_module.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
# The folder `vif train` writes the VIF module to, inside its output folder.
TRAINING_SUBDIR = "vif"


class VIFLoadError(ValueError):
    """A saved VIF module that cannot be found, or that does not fit the model it is loaded onto."""


def _looks_like_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or "\\" in text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _missing_folder_message(path: Path) -> str:
    if not path.exists():
        message = f"the VIF adapter folder {str(path)!r} does not exist"
    else:
        message = f"{str(path)!r} holds no {CONFIG_NAME}, so it is not a VIF adapter folder"
    if (path / TRAINING_SUBDIR / CONFIG_NAME).is_file():
        # The most common slip: passing the training run's folder instead of its vif/ subfolder.
        message += (
            f"; it is a training run's folder, and its VIF adapter is {str(path / TRAINING_SUBDIR)!r}. "
            f"Pass that instead"
        )
    else:
        message += "; point to a folder written by VIFModel.save_pretrained (vif train writes OUTPUT_DIR/vif)"
    return message


def resolve_adapter(
    adapter: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    weights: bool = True,
) -> Path:
    """The local folder of a saved VIF module: ``adapter`` itself, or its hub snapshot.

    A hub id is fetched with ``huggingface_hub.snapshot_download`` (only the adapter's two
    files; ``weights=False`` fetches the config alone, for checks). Offline
    (``HF_HUB_OFFLINE=1`` or ``local_files_only``) it is read from the hub cache.
    Raises :class:`VIFLoadError` when neither a local folder nor a hub adapter is found.
    """
    path = Path(adapter).expanduser()
    local = path / subfolder if subfolder else path
    if (local / CONFIG_NAME).is_file():
        return local
    if path.exists() or not _looks_like_repo_id(str(adapter)):
        raise VIFLoadError(_missing_folder_message(local) + ".")

    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    wanted = [prefix + CONFIG_NAME] + ([prefix + WEIGHTS_NAME] if weights else [])
    try:
        snapshot = snapshot_download(
            repo_id=str(adapter),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=wanted,
        )
    except Exception as err:  # offline without a cached copy, no such repo, no access, ...
        raise VIFLoadError(
            f"{str(adapter)!r} is not a local folder, and loading it as a Hugging Face hub adapter failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Check the path, or the "
            "hub id and your access to it (offline: HF_HUB_OFFLINE=1 reads the local hub cache only)."
        ) from err
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not (folder / CONFIG_NAME).is_file():
        raise VIFLoadError(
            f"the hub repository {str(adapter)!r}{f' (subfolder {subfolder!r})' if subfolder else ''} has no "
            f"{CONFIG_NAME}; is it a VIF adapter (VIFModel.save_pretrained)?"
        )
    return folder


def read_adapter_config(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config fields, saved-for backbone info)`` of a saved module's ``vif_config.json``."""
    path = directory / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VIFLoadError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}).") from None
    if not isinstance(data, dict):
        raise VIFLoadError(f"{path} must hold a JSON object of VIFConfig fields.")
    saved_for = data.pop("base_model", {}) or {}
    return {**LEGACY_VALUES, **data}, saved_for


def text_dims(model_config: Any) -> dict[str, Any]:
    """``model_type``, ``hidden_size`` and ``num_hidden_layers`` of a VLM config (its text model's)."""
    text = getattr(model_config, "text_config", None) or model_config
    return {
        "model_type": getattr(model_config, "model_type", None),
        "hidden_size": int(text.hidden_size),
        "num_hidden_layers": int(text.num_hidden_layers),
    }


def expected_shapes(config: VIFConfig) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the module ``config`` builds (built on the meta device: no memory)."""
    from .attender import ProbabilisticAttender

    with torch.device("meta"):
        module = ProbabilisticAttender(config)
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def saved_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # a truncated or foreign file
        raise VIFLoadError(
            f"{weights} is not a readable safetensors file ({type(err).__name__}: {err}); re-save the adapter."
        ) from err


def inspect_adapter(directory: str | Path, model_config: Any, **overrides: Any) -> VIFConfig:
    """The :class:`VIFConfig` a saved module has on a model with ``model_config``, checked without weights.

    ``overrides`` replace saved fields (as in ``VIFModel.from_pretrained``). Raises
    :class:`VIFLoadError` if the module was saved for another backbone, its weights file
    is missing or unreadable, or its tensors do not have the shapes the (overridden)
    config builds; :class:`~vif.config.VIFConfigError` for an invalid config.
    """
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise VIFLoadError(_missing_folder_message(directory) + ".")
    data, saved_for = read_adapter_config(directory)
    here = text_dims(model_config)
    for key, value in here.items():
        if key in saved_for and saved_for[key] != value:
            raise VIFLoadError(
                f"the VIF module in {directory} was saved for a {saved_for.get('architecture')} with "
                f"{key}={saved_for[key]}, but this model has {key}={value}. Load it onto the backbone it was "
                "trained with."
            )
    try:
        config = VIFConfig.from_dict({**data, **overrides})
    except TypeError as err:
        raise VIFConfigError(f"{directory / CONFIG_NAME}: {err}") from None
    if config.hidden_size is None:
        config = VIFConfig.from_dict({**config.to_dict(), "hidden_size": here["hidden_size"]})
    elif config.hidden_size != here["hidden_size"]:
        raise VIFLoadError(
            f"the VIF module in {directory} has hidden_size={config.hidden_size}, but this model's language "
            f"model has {here['hidden_size']}."
        )
    config.validate(num_layers=here["num_hidden_layers"])

    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise VIFLoadError(f"{weights} does not exist; the adapter folder is incomplete.")
    have, want = saved_shapes(weights), expected_shapes(config)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
        changed = sorted(k for k in overrides if k in data and data[k] != overrides[k])
        because = (
            f" The overrides {changed} change the module's shape; only inference-time fields (alpha, "
            "injection, inject_decode, ...) can be overridden when loading."
            if changed
            else ""
        )
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                ", ".join(f"{k}: saved {have[k]} vs config {want[k]}" for k in wrong[:3]),
            )
            if part
        )
        raise VIFLoadError(f"{weights} does not match the VIF config it is loaded with ({detail}).{because}")
    return config
