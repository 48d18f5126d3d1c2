"""``diagnose`` and ``compare``: samples in, an output folder of numbers, plots and html out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from ..model import VIFModel
from .collect import Collection, collect, vif_settings
from .inputs import iter_batches
from .stats import difference, summarise, violin_values

Run = tuple[Collection, dict]
# What write_outputs() writes to an output folder (`vif diagnose --overwrite` removes exactly these).
OUTPUT_FILES = (
    "summary.json",
    "index.html",
    "attention_ratio.png",
    "attention_violin.png",
    "entropy.png",
    "attention_values.npz",
    "heatmaps/sample*_image*.png",
)


def _image_norm(processor: Any) -> tuple[Any, Any]:
    image_processor = getattr(processor, "image_processor", None)
    return getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)


def _reiterable(samples: Any) -> Any:
    """``compare`` walks the samples twice: turn a one-shot iterator into a list."""
    if isinstance(samples, (str, Path, list, tuple)) or hasattr(samples, "__len__"):
        return samples
    return list(samples)


def _total(samples: Any) -> int | None:
    """Number of samples, for the progress bar (None when unknown)."""
    if isinstance(samples, (str, Path)):
        from ..data.llava_format import read_llava_json

        return len(read_llava_json(samples))
    if isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], dict):
        first = samples[0]["input_ids"]
        return sum(b["input_ids"].shape[0] for b in samples) if first.dim() == 2 else len(samples)
    if isinstance(samples, (list, tuple)):
        return len(samples)
    return None


def _run(model: nn.Module, samples: Any, label: str, options: dict[str, Any]) -> Collection:
    processor = options["processor"]
    mean, std = _image_norm(processor)
    batches = iter_batches(
        samples, processor, options["image_folder"], options["batch_size"], options["image_aspect"]
    )
    collection = collect(
        model,
        batches,
        rows=options["rows"],
        layers=options["layers"],
        route=options["route"],
        label=label,
        max_samples=options["max_samples"],
        keep_images=options["n_heatmaps"],
        image_mean=mean,
        image_std=std,
        max_new_tokens=options["max_new_tokens"],
        tokenizer=getattr(processor, "tokenizer", processor),
        progress=options["progress"],
        total=_total(samples),
    )
    if not collection.records:
        raise ValueError(
            f"no sample with an image was seen ({collection.skipped} text-only samples skipped); the "
            "diagnostics measure attention on image tokens. Give samples with images."
        )
    return collection


def write_outputs(
    out_dir: str | Path, runs: list[Run], heatmap_layers: list[int] | None = None
) -> dict[str, Any]:
    """Writes ``summary.json``, the figures, ``heatmaps/``, ``attention_values.npz`` and ``index.html``.

    Returns what ``summary.json`` holds: one run's summary, or for two runs
    ``{"base": ..., "vif": ..., "difference": vif - base}``.
    """
    # matplotlib is imported on use: `import vif` stays light.
    from .plots import plot_entropy, plot_heatmaps, plot_ratio, plot_violin
    from .report import write_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summary for _, summary in runs]
    if not all(collection.records for collection, _ in runs):
        raise ValueError(
            "no sample with an image was seen; the diagnostics measure attention on image tokens."
        )
    values = [violin_values(collection) for collection, _ in runs]
    plot_ratio(runs, out / "attention_ratio.png")
    plot_violin(runs, values, out / "attention_violin.png")
    plot_entropy(runs, out / "entropy.png")
    heatmaps = plot_heatmaps(runs, out / "heatmaps", heatmap_layers)
    np.savez_compressed(
        out / "attention_values.npz",
        **{
            f"{s['label']}/layer{layer}": v for s, vals in zip(summaries, values) for layer, v in vals.items()
        },
    )
    diff = difference(summaries[0], summaries[1]) if len(runs) == 2 else None
    figures = {
        "Visual attention ratio per layer (band: +- one standard deviation over samples).": "attention_ratio.png",
        "Distribution of the renormalised visual attention per layer, relative to uniform (log10).": "attention_violin.png",
        "Entropy of the renormalised visual attention per layer; dashed: the uniform maximum ln Nv.": "entropy.png",
    }
    write_html(out / "index.html", summaries, figures, heatmaps, diff)
    if len(runs) == 1:
        result = summaries[0]
    else:
        result = {"base": summaries[0], "vif": summaries[1], "difference": diff}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def diagnose(
    model: nn.Module,
    samples: Iterable[Any] | str | Path,
    out_dir: str | Path,
    rows: str = "auto",
    layers: list[int] | None = None,
    heatmap_layers: list[int] | None = None,
    processor: Any = None,
    image_folder: str | Path | None = None,
    batch_size: int = 4,
    max_samples: int | None = None,
    n_heatmaps: int = 4,
    route: str = "probe",
    max_new_tokens: int = 16,
    label: str | None = None,
    progress: bool = True,
    image_aspect: str = "pad",
) -> dict[str, Any]:
    """Per-layer visual attention ratio, distribution, entropy and heatmaps of one model.

    Args:
        model: a transformers VLM (loaded with ``attn_implementation="sdpa"`` or eager) or a
            :class:`vif.VIFModel` - then the numbers are those of the injected attention.
        samples: model-ready batches (``input_ids``, ``attention_mask``, ``pixel_values``,
            optional ``labels``), a list of ``(PIL image, question[, answer])`` (needs
            ``processor``), or a LLaVA-format JSON/JSONL path (needs ``processor``; images
            under ``image_folder``). See :mod:`vif.diagnostics.inputs`.
        out_dir: folder for ``summary.json``, ``attention_ratio.png``,
            ``attention_violin.png``, ``entropy.png``, ``heatmaps/``,
            ``attention_values.npz`` and ``index.html``.
        rows: query rows averaged: ``"auto"`` (answer tokens where a sample has them, else
            the last prompt token), ``"answer"``, ``"last"`` or ``"generated"`` (greedy
            generation of ``max_new_tokens``; the rows that produced each token).
        layers: decoder layers to analyse (default all); ``heatmap_layers``: layers drawn
            in the heatmaps (default: quarter, half, three quarters, last, + VIF's injection layers).
        n_heatmaps: heatmap figures for the first ``n_heatmaps`` samples.
        route: ``"probe"`` (fast; rows computed from query and key inside SDPA) or
            ``"attentions"`` (eager ``output_attentions=True`` reference; same numbers).
        label: name of the run in plots and json (default ``"VIF"`` / ``"base"``).
        image_aspect: how the images of a LLaVA-format file are squared before the processor:
            ``"pad"`` (LLaVA-1.5, ``vif train``'s default), ``"resize"`` or ``"keep"``; use what
            the model or adapter was trained with. PIL-image samples go to the processor as given.

    Returns:
        the summary written to ``summary.json`` (see :mod:`vif.diagnostics.stats`).
    """
    options = dict(locals())
    label = label or ("VIF" if vif_settings(model)[0] else "base")
    collection = _run(model, samples, label, options)
    return write_outputs(out_dir, [(collection, summarise(collection))], heatmap_layers)


def compare(
    base_model: nn.Module,
    adapter: str | Path | VIFModel,
    samples: Iterable[Any] | str | Path,
    out_dir: str | Path,
    rows: str = "auto",
    layers: list[int] | None = None,
    heatmap_layers: list[int] | None = None,
    processor: Any = None,
    image_folder: str | Path | None = None,
    batch_size: int = 4,
    max_samples: int | None = None,
    n_heatmaps: int = 4,
    route: str = "probe",
    max_new_tokens: int = 16,
    progress: bool = True,
    image_aspect: str = "pad",
    **vif_overrides: Any,
) -> dict[str, Any]:
    """The base model and base + VIF on the same samples, side by side.

    ``adapter`` is a ``VIFModel.save_pretrained`` folder (attached to ``base_model`` with
    :meth:`vif.VIFModel.from_pretrained` before anything runs, ``vif_overrides`` e.g. ``alpha``,
    and detached afterwards) or a :class:`vif.VIFModel` (``base_model`` may then be None).
    The base run is the attached model inside :meth:`~vif.VIFModel.disabled`, which computes
    exactly the base model. Other arguments as
    :func:`diagnose`. Returns ``{"base": ..., "vif": ..., "difference": vif - base}``.
    """
    options = dict(locals())
    samples = _reiterable(samples)
    if isinstance(adapter, VIFModel):
        vmodel, attached_here = adapter, False
    else:
        if base_model is None:
            raise ValueError(
                "compare(base_model=None, adapter=<folder>): a saved adapter needs the base model to attach "
                "to; pass the loaded model as base_model (or pass a VIFModel as adapter)."
            )
        if getattr(base_model, "_vif_attached", False):
            raise ValueError("base_model already has VIF attached; pass the VIFModel as `adapter` instead.")
        # Attach first: a bad adapter folder fails here, before the base run's work. With VIF
        # disabled the attached model computes exactly the base model (no attender, no injection).
        vmodel, attached_here = VIFModel.from_pretrained(base_model, adapter, **vif_overrides), True
    try:
        with vmodel.disabled():
            base = _run(vmodel, samples, "base", options)
        vif_run = _run(vmodel, samples, "VIF", options)
    finally:
        if attached_here:
            vmodel.detach()
    return write_outputs(out_dir, [(base, summarise(base)), (vif_run, summarise(vif_run))], heatmap_layers)
