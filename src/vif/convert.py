"""``vif convert-authors``: a checkpoint of the authors' released code -> a vif adapter folder.

    vif convert-authors checkpoints/llava-vif_7b my-vif [--set normalisation=sum ...]

The released training code keeps its module as ``model.attention_bias_generator`` of its
LLaVA model. This reads that module's tensors from

* a full checkpoint: ``model.safetensors.index.json`` + shards, ``model.safetensors``,
  ``pytorch_model.bin.index.json`` + shards or ``pytorch_model.bin`` (the LLM, projector
  and vision tower tensors beside it are left alone), or
* a LoRA run's ``non_lora_trainables.bin`` (keys under ``base_model.model.model.``),

(or SRC names one of those files), and the run's ``config.json`` beside them
(``hidden_size``, ``num_hidden_layers`` and the ``latent_*`` fields), and writes
``OUT/vif_config.json`` + ``OUT/vif_module.safetensors``, what
:meth:`vif.VIFModel.from_pretrained` loads onto a transformers LLaVA of the same size.

The module is written for ``attender="released"`` (the same computation, to float
precision: ``tests/test_convert.py``), with the released code's behaviour
(:data:`vif.config.RELEASED_BEHAVIOUR`, ``loss_pairs="first"``); any field but those the
weights fix can be overridden. Renames: each ``nn.MultiheadAttention``'s ``in_proj_weight``
/ ``in_proj_bias`` (q, k, v stacked along dim 0) becomes ``q_proj`` / ``k_proj`` /
``v_proj``, ``out_proj`` becomes ``o_proj``; ``latent_queries (1, K, C)`` becomes
``slots (K, C)``. The tensors that cannot influence any output (each branch's last
encoder block's text-stream tail and final text LayerNorm) are dropped with a note;
any other tensor under the module that has no place in ours is an error naming it.
``.bin`` files are read with ``torch.load(weights_only=True)``; we write safetensors only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .attender import ProbabilisticAttender
from .config import CONFIG_NAME, PAPER_METHOD, RELEASED_BEHAVIOUR, VIFConfig, VIFConfigError
from .model import WEIGHTS_NAME

MODULE_PREFIX = "attention_bias_generator."

# Checked in this order in a SRC folder; the first one present is read.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "non_lora_trainables.bin",
)

# Released sub-module of an encoder's ``layers.{i}`` -> ours under ``blocks.{i}``.
BLOCK_NAMES = {
    "vision_self_attn": "attn_v_self",
    "vision_norm1": "norm_v_self",
    "text_self_attn": "attn_t_self",
    "text_norm1": "norm_t_self",
    "v2t_attn": "attn_v_to_t",
    "vision_norm2": "norm_v_cross",
    "t2v_attn": "attn_t_to_v",
    "text_norm2": "norm_t_cross",
    "vision_ffn.0": "ffn_v.up",
    "vision_ffn.2": "ffn_v.down",
    "vision_norm3": "norm_v_ffn",
    "text_ffn.0": "ffn_t.up",
    "text_ffn.2": "ffn_t.down",
    "text_norm3": "norm_t_ffn",
}
# Only the vision stream leaves the encoder: after the last block's vision FFN the text
# stream is never read again.
DEAD_IN_LAST_BLOCK = ("t2v_attn", "text_norm2", "text_ffn.0", "text_ffn.2", "text_norm3")

# Fields the converted weights determine; overriding them could only fail to load.
FIXED_BY_WEIGHTS = (
    "hidden_size",
    "latent_size",
    "num_encoder_layers",
    "ffn_size",
    "num_components",
    "attender",
    "use_posterior",
)


class ConversionError(ValueError):
    """A released checkpoint that cannot be converted; the message names the file or tensor."""


@dataclass
class Conversion:
    """What :func:`from_authors` wrote: the adapter folder, its config, and notes for the user."""

    out: Path
    config: VIFConfig
    notes: list[str] = field(default_factory=list)


def from_authors(src: str | Path, out: str | Path, **overrides: Any) -> Conversion:
    """Converts a released VIF checkpoint (folder or weight file) into a vif adapter folder ``out``.

    ``overrides`` replace fields of the written :class:`~vif.VIFConfig` (e.g.
    ``normalisation="sum"``, ``sample_at_inference=False``), except those the weights fix
    (:data:`FIXED_BY_WEIGHTS`). Refuses to overwrite an existing adapter in ``out``.

    Raises:
        ConversionError: no released module found, an unmapped tensor (named), shapes that
            disagree with ``config.json``, or an existing adapter in ``out``.
        VIFConfigError: an unknown or invalid override.
    """
    out = Path(out)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if (out / name).exists():
            raise ConversionError(f"{out / name} already exists; pick an empty output folder.")
    fixed = sorted(set(overrides) & set(FIXED_BY_WEIGHTS))
    if fixed:
        raise ConversionError(f"{fixed} are fixed by the checkpoint's weights and cannot be overridden.")

    files, config_path, others = locate_weights(Path(src))
    if not config_path.is_file():
        raise ConversionError(
            f"no config.json at {config_path}: the run's config (hidden_size, num_hidden_layers, latent_*) "
            "must lie beside the weights."
        )
    run_config = json.loads(config_path.read_text())
    released, others_read = read_module_tensors(files)
    others = others_read if others is None else others
    notes = [
        f"read {len(released)} tensors of {MODULE_PREFIX.rstrip('.')} from {', '.join(f.name for f in files)}"
        + (f"; left out {others} other tensors (LLM, projector, vision tower)" if others else "")
    ]

    state, dropped = rename_tensors(released)
    config, config_notes = config_from_run(run_config, state, overrides)
    notes += config_notes
    check_against_module(state, config)
    if dropped:
        numel = sum(released[k].numel() for k in dropped)
        notes.append(
            f"dropped {len(dropped)} tensors ({numel:,} parameters) that cannot influence any output: "
            "each branch's last encoder block's text-stream tail and its final text LayerNorm"
        )

    out.mkdir(parents=True, exist_ok=True)
    save_file(
        state,
        out / WEIGHTS_NAME,
        metadata={"format": "pt", "vif_version": "1", "source": "vif convert-authors"},
    )
    base_model = {
        "architecture": (run_config.get("architectures") or ["released LLaVA-VIF"])[0],
        "hidden_size": config.hidden_size,
        "num_hidden_layers": _text_field(run_config, "num_hidden_layers"),
    }
    data = {**config.to_dict(), "base_model": base_model}
    (out / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Conversion(out, config, notes)


# ------------------------------------------------------------------------ reading


def locate_weights(src: Path) -> tuple[list[Path], Path, int | None]:
    """The files holding the module, the run's ``config.json`` and, for an index, how many
    other tensors it lists (only the shards that hold module tensors are returned).
    """
    if src.is_dir():
        found = next((src / name for name in WEIGHT_FILES if (src / name).is_file()), None)
        if found is None:
            raise ConversionError(f"{src} holds none of {', '.join(WEIGHT_FILES)}; is it a released VIF run?")
    elif src.is_file():
        found = src
    else:
        raise ConversionError(f"{src} does not exist.")
    if not found.name.endswith(".index.json"):
        return [found], found.parent / "config.json", None
    weight_map = json.loads(found.read_text()).get("weight_map", {})
    shards = sorted({found.parent / f for k, f in weight_map.items() if module_key(k) is not None})
    if not shards:
        raise ConversionError(f"{found} lists no {MODULE_PREFIX}* tensors; was the run trained with VIF?")
    others = sum(module_key(k) is None for k in weight_map)
    return shards, found.parent / "config.json", others


def module_key(key: str) -> str | None:
    """``model.attention_bias_generator.x.weight`` (any prefix) -> ``x.weight``; None for other tensors."""
    head, sep, rest = key.partition(MODULE_PREFIX)
    if not sep or (head and not head.endswith(".")):
        return None
    return rest


def read_module_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], int]:
    """The released module's tensors, by their names inside the module, and how many others the files hold."""
    tensors: dict[str, torch.Tensor] = {}
    others = 0
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as handle:
                names = list(handle.keys())
                loaded = {k: handle.get_tensor(k) for k in names if module_key(k) is not None}
            others += len(names) - len(loaded)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, tensor in loaded.items():
            name = module_key(key)
            if name is None:
                others += 1
                continue
            if name in tensors:
                raise ConversionError(f"{path.name}: {key} appears twice (as {MODULE_PREFIX}{name}).")
            tensors[name] = tensor
    if not tensors:
        raise ConversionError(
            f"no {MODULE_PREFIX}* tensors in {', '.join(str(f) for f in files)}; was the run trained with VIF?"
        )
    return tensors, others


