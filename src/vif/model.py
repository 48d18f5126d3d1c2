"""`VIFModel`: a Hugging Face vision-language model with the VIF module attached.

How it plugs in (no copied model code, no patched forwards):

* a forward pre-hook on the model records the inputs of each call (image-token
  layout, padding, answer tokens from ``labels``);
* forward hooks on the extraction layers run the attender on their output hidden
  states and render the importance maps;
* the language model's attention implementation is switched to ``vif_<base>``
  (registered in :mod:`vif.injection`), which reads the map of its layer from the
  attention module and injects it.

All per-call state lives in this object's :class:`_Runtime`, referenced from the
hooked modules of *this* model only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers.cache_utils import StaticCache

from .attender import Latent, ProbabilisticAttender, gaussian_kl
from .backbones import BackboneAdapter, BackboneError, VisionLayout, get_backbone
from .config import CONFIG_NAME, VIFConfig, VIFConfigError
from .gmm import Mixture, entropy, render
from .injection import BASE_BACKENDS, PLAN_ATTRIBUTE, InjectionPlan, register_attention_functions, vif_name

WEIGHTS_NAME = "vif_module.safetensors"
IGNORE_INDEX = -100


class VIFLoadError(ValueError):
    """A saved VIF module that does not fit the model it is loaded onto."""


@dataclass
class VIFOutput:
    """What VIF adds to a forward's output, as ``out.vif``.

    importance: injection layer -> ``(B, Nv)`` importance over each sample's image
        tokens in sequence order (zeros past a sample's own count, and for text-only samples).
    vision_mask: ``(B, Nv)`` bool, which entries of ``importance`` are real image tokens.
    kl, sparsity, entropy, volume, mean_sigma: scalars, averaged over pairs (``loss_pairs="all"``)
        or taken from the first pair; ``kl`` is None when no posterior was run (0 under
        ``attender="released"`` when labels hold no answer token, as the released code reports).
    evidence: the answer-evidence loss (``evidence_weight > 0`` and labels given), else None.
    lm_loss: the base model's language-model loss (None without labels).
    mixtures: injection layer -> the decoded :class:`~vif.gmm.Mixture` of the samples with images.
    """

    importance: dict[int, torch.Tensor] = field(default_factory=dict)
    vision_mask: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    sparsity: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    volume: torch.Tensor | None = None
    mean_sigma: torch.Tensor | None = None
    evidence: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mixtures: dict[int, Mixture] = field(default_factory=dict)
    used_posterior: bool = False


@dataclass
class _PairResult:
    pi: torch.Tensor  # (B, Nv) float32
    mixture: Mixture
    kl: torch.Tensor | None
    entropy: torch.Tensor
    volume: torch.Tensor
    used_posterior: bool
    evidence: torch.Tensor | None = None


class _Runtime:
    """Per-call state shared by the hooks and the attention function of one model."""

    def __init__(self, vmodel: VIFModel) -> None:
        self.config = vmodel.config_vif
        self.backbone = vmodel.backbone
        self.attender = vmodel.vif_module
        self.base_model = vmodel.base_model
        self.enabled = True
        self.training = False
        self.in_generation = False
        self.maps_frozen = False
        self.layout: VisionLayout | None = None
        self.results: dict[int, _PairResult] = {}  # by injection layer
        self.question: torch.Tensor | None = None  # (B, L) bool
        self.answer: torch.Tensor | None = None  # (B, L) bool, None without labels
        self.labels: torch.Tensor | None = None  # (B, L) the forward's labels
        self.embeddings: torch.Tensor | None = None  # (B, L, D) the LLM's input, for the evidence head
        self.boxes: torch.Tensor | None = None  # (B, 4) evidence boxes of this call (map_source="boxes")
        self.row_valid: torch.Tensor | None = None  # (B, total_len) bool
        self.reusing = False  # this call continues a sequence whose maps already exist
        self.row_plan: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # per call

    @property
    def materialised(self) -> bool:
        return self.config.injection == "materialised"

    # ---------------------------------------------------------------- forward start
    def begin(self, inputs: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (generate passes `cache`).
        past = inputs.get("cache")
        if past is None:
            past = inputs.get("past_key_values")
        if isinstance(past, StaticCache):
            raise BackboneError(
                "VIF needs the dynamic KV cache (query positions are read from the cache length); "
                "generate without cache_implementation='static'."
            )
        past_len = past.get_seq_length() if past is not None else 0
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise BackboneError(
                "VIF needs input_ids to find the image tokens; inputs_embeds alone is not supported."
            )
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise BackboneError(
                f"VIF expects a 2-D padding attention_mask (B, L), got shape {tuple(mask.shape)}."
            )
        total_len = past_len + input_ids.shape[1]
        if mask is None:
            mask = torch.ones(input_ids.shape[0], total_len, dtype=torch.bool, device=input_ids.device)
        self.row_valid = mask.bool()
        self.row_plan = {}

        self.reusing = past_len > 0 or self.maps_frozen
        if self.reusing:
            if self.layout is None:
                raise BackboneError(
                    "this call continues a cached sequence but no prompt was seen first; run the prompt "
                    "through the model (or use VIFModel.generate) before decoding with past_key_values."
                )
            return
        self.layout = self.backbone.vision_layout(inputs, self.config.grid_coords)
        self.results = {}
        length = input_ids.shape[1]
        vision = self.layout.token_mask(length)
        valid = self.row_valid[:, -length:]
        labels = inputs.get("labels")
        self.answer, self.labels = None, labels
        if labels is not None:
            self.answer = (labels != IGNORE_INDEX) & valid & ~vision
        self.question = valid & ~vision & (~self.answer if self.answer is not None else True)
        if self.in_generation:
            self.maps_frozen = True  # later steps of this generate() reuse the prompt's maps

    # ---------------------------------------------------------------- extraction
    def record_embeddings(self, hidden: torch.Tensor) -> None:
        """Keeps the LLM's input ``(B, L, D)`` (image features at the image tokens) for the evidence head."""
        if self.enabled and not self.reusing and self.layout is not None:
            self.embeddings = hidden.detach()

    def extract(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """Runs the attender for every pair that extracts at ``layer_idx``; hidden ``(B, L, D)``."""
        if not self.enabled or self.reusing or self.layout is None:
            return
        for e, d in self.config.pairs:
            if e == layer_idx:
                self.results[d] = self.compute_pair(hidden)

    def compute_pair(self, hidden: torch.Tensor) -> _PairResult:
        layout, config, attender = self.layout, self.config, self.attender
        batch, n_vis = layout.positions.shape
        dtype = next(attender.parameters()).dtype
        has = layout.has_image.nonzero().squeeze(-1)
        zero = hidden.new_zeros((), dtype=torch.float32)
        empty = Mixture(*(torch.zeros(0, device=hidden.device) for _ in range(3)))
        if has.numel() == 0:
            pi = torch.zeros(batch, n_vis, device=hidden.device)
            return _PairResult(pi, empty, None, zero, zero, False)
        if config.map_source == "boxes":
            pi = box_map(layout, self.boxes)
            return _PairResult(pi, empty, None, entropy(pi[has]).mean(), zero, False)

        h = hidden[has].to(dtype)
        if config.detach_input:
            h = h.detach()
        vis_pos = layout.positions[has].clamp(max=h.shape[1] - 1)
        v_mask = layout.valid[has]
        coords = layout.coords[has]
        floor = self.sigma_floor(has)
        vision = h.gather(1, vis_pos[..., None].expand(-1, -1, h.shape[-1]))
        embedded = None
        if config.vision_features == "extraction+embeddings":
            embedded = self.image_embeddings(has, vis_pos)
        question = self.question[has]
        text_q, mask_q = gather_tokens(h, question)

        prior = attender.latent(attender.prior, vision, text_q, v_mask, mask_q, embedded)
        posterior: Latent | None = None
        # The released module treats labels without an answer token anywhere in the batch as
        # no labels: the prior is sampled and KL = 0.
        released_no_answer = (
            config.attender == "released" and self.answer is not None and not self.answer.any()
        )
        if self.answer is not None and attender.posterior is not None and not released_no_answer:
            text_qa, mask_qa = gather_tokens(h, question | self.answer[has])
            posterior = attender.latent(attender.posterior, vision, text_qa, v_mask, mask_qa, embedded)
        use_posterior = self.training and posterior is not None
        if use_posterior:
            z, branch = posterior.sample(), posterior
        elif self.training or config.sample_at_inference:
            z, branch = prior.sample(), prior
        else:
            z, branch = prior.mu, prior
        mixture = attender.decode(z, branch, coords, v_mask, floor)
        pi_has = render(mixture, coords, v_mask, config.normalisation)
        pi = pi_has.new_zeros(batch, n_vis).index_copy(0, has, pi_has)

        if config.volume == "sigma2":
            volume = mixture.sigmas.float().pow(2).mean(-1)
        else:
            volume = (mixture.weights.float() * mixture.sigmas.float().pow(2)).sum(-1)
        kl = gaussian_kl(posterior, prior) if posterior is not None else None
        if released_no_answer:
            kl = zero
        evidence = None
        if attender.evidence is not None and self.answer is not None:
            mixtures = [mixture]
            if branch is not prior:  # the prior's own map (the one used at inference) learns too
                mixtures.append(attender.decode(prior.mu, prior, coords, v_mask, floor))
            pools = [self.evidence_pool(m, coords, v_mask) for m in mixtures]
            evidence = torch.stack([self.evidence_loss(p, hidden, has, vis_pos) for p in pools]).mean()
        return _PairResult(pi, mixture, kl, entropy(pi_has).mean(), volume.mean(), use_posterior, evidence)

    def sigma_floor(self, has: torch.Tensor) -> torch.Tensor | float:
        """The smallest spread: ``min_sigma`` in image widths, or in tokens of each sample's finest grid."""
        config = self.config
        if config.min_sigma_unit == "image":
            return config.min_sigma
        sides = [max((max(h, w) for h, w in grids), default=1) for grids in self.layout.grids]
        side = torch.tensor(sides, dtype=torch.float32, device=has.device)[has]
        return config.min_sigma / side

    def special_ids(self, device: torch.device) -> torch.Tensor:
        """The ids of the model's bos / eos / pad tokens (from its config and generation config)."""
        ids: set[int] = set()
        model_config = self.base_model.config
        configs = (model_config, getattr(model_config, "text_config", None))
        configs += (getattr(self.base_model, "generation_config", None),)
        for config in configs:
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(config, name, None)
                ids.update(
                    v for v in (value if isinstance(value, list | tuple) else [value]) if v is not None
                )
        return torch.tensor(sorted(ids), dtype=torch.long, device=device)

    def evidence_pool(self, mixture: Mixture, coords: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(B_img, Nv)`` the weights that pool image features for the evidence head."""
        if self.config.evidence_pool == "locator":
            return torch.einsum("bk,bkn->bn", mixture.weights.float(), mixture.locator)
        return render(mixture, coords, valid, self.config.normalisation)

    def image_embeddings(self, has: torch.Tensor, vis_pos: torch.Tensor) -> torch.Tensor:
        """``(B_img, Nv, D)`` the LLM's input at the image tokens (detached), in the attender's dtype."""
        if self.embeddings is None:
            raise BackboneError("VIF found no LLM input embeddings; was decoder layer 0 hooked?")
        source = self.embeddings[has].to(next(self.attender.parameters()).dtype)
        return source.gather(1, vis_pos[..., None].expand(-1, -1, source.shape[-1]))

    def evidence_loss(
        self, pi: torch.Tensor, hidden: torch.Tensor, has: torch.Tensor, vis_pos: torch.Tensor
    ) -> torch.Tensor:
        """The answer-evidence loss of one map ``pi (B_img, Nv)`` (see :class:`~vif.attender.EvidenceHead`)."""
        source = self.embeddings if self.config.evidence_features == "embeddings" else hidden
        if source is None:
            raise BackboneError(
                "the evidence head found no LLM input embeddings; was decoder layer 0 hooked?"
            )
        source = source[has].detach().to(next(self.attender.parameters()).dtype)
        features = source.gather(1, vis_pos[..., None].expand(-1, -1, source.shape[-1]))
        # End-of-turn and padding tokens follow every answer whatever the image shows: not evidence.
        content = self.answer[has] & ~torch.isin(self.labels[has], self.special_ids(source.device))
        answers, has_answer = gather_tokens(self.labels[has][..., None], content)
        answers = answers.squeeze(-1).masked_fill(~has_answer, IGNORE_INDEX)
        readout = self.base_model.get_output_embeddings().weight.detach()
        return self.attender.evidence(pi, features, readout, answers, self.layout.valid[has])

    # ---------------------------------------------------------------- injection
    def plan_for(self, layer_idx: int, q_len: int, kv_len: int) -> InjectionPlan | None:
        config = self.config
        if not self.enabled or config.alpha == 0.0 or layer_idx not in self.results:
            return None
        layout = self.layout
        if layout.positions.shape[1] == 0:  # no image anywhere in the batch
            return None
        if (q_len, kv_len) not in self.row_plan:  # the same for every injected layer of a call
            self.row_plan[(q_len, kv_len)] = self.injected_rows(q_len, kv_len)
        rows, inject = self.row_plan[(q_len, kv_len)]
        return InjectionPlan(
            self.results[layer_idx].pi, layout.positions, rows, inject, config.alpha, layout.span
        )

    def injected_rows(self, q_len: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query rows ``(B, q_len)`` (kv slots) of this call and which of them receive the map."""
        config, layout = self.config, self.layout
        device = layout.positions.device
        rows = torch.arange(kv_len - q_len, kv_len, device=device)[None].repeat(layout.positions.shape[0], 1)
        row_valid = self.row_valid
        if row_valid.shape[1] < kv_len:  # no mask was given for the cached part: all real
            pad = torch.ones(row_valid.shape[0], kv_len - row_valid.shape[1], dtype=torch.bool, device=device)
            row_valid = torch.cat([pad, row_valid], dim=1)
        inject = row_valid[:, -kv_len:].gather(1, rows) & layout.has_image[:, None]
        if config.inject_rows == "text":
            inject &= ~layout.token_mask(kv_len).gather(1, rows)
        if not config.inject_decode:
            inject &= rows < layout.seq_len
        return rows, inject

    # ---------------------------------------------------------------- losses
    def collect(self) -> VIFOutput:
        out = VIFOutput(vision_mask=None if self.layout is None else self.layout.valid)
        if not self.enabled or not self.results:
            return out
        ordered = [self.results[d] for _, d in self.config.pairs if d in self.results]
        out.importance = {d: self.results[d].pi for _, d in self.config.pairs if d in self.results}
        out.mixtures = {d: self.results[d].mixture for _, d in self.config.pairs if d in self.results}
        used = ordered[:1] if self.config.loss_pairs == "first" else ordered
        mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
        out.entropy = mean([r.entropy for r in used])
        out.volume = mean([r.volume for r in used])
        out.sparsity = self.config.entropy_weight * out.entropy + self.config.volume_weight * out.volume
        sigmas = [r.mixture.sigmas.float().mean() for r in used if r.mixture.sigmas.numel()]
        out.mean_sigma = mean(sigmas) if sigmas else None
        kls = [r.kl for r in used if r.kl is not None]
        out.kl = mean(kls) if kls else None
        evidence = [r.evidence for r in used if r.evidence is not None]
        out.evidence = mean(evidence) if evidence else None
        out.used_posterior = any(r.used_posterior for r in ordered)
        return out


def box_map(layout: VisionLayout, boxes: torch.Tensor | None) -> torch.Tensor:
    """``(B, Nv)``: uniform over each sample's image tokens whose patch overlaps its evidence box.

    ``boxes (B, 4)`` are ``[x0, y0, x1, y1]`` in the image's unit square (each image of a sample
    uses the same box); a row of NaN (no box) gives a flat map over the sample's image tokens.
    """
    if boxes is None:
        raise BackboneError(
            "map_source='boxes' needs each sample's evidence box: pass vif_boxes=(B, 4) to the forward or "
            "generate (training and `vif eval` read a record's 'evidence_box')."
        )
    device = layout.coords.device
    half = torch.zeros_like(layout.coords)  # (B, Nv, 2): each token's patch half-size
    for b, grids in enumerate(layout.grids):
        sizes = [torch.tensor([0.5 / w, 0.5 / h]).expand(h * w, 2) for h, w in grids]
        if sizes:
            cat = torch.cat(sizes).to(device)
            half[b, : cat.shape[0]] = cat
    boxes = boxes.to(device=device, dtype=torch.float32)
    lo, hi = layout.coords - half, layout.coords + half
    inside = (lo < boxes[:, None, 2:]) & (hi > boxes[:, None, :2])
    covered = inside.all(-1) & layout.valid
    no_box = torch.isnan(boxes).any(-1)
    covered = torch.where(no_box[:, None] | ~covered.any(-1, keepdim=True), layout.valid, covered)
    weights = covered.float()
    return weights / weights.sum(-1, keepdim=True).clamp_min(1.0)


def gather_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs the masked positions of each row to the front, in order.

    hidden ``(B, L, D)``, mask ``(B, L)`` -> tokens ``(B, N, D)`` and their mask ``(B, N)``,
    ``N`` the largest count in the batch (at least 1, so empty streams stay shaped).
    """
    length = hidden.shape[1]
    order = torch.arange(length, device=hidden.device).expand_as(mask)
    # Selected positions sort first, each group keeps sequence order.
    keys = torch.where(mask, order, order + length)
    index = keys.argsort(dim=1)
    n = max(int(mask.sum(-1).max()), 1)
    index = index[:, :n]
    tokens = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    return tokens, mask.gather(1, index)


class VIFModel(nn.Module):
    """A vision-language model with VIF attached. Build it with :func:`vif.attach`."""

    def __init__(self, base_model: nn.Module, config: VIFConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if getattr(base_model, "_vif_attached", False):
            raise VIFConfigError(
                "this model already has VIF attached; detach() it first or attach to a fresh copy."
            )
        self.backbone: BackboneAdapter = get_backbone(base_model)
        text_config = self.backbone.text_config()
        hidden, depth = int(text_config.hidden_size), int(text_config.num_hidden_layers)
        if config.hidden_size is None:
            config = VIFConfig.from_dict({**config.to_dict(), "hidden_size": hidden})
        elif config.hidden_size != hidden:
            raise VIFConfigError(
                f"VIFConfig.hidden_size={config.hidden_size} but the language model's hidden size is {hidden}; "
                "build the config for this model with VIFConfig.preset(name, model)."
            )
        config.validate(num_layers=depth)
        base_attn = text_config._attn_implementation or "eager"
        if base_attn.startswith("vif_"):
            raise VIFConfigError(
                "the model's attention is already a VIF backend; detach the other VIFModel first."
            )
        if base_attn not in BASE_BACKENDS:
            raise VIFConfigError(
                f"VIF runs on the attention backends {sorted(BASE_BACKENDS)}, but the language model uses "
                f"{base_attn!r}. Load the model with attn_implementation='sdpa' (fast, fused injection) or "
                "'eager' (materialised, returns injected attention weights)."
            )

        self.base_model = base_model
        self.config_vif = config
        param = next(base_model.parameters())
        self.vif_module = ProbabilisticAttender(config).to(device=param.device, dtype=dtype or param.dtype)
        self._base_attn = base_attn
        self._handles: list[Any] = []
        self._runtime = _Runtime(self)
        self._install()
        self.train(base_model.training)  # a fresh nn.Module starts in training mode; follow the model

    # ---------------------------------------------------------------- wiring
    def _install(self) -> None:
        register_attention_functions()
        layers = self.backbone.decoder_layers()
        runtime = self._runtime

        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = dict(kwargs)
            if args:
                inputs.setdefault("input_ids", args[0])
            runtime.begin(inputs)

        def make_extract_hook(layer_idx: int):
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                runtime.extract(layer_idx, output[0] if isinstance(output, tuple) else output)

            return hook

        self._handles.append(self.base_model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        config = self.config_vif
        evidence_reads = config.evidence_weight > 0 and config.evidence_features == "embeddings"
        if evidence_reads or config.vision_features == "extraction+embeddings":

            def embeddings_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                runtime.record_embeddings(args[0] if args else kwargs["hidden_states"])

            self._handles.append(layers[0].register_forward_pre_hook(embeddings_hook, with_kwargs=True))
        for e in sorted(set(self.config_vif.extract_layers)):
            self._handles.append(layers[e].register_forward_hook(make_extract_hook(e)))
        for d in self.config_vif.inject_layers:
            setattr(self.backbone.attention_module(layers[d]), PLAN_ATTRIBUTE, runtime)
        self.base_model.set_attn_implementation({"text_config": vif_name(self._base_attn)})
        self.base_model._vif_attached = True

    def detach(self) -> nn.Module:
        """Removes every hook and attribute VIF added; returns the untouched base model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.backbone.decoder_layers():
            module = self.backbone.attention_module(layer)
            if hasattr(module, PLAN_ATTRIBUTE):
                delattr(module, PLAN_ATTRIBUTE)
        self.base_model.set_attn_implementation({"text_config": self._base_attn})
        self.base_model._vif_attached = False
        del self.base_model._vif_attached
        return self.base_model

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Runs the plain base model inside the block (no attender, no injection)."""
        previous = self._runtime.enabled
        self._runtime.enabled = False
        try:
            yield
        finally:
            self._runtime.enabled = previous

    # ---------------------------------------------------------------- running
    @property
    def config(self) -> Any:
        """The base model's transformers config (the VIF config is :attr:`config_vif`)."""
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; returns its output with ``out.vif`` (:class:`VIFOutput`).

        With ``labels`` in training mode, ``out.loss`` is the total loss of spec section 7:
        ``lm + kl_weight * KL + sparsity_weight * (entropy_weight * H(pi) + volume_weight * volume)``.
        Otherwise ``out.loss`` is the base model's LM loss.
        """
        runtime = self._runtime
        runtime.training = self.training
        runtime.boxes = kwargs.pop("vif_boxes", None)
        out = self.base_model(*args, **kwargs)
        vif = runtime.collect()
        vif.lm_loss = getattr(out, "loss", None)
        if self.training and vif.lm_loss is not None and runtime.enabled:
            cfg = self.config_vif
            total = vif.lm_loss
            if vif.kl is not None:
                total = total + cfg.kl_weight * vif.kl
            if vif.sparsity is not None:
                total = total + cfg.sparsity_weight * vif.sparsity
            if vif.evidence is not None:
                total = total + cfg.evidence_weight * vif.evidence
            skipped_posterior = self.vif_module.posterior is not None and not vif.used_posterior
            boxes = cfg.map_source == "boxes"
            if not vif.importance or not runtime.layout.has_image.any() or skipped_posterior or boxes:
                # No image in this batch (the attender did not run), no answer token under
                # attender="released" (the posterior did not run), or a ground-truth map. Keep every parameter in the
                # graph so data-parallel gradient reduction still sees all of them.
                total = total + 0.0 * sum(p.sum() for p in self.vif_module.parameters())
            out.loss = total
        out.vif = vif
        return out

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``base_model.generate`` with the importance maps computed once, from the prompt.

        Every later step (with or without the KV cache) reuses them, so ``use_cache=True``
        and ``use_cache=False`` give the same greedy tokens.
        """
        runtime = self._runtime
        runtime.training = False
        runtime.boxes = kwargs.pop("vif_boxes", None)
        runtime.in_generation, runtime.maps_frozen = True, False
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            runtime.in_generation, runtime.maps_frozen = False, False

    # ---------------------------------------------------------------- saving
    def base_model_info(self) -> dict[str, Any]:
        text_config = self.backbone.text_config()
        return {
            "architecture": type(self.base_model).__name__,
            "model_type": self.base_model.config.model_type,
            "hidden_size": int(text_config.hidden_size),
            "num_hidden_layers": int(text_config.num_hidden_layers),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes ``vif_config.json`` and ``vif_module.safetensors`` (the VIF module only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {**self.config_vif.to_dict(), "base_model": self.base_model_info()}
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.vif_module.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "vif_version": "1"})
        return directory

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, **overrides: Any) -> VIFModel:
        """Attaches a saved VIF module to ``model``; refuses one saved for another backbone.

        ``overrides`` replace inference-time fields of the saved config (e.g. ``alpha``,
        ``injection``, ``inject_decode``).
        """
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.exists():
            raise VIFLoadError(
                f"{config_path} does not exist; point from_pretrained at a save_pretrained directory."
            )
        data = json.loads(config_path.read_text())
        saved_for = data.pop("base_model", {})
        config = VIFConfig.from_dict({**data, **overrides})
        backbone = get_backbone(model)
        text_config = backbone.text_config()
        here = {
            "model_type": model.config.model_type,
            "hidden_size": int(text_config.hidden_size),
            "num_hidden_layers": int(text_config.num_hidden_layers),
        }
        for key, value in here.items():
            if key in saved_for and saved_for[key] != value:
                raise VIFLoadError(
                    f"the VIF module in {directory} was saved for a {saved_for.get('architecture')} with "
                    f"{key}={saved_for[key]}, but this model ({type(model).__name__}) has {key}={value}. "
                    "Load it onto the backbone it was trained with."
                )
        vmodel = cls(model, config)
        weights = directory / WEIGHTS_NAME
        if not weights.exists():
            vmodel.detach()
            raise VIFLoadError(f"{weights} does not exist; the adapter directory is incomplete.")
        state = load_file(weights, device=str(vmodel.device))
        missing, unexpected = vmodel.vif_module.load_state_dict(state, strict=False)
        if missing or unexpected:
            vmodel.detach()
            raise VIFLoadError(
                f"{weights} does not match the VIF config in {directory}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}."
            )
        return vmodel


def attach(model: nn.Module, config: VIFConfig | None = None, dtype: torch.dtype | None = None) -> VIFModel:
    """Attaches a new (randomly initialised) VIF module to a transformers VLM.

    ``config`` defaults to ``VIFConfig.preset("paper", model)``; the module's dtype
    defaults to the model's.
    """
    return VIFModel(model, config or VIFConfig.preset("paper", model), dtype=dtype)
