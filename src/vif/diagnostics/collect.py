"""Running a model over samples and keeping, per sample and layer, its attention on the image.

Two routes give the same numbers (the tests hold them equal):

* ``"probe"`` (default, fast): the model runs on SDPA; :class:`~.probe.AttentionProbe`
  recomputes only the chosen query rows inside the attention function.
* ``"attentions"`` (reference): the model runs on eager attention with
  ``output_attentions=True`` and the rows are read from the returned ``(B, H, L, L)``
  matrices - with VIF attached, injected layers return the injected ``A'``.

Per sample the result is a :class:`SampleRecord` whose ``visual`` array holds, for each
analysed layer, the attention on each image token averaged over heads and over the chosen
rows: ``visual[l].sum()`` is the visual attention ratio, ``visual[l] / visual[l].sum()``
the visual attention distribution.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..backbones import VisionLayout, get_backbone
from ..model import VIFModel
from ..placement import input_device
from .inputs import Batch, Meta, prompt_only
from .probe import AttentionProbe, RowSelection, hf_model, image_mass, probing, select_rows

ROW_MODES = ("auto", "answer", "last", "generated")
ROUTES = ("probe", "attentions")
# LLaVA's CLIP normalisation, used to recover the image from pixel_values when no processor is given.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SampleRecord:
    """What the diagnostics keep of one sample.

    visual: ``(n_layers, Nv)`` float32, attention on each image token averaged over heads
        and chosen rows, one row per analysed layer (``Collection.layers``).
    grids: the ``(rows, cols)`` token grid of each of the sample's images, in order.
    n_rows: number of query rows averaged.
    importance: injection layer -> ``(Nv,)`` VIF's importance map (empty without VIF).
    images: per image, the ``(H, W, 3)`` uint8 picture the model saw (None when not kept).
    meta: ``id`` and, when known, ``question`` / ``answer`` / ``generated`` text.
    """

    visual: np.ndarray
    grids: list[tuple[int, int]]
    n_rows: int
    importance: dict[int, np.ndarray] = field(default_factory=dict)
    images: list[np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collection:
    """All records of one run (one model / one setting)."""

    label: str
    layers: list[int]
    num_layers: int
    rows: str
    route: str
    records: list[SampleRecord] = field(default_factory=list)
    skipped: int = 0  # samples without any image token
    injection_layers: list[int] = field(default_factory=list)
    alpha: float | None = None


def vif_settings(model: nn.Module) -> tuple[list[int], float | None]:
    """Injection layers and alpha of an enabled :class:`vif.VIFModel`, else ``([], None)``."""
    if isinstance(model, VIFModel) and model._runtime.enabled and model.config_vif.alpha > 0:
        return list(model.config_vif.inject_layers), float(model.config_vif.alpha)
    return [], None


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _pictures(
    batch: Batch,
    layout: VisionLayout,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    vision_config: Any = None,
) -> list[list[np.ndarray] | None]:
    """Per sample, its images as the model saw them (``(H, W, 3)`` uint8), from ``pixel_values``.

    LLaVA-style ``(n_images, 3, H, W)`` pixel values are un-normalised with the processor's
    mean / std. Qwen-VL-style patch rows ``(sum t*h*w, C*tp*p*p)`` with ``image_grid_thw``
    are first put back on the image plane (the inverse of the processor's patchify; first
    frame). Other layouts give None (the heatmaps are then drawn on a blank canvas).
    """
    pixels = batch.get("pixel_values")
    if pixels is None:
        return [None] * len(layout.grids)
    pixels = pixels.detach().float().cpu()
    if pixels.dim() == 4:
        images = list(pixels)
    elif pixels.dim() == 2 and batch.get("image_grid_thw") is not None and vision_config is not None:
        images = _unpatchify(pixels, batch["image_grid_thw"].cpu(), vision_config)
    else:
        return [None] * len(layout.grids)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    out, i = [], 0
    for grids in layout.grids:
        pics = []
        for _ in grids:
            if i >= len(images):  # pixel values do not match the image tokens: draw without pictures
                return [None] * len(layout.grids)
            rgb = (images[i] * s + m).clamp(0, 1)
            pics.append((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            i += 1
        out.append(pics)
    return out


def _unpatchify(pixels: torch.Tensor, grid_thw: torch.Tensor, vision_config: Any) -> list[torch.Tensor]:
    """Qwen-VL patch rows -> one ``(C, h*p, w*p)`` image per ``image_grid_thw`` row (first frame).

    The processor lays each image out as rows ``(t, h/m, w/m, m, m)`` of columns
    ``(C, tp, p, p)``; this undoes that reshape.
    """
    p = int(vision_config.patch_size)
    tp = int(getattr(vision_config, "temporal_patch_size", 1))
    m = int(getattr(vision_config, "spatial_merge_size", 1))
    channels = pixels.shape[1] // (tp * p * p)
    images, start = [], 0
    for t, h, w in grid_thw.tolist():
        rows = pixels[start : start + t * h * w]
        start += t * h * w
        x = rows.reshape(t, h // m, w // m, m, m, channels, tp, p, p)[0, :, :, :, :, :, 0]
        x = x.permute(4, 0, 2, 5, 1, 3, 6)  # (C, h/m, m, p, w/m, m, p)
        images.append(x.reshape(channels, h * p, w * p))
    return images


def _vif_maps(model: nn.Module) -> dict[int, torch.Tensor]:
    """The importance maps (injection layer -> ``(B, Nv)``) of a VIF model's last prompt, else ``{}``."""
    if not isinstance(model, VIFModel) or not vif_settings(model)[0]:
        return {}
    return {d: result.pi for d, result in model._runtime.results.items()}