# ------------------------------------------------------------------------ names


def module_renames(num_layers: int) -> tuple[dict[str, str], set[str]]:
    """Released sub-module path -> ours, and the released paths that are dead (dropped)."""
    renames = {
        "compress_attn": "slot_attention",
        "renderer.pos_head": "gmm.center",
        "renderer.sigma_head": "gmm.spread",
        "renderer.weight_head": "gmm.logit",
    }
    dead = set()
    for branch in ("prior", "posterior"):
        encoder = f"{branch}_encoder"
        renames[f"{branch}_mean_head"] = f"{branch}.mu"
        renames[f"{branch}_logvar_head"] = f"{branch}.logvar"
        renames[f"{encoder}.img_proj"] = f"{branch}.vision_in"
        renames[f"{encoder}.txt_proj"] = f"{branch}.text_in"
        renames[f"{encoder}.vision_norm"] = f"{branch}.vision_norm"
        dead.add(f"{encoder}.text_norm")
        for i in range(num_layers):
            for theirs, ours in BLOCK_NAMES.items():
                if i == num_layers - 1 and theirs in DEAD_IN_LAST_BLOCK:
                    dead.add(f"{encoder}.layers.{i}.{theirs}")
                else:
                    renames[f"{encoder}.layers.{i}.{theirs}"] = f"{branch}.blocks.{i}.{ours}"
    return renames, dead