def _eos_ids(model: nn.Module) -> set[int]:
    eos = getattr(hf_model(model).generation_config, "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _generated_lengths(new_tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """``(B,)`` tokens each sample really generated (up to and including its first EOS)."""
    steps = new_tokens.shape[1]
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
    for token in eos:
        is_eos |= new_tokens == token
    order = torch.arange(steps).expand_as(new_tokens)
    first = torch.where(is_eos, order, steps).amin(-1)
    return torch.minimum(first + 1, torch.full_like(first, steps))


class _Runner:
    """Runs one batch through one route and returns ``(B, n_layers, Nv)`` means and row counts."""

    def __init__(self, model: nn.Module, layers: list[int], route: str, max_new_tokens: int) -> None:
        self.model, self.layers, self.route = model, layers, route
        self.max_new_tokens = max_new_tokens
        self.probe = AttentionProbe(layers) if route == "probe" else None
        self.generated: torch.Tensor | None = None  # (B, steps) new tokens of the last generate

    def teacher_forced(
        self, batch: Batch, layout: VisionLayout, selection: RowSelection
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        if self.probe is not None:
            self.probe.expect(layout, selection)
            self.model(**batch, use_cache=False)
            sums = torch.stack([self.probe.sums[layer] for layer in self.layers], 1)  # (B, n, Nv)
            return sums, self.probe.importance
        out = self.model(**batch, use_cache=False, output_attentions=True)
        sums = []
        for layer in self.layers:
            attn = out.attentions[layer]  # (B, H, L, L)
            index = selection.positions[:, None, :, None].expand(-1, attn.shape[1], -1, attn.shape[-1])
            sums.append(image_mass(attn.gather(2, index).float(), selection.valid, layout.positions))
        vif = getattr(out, "vif", None)
        return torch.stack(sums, 1), dict(vif.importance) if vif is not None else {}

    def generate(self, batch: Batch, layout: VisionLayout, pad_id: int) -> tuple[list[torch.Tensor], dict]:
        """Greedy generation; per call (= generated token) a ``(B, n, Nv)`` entry."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id)
        length = batch["input_ids"].shape[1]
        if self.probe is not None:
            self.probe.expect_steps(layout)
            sequences = self.model.generate(**batch, **kwargs)
            n_steps = len(self.probe.steps[self.layers[0]])
            steps = [
                torch.stack([self.probe.steps[layer][k] for layer in self.layers], 1) for k in range(n_steps)
            ]
            importance = self.probe.importance
        else:
            out = self.model.generate(**batch, **kwargs, output_attentions=True, return_dict_in_generate=True)
            sequences = out.sequences
            steps = []
            ones = torch.ones(sequences.shape[0], 1, dtype=torch.bool, device=sequences.device)
            for attentions in out.attentions:  # one tuple of layers per generated token
                rows = [attentions[layer][:, :, -1:].float() for layer in self.layers]  # last row of the call
                steps.append(torch.stack([image_mass(r, ones, layout.positions) for r in rows], 1))
            importance = _vif_maps(self.model)
        self.generated = sequences[:, length:]
        if len(steps) != self.generated.shape[1]:
            raise RuntimeError(f"{len(steps)} attention calls for {self.generated.shape[1]} generated tokens")
        return steps, importance


@torch.no_grad()
def collect(
    model: nn.Module,
    batches: Iterable[tuple[Batch, list[Meta]]],
    rows: str = "auto",
    layers: list[int] | None = None,
    route: str = "probe",
    label: str = "model",
    max_samples: int | None = None,
    keep_images: int = 8,
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
    max_new_tokens: int = 16,
    tokenizer: Any = None,
    progress: bool = True,
    total: int | None = None,
) -> Collection:
    """Runs ``model`` (a transformers VLM or a :class:`vif.VIFModel`) over ``batches``.

    Args:
        rows: ``"auto"`` (answer tokens of samples that have labelled tokens, the last
            prompt token of the others), ``"answer"``, ``"last"`` or ``"generated"`` (greedy
            generation of ``max_new_tokens``; the rows whose outputs were sampled: the last
            prompt token, then every fed-back generated token, up to the first EOS).
        layers: decoder layers to analyse (default: all).
        route: ``"probe"`` (fast path) or ``"attentions"`` (eager ``output_attentions`` reference).
        keep_images: pictures are kept for the first ``keep_images`` samples (heatmaps).
        image_mean / image_std: to un-normalise ``pixel_values`` (default: CLIP's).
        tokenizer: decodes generated text for the report (optional).
    """
    if rows not in ROW_MODES:
        raise ValueError(f"rows must be one of {ROW_MODES}, got {rows!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    base = hf_model(model)
    backbone = get_backbone(base)
    num_layers = len(backbone.decoder_layers())
    layers = list(range(num_layers)) if layers is None else sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers must be within 0..{num_layers - 1}, got {layers}")
    if route == "attentions":
        attn = backbone.text_config()._attn_implementation or "eager"
        if attn not in ("eager", "vif_eager"):
            raise ValueError(
                f'route="attentions" reads output_attentions, which needs eager attention; the model uses {attn!r}.'
            )
    injection_layers, alpha = vif_settings(model)
    collection = Collection(
        label, layers, num_layers, rows, route, injection_layers=injection_layers, alpha=alpha
    )
    runner = _Runner(model, layers, route, max_new_tokens)
    device = input_device(base)  # accelerate-aware: the first parameter may be offloaded
    mean, std = image_mean or CLIP_MEAN, image_std or CLIP_STD
    pad_id = base.config.text_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    eos = _eos_ids(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=max_samples or total, desc=f"diagnose {label}", unit="sample", disable=not progress)
    try:
        with probing(model, runner.probe):
            for batch, metas in batches:
                if max_samples is not None and len(collection.records) + collection.skipped >= max_samples:
                    break
                if rows == "generated":
                    batch = prompt_only(batch, pad_id)
                batch = _to(batch, device)
                layout = backbone.vision_layout(batch)
                if rows == "generated":
                    steps, importance = runner.generate(batch, layout, pad_id)
                    lengths = _generated_lengths(runner.generated.cpu(), eos)  # (B,)
                    live = torch.arange(len(steps))[None] < lengths[:, None]  # (B, steps)
                    sums = sum(s * live[:, k, None, None].to(s) for k, s in enumerate(steps))
                    counts = lengths
                else:
                    selection = select_rows(
                        batch.get("attention_mask"),
                        layout.token_mask(batch["input_ids"].shape[1]),
                        batch.get("labels"),
                        rows,
                    )
                    sums, importance = runner.teacher_forced(batch, layout, selection)
                    counts = selection.counts
                means = (sums / counts.to(sums)[:, None, None]).cpu().numpy()  # (B, n, Nv)
                pictures = _pictures(batch, layout, mean, std, getattr(base.config, "vision_config", None))
                for b, meta in enumerate(metas):
                    if (
                        max_samples is not None
                        and len(collection.records) + collection.skipped >= max_samples
                    ):
                        break
                    bar.update(1)
                    n_vis = int(layout.valid[b].sum())
                    if n_vis == 0:
                        collection.skipped += 1
                        continue
                    meta = dict(meta)
                    if rows == "generated" and tokenizer is not None:
                        meta["generated"] = tokenizer.decode(
                            runner.generated[b, : int(lengths[b])], skip_special_tokens=True
                        )
                    keep = len(collection.records) < keep_images
                    collection.records.append(
                        SampleRecord(
                            visual=means[b, :, :n_vis].astype(np.float32),
                            grids=list(layout.grids[b]),
                            n_rows=int(counts[b]),
                            importance={
                                d: pi[b, :n_vis].float().cpu().numpy() for d, pi in importance.items()
                            },
                            images=pictures[b] if keep else None,
                            meta=meta,
                        )
                    )
    finally:
        bar.close()
        model.train(was_training)
    return collection