def encoder_depth(released: dict[str, torch.Tensor]) -> int:
    """Number of encoder blocks, from the ``prior_encoder.layers.{i}.`` names."""
    indices = {int(m.group(1)) for k in released if (m := re.match(r"prior_encoder\.layers\.(\d+)\.", k))}
    if not indices:
        raise ConversionError("no prior_encoder.layers.* tensors: not a released VIF module.")
    return max(indices) + 1


def rename_tensors(released: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released tensors -> ours (contiguous copies), and the names of the dropped dead ones."""
    renames, dead = module_renames(encoder_depth(released))
    paths = sorted(set(renames) | dead, key=len, reverse=True)  # longest match first
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, tensor in released.items():
        if key == "latent_queries":
            if tensor.dim() != 3 or tensor.shape[0] != 1:
                raise ConversionError(f"latent_queries has shape {tuple(tensor.shape)}, expected (1, K, C).")
            state["slots"] = tensor[0].clone()
            continue
        path = next((p for p in paths if key.startswith(p + ".")), None)
        if path is None:
            raise ConversionError(
                f"{MODULE_PREFIX}{key} has no counterpart in vif's module; cannot convert it."
            )
        if path in dead:
            dropped.append(key)
            continue
        param, ours = key[len(path) + 1 :], renames[path]
        if path.endswith("attn") and param in ("in_proj_weight", "in_proj_bias"):
            kind = "weight" if param == "in_proj_weight" else "bias"
            if tensor.shape[0] % 3:
                raise ConversionError(
                    f"{MODULE_PREFIX}{key} has {tensor.shape[0]} rows, not q, k, v stacked."
                )
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                state[f"{ours}.{name}.{kind}"] = part.clone()
        elif path.endswith("attn") and param in ("out_proj.weight", "out_proj.bias"):
            state[f"{ours}.o_proj.{param.split('.')[1]}"] = tensor.contiguous()
        elif not path.endswith("attn") and param in ("weight", "bias"):
            state[f"{ours}.{param}"] = tensor.contiguous()
        else:
            raise ConversionError(
                f"{MODULE_PREFIX}{key} has no counterpart in vif's module; cannot convert it."
            )
    return state, dropped


# ------------------------------------------------------------------------ config


def released_layer_pairs(run_config: dict[str, Any], depth: int) -> tuple[list[int], list[int], str]:
    """The extraction / injection layers the released code built from ``run_config``.

    Each range is ``range(start, end + 1, stride)`` after clamping to the model and
    ordering start <= end; ``latent_learning_*`` / ``latent_apply_*`` win, then the legacy
    ``latent_l_*`` / ``latent_start_layer``, ``latent_end_layer``; a range left null falls
    back to the released code's own defaults (extraction ``int(0.34 L) .. int(0.5 L)``,
    injection ``int(0.75 L) .. L - 1``). Unequal counts: injection becomes the last
    layers of ``range(0, L, stride)``, as the released code does. Returns the lists and a
    note on where they came from.
    """
    stride = run_config.get("latent_layer_stride", 2) or 1

    def value_range(keys: tuple[tuple[str, str], ...], default: tuple[int, int], what: str):
        for start_key, end_key in keys:
            start, end = run_config.get(start_key), run_config.get(end_key)
            if start is not None and end is not None:
                return int(start), int(end), f"{what} {start_key}/{end_key}"
        return default[0], default[1], f"{what} released default range"

    def layers(start: int, end: int) -> list[int]:
        start, end = (max(0, min(v, depth - 1)) for v in (start, end))
        start, end = min(start, end), max(start, end)
        return list(range(start, end + 1, stride))

    learn = value_range(
        (("latent_learning_start", "latent_learning_end"), ("latent_l_start", "latent_l_end")),
        (int(depth * 0.34), max(int(depth * 0.34), int(depth * 0.5))),
        "extraction",
    )
    apply = value_range(
        (("latent_apply_start", "latent_apply_end"), ("latent_start_layer", "latent_end_layer")),
        (int(depth * 0.75), max(int(depth * 0.75), depth - 1)),
        "injection",
    )
    extract, inject = layers(*learn[:2]), layers(*apply[:2])
    if len(inject) != len(extract):
        candidates = list(range(0, depth, stride))
        if len(candidates) >= len(extract):
            inject = candidates[-len(extract) :]
        else:
            extract, inject = extract[: len(candidates)], candidates
    return extract, inject, f"from {learn[2]}, {apply[2]}, stride {stride}"


def _text_field(run_config: dict[str, Any], key: str) -> Any:
    value = run_config.get(key)
    if value is None:
        value = (run_config.get("text_config") or {}).get(key)
    if value is None:
        raise ConversionError(f"config.json has no {key}; it is needed to place the module.")
    return value


def config_from_run(
    run_config: dict[str, Any], state: dict[str, torch.Tensor], overrides: dict[str, Any]
) -> tuple[VIFConfig, list[str]]:
    """Our config for the converted ``state``: sizes from the weights, the rest from ``run_config``.

    A ``latent_*`` value that is null or missing takes the released code's default.
    """
    hidden, depth = (
        int(_text_field(run_config, "hidden_size")),
        int(_text_field(run_config, "num_hidden_layers")),
    )
    latent, weight_hidden = state["prior.vision_in.weight"].shape
    if weight_hidden != hidden:
        raise ConversionError(
            f"img_proj takes width {weight_hidden} but config.json says hidden_size={hidden}; "
            "the config does not belong to these weights."
        )
    sizes = {
        "latent_hidden_size": latent,
        "latent_num_layers": 1 + max(int(k.split(".")[2]) for k in state if k.startswith("prior.blocks.")),
        "latent_ffn_dim": state["prior.blocks.0.ffn_v.up.weight"].shape[0],
        "latent_num_components": state["slots"].shape[0],
    }
    for key, value in sizes.items():
        if run_config.get(key) is not None and int(run_config[key]) != value:
            raise ConversionError(f"config.json says {key}={run_config[key]} but the weights have {value}.")

    def latent_value(key: str, default: float) -> float:
        value = run_config.get(key)
        return default if value is None else value

    extract, inject, where = released_layer_pairs(run_config, depth)
    values: dict[str, Any] = {
        **PAPER_METHOD,  # the released module has none of the project's additions
        "hidden_size": hidden,
        "latent_size": latent,
        "num_encoder_layers": sizes["latent_num_layers"],
        "ffn_size": sizes["latent_ffn_dim"],
        "num_components": sizes["latent_num_components"],
        # A missing key is the released config class's default (4); an explicit null or 0
        # falls through to the released module's own `or 8`.
        "num_heads": run_config.get("latent_num_heads", 4) or 8,
        "min_sigma": latent_value("latent_min_sigma", 0.035),
        "alpha": latent_value("latent_bias_alpha", 0.5),
        "kl_weight": latent_value("latent_kl_weight", 0.1),
        "sparsity_weight": latent_value("latent_sparsity_weight", 0.1),
        "entropy_weight": latent_value("latent_entropy_weight", 1.0),
        "volume_weight": latent_value("latent_volume_weight", 1.0),
        "extract_layers": extract,
        "inject_layers": inject,
        "attender": "released",
        "init": "released",
        "volume": "sigma2",
        "loss_pairs": "first",
        "use_posterior": True,
        "logvar_clamp": 5.0,
        **RELEASED_BEHAVIOUR,
    }
    values.update(overrides)
    try:
        config = VIFConfig.from_dict(values)
        config.validate(num_layers=depth)
    except VIFConfigError as err:
        raise VIFConfigError(f"converted config: {err}") from None
    notes = [f"layer pairs {config.pairs} ({where})"]
    released_values = {k: values[k] for k in (*RELEASED_BEHAVIOUR, "loss_pairs")}
    kept = {k: v for k, v in released_values.items() if k not in overrides}
    if kept:
        notes.append(f"released behaviour set: {kept} (override with --set FIELD=VALUE)")
    return config, notes


def check_against_module(state: dict[str, torch.Tensor], config: VIFConfig) -> None:
    """Every tensor of our module is present with its shape (built on the meta device)."""
    with torch.device("meta"):
        expected = ProbabilisticAttender(config).state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConversionError(
            f"the checkpoint has nothing for {missing[:5]} of vif's module ({len(missing)} in all)."
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ConversionError(
                f"converted {key} has shape {tuple(state[key].shape)}, vif's module expects {tuple(tensor.shape)}."
            )


# ------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="released run folder (or its weight / index file), with config.json")
    parser.add_argument("out", help="adapter folder to write (must not hold an adapter already)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a VIFConfig field of the output (JSON value, else a string), e.g. normalisation=sum",
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ConversionError(f"--set {pair!r}: expected FIELD=VALUE, e.g. --set normalisation=sum")
        try:
            overrides[name] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name] = text
    return overrides


def run(args: argparse.Namespace) -> int:
    try:
        result = from_authors(args.src, args.out, **parse_overrides(args.set))
    except (ConversionError, VIFConfigError) as err:
        print(f"vif convert-authors: error: {err}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.out / CONFIG_NAME} and {result.out / WEIGHTS_NAME}")
    return 0
