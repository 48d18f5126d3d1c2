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
import dataclasses
import inspect
import itertools
import json
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache

from .adapter_io import WEIGHTS_NAME, VIFLoadError, inspect_adapter, resolve_adapter
from .attender import Latent, ProbabilisticAttender, gaussian_kl, seeded_noise
from .backbones import BackboneAdapter, BackboneError, VisionLayout, get_backbone
from .config import CONFIG_NAME, VIFConfig, VIFConfigError
from .gmm import Mixture, entropy, render
from .injection import (
    BASE_BACKENDS,
    PLAN_ATTRIBUTE,
    ImageSum,
    InjectionPlan,
    register_attention_functions,
    vif_name,
)
from .placement import execution_device, input_device

IGNORE_INDEX = -100


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
        self.embeddings: torch.Tensor | None = None  # (B, L, D) the LLM's input (VIFConfig.token_sources)
        self.encoder: torch.Tensor | None = None  # (n_image_tokens, Dv) the vision encoder's output
        self.boxes: torch.Tensor | None = None  # (B, 4) evidence boxes of this call (map_source="boxes")
        self.row_valid: torch.Tensor | None = None  # (B, total_len) bool
        self.reusing = False  # this call continues a sequence whose maps already exist
        self.row_plan: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}  # per call
        self.streams: _AttenderStreams | None = None  # per prompt: where the attender's inputs are
        self.image_sums: dict[int, ImageSum] = {}  # per prompt, by injection layer: c for the decode steps
        self.prompt_tag: int | None = None  # tag of the KV cache this prompt's state belongs to
        # Per-sample seeds (one per batch row) for z's noise, set by the trainer for each training
        # batch so that noise follows the sample, not the process; None: the global RNG.
        self.noise_seeds: list[int] | None = None

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
        check_cache(past, self.config.inject_layers)
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
            self.check_continuation(past, past_len, input_ids)
            return
        self.layout = self.backbone.vision_layout(inputs, self.config.grid_coords)
        self.results = {}
        self.image_sums = {}
        self.follow_row_changes(past)
        length = input_ids.shape[1]
        vision = self.layout.token_mask(length)
        valid = self.row_valid[:, -length:]
        labels = inputs.get("labels")
        self.answer, self.labels = None, labels
        if labels is not None:
            self.answer = (labels != IGNORE_INDEX) & valid & ~vision
        self.question = valid & ~vision & (~self.answer if self.answer is not None else True)
        self.streams = _AttenderStreams.build(self.layout, self.question, self.answer)
        if self.in_generation:
            self.maps_frozen = True  # later steps of this generate() reuse the prompt's maps

    # ---------------------------------------------------------------- extraction
    def record_embeddings(self, hidden: torch.Tensor) -> None:
        """Keeps the LLM's input ``(B, L, D)`` (image features at the image tokens)."""
        if self.enabled and not self.reusing and self.layout is not None:
            self.embeddings = hidden.detach()

    def record_encoder(self, features: torch.Tensor) -> None:
        """Keeps the vision encoder's output, one row per image token in their order ``(..., Dv)``."""
        # Not gated on `reusing`: the encoder may run before this forward's `begin` (LLaVA's generate
        # does), while `reusing` still describes the previous call; it only runs with new images.
        if self.enabled:
            self.encoder = features.detach().reshape(-1, features.shape[-1])

    def extract(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """Runs the attender for every pair that extracts at ``layer_idx``; hidden ``(B, L, D)``.

        Pairs that share an extraction layer share the encoder pass (its result is the
        same); each pair still draws its own latent sample and decodes its own map.
        """
        if not self.enabled or self.reusing or self.layout is None:
            return
        targets = [d for e, d in self.config.pairs if e == layer_idx]
        if not targets:
            return
        latents = self.encode(hidden)
        for d in targets:
            self.results[d] = self.decode_pair(hidden, latents, d)

    def encode(self, hidden: torch.Tensor) -> tuple[Latent, Latent | None] | None:
        """The prior (and, with labels, posterior) latents of the samples with images.

        None when no sample has an image or the map is the ground-truth box (no attender).
        """
        streams, attender, config = self.streams, self.attender, self.config
        if streams.rows.numel() == 0 or config.map_source == "boxes":
            return None
        dtype = attender.slots.dtype  # (not next(parameters()): see make_extract_hook)
        if config.detach_input:
            hidden = hidden.detach()
        vision = streams.vision.take(hidden, dtype)
        embedded = None
        if config.vision_features != "extraction":
            source = config.vision_features.removeprefix("extraction+")
            embedded = self.token_features(source, streams.rows, self.vision_slots(hidden))
        question = streams.question
        prior = attender.latent(
            attender.prior, vision, question.take(hidden, dtype), streams.v_mask, question.mask, embedded
        )
        posterior: Latent | None = None
        qa = streams.question_answer
        if qa is not None and attender.posterior is not None and not self.released_no_answer():
            posterior = attender.latent(
                attender.posterior, vision, qa.take(hidden, dtype), streams.v_mask, qa.mask, embedded
            )
        return prior, posterior

    def released_no_answer(self) -> bool:
        """The released module treats labels without an answer token anywhere in the batch as no
        labels: the prior is sampled and KL = 0."""
        return self.config.attender == "released" and self.answer is not None and not self.streams.any_answer

    def vision_slots(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B_img, Nv)`` sequence slot of each image token of the samples with images."""
        rows = self.streams.rows
        return self.layout.positions.index_select(0, rows.to(self.layout.positions.device)).clamp(
            max=hidden.shape[1] - 1
        )

    def decode_pair(
        self, hidden: torch.Tensor, latents: tuple[Latent, Latent | None] | None, pair: int = 0
    ) -> _PairResult:
        layout, config, attender, streams = self.layout, self.config, self.attender, self.streams
        batch, n_vis = layout.positions.shape
        zero = hidden.new_zeros((), dtype=torch.float32)
        empty = Mixture(*(torch.zeros(0, device=hidden.device) for _ in range(3)))
        has = streams.rows
        if has.numel() == 0:
            pi = torch.zeros(batch, n_vis, device=hidden.device)
            return _PairResult(pi, empty, None, zero, zero, False)
        if config.map_source == "boxes":
            pi = box_map(layout, self.boxes)
            return _PairResult(pi, empty, None, entropy(pi[has]).mean(), zero, False)

        prior, posterior = latents
        coords, v_mask, floor = streams.coords, streams.v_mask, self.sigma_floor(has)
        use_posterior = self.training and posterior is not None
        noise = None
        if self.noise_seeds is not None:  # `pair` keeps the pairs' draws apart
            rows = [self.noise_seeds[i] for i in has.tolist()]
            noise = seeded_noise(rows, pair, tuple(prior.mu.shape[1:]), hidden.device)
        if use_posterior:
            z, branch = posterior.sample(noise=noise), posterior
        elif self.training or config.sample_at_inference:
            z, branch = prior.sample(noise=noise), prior
        else:
            z, branch = prior.mu, prior
        evidence_features = None  # (B_img, Nv, size): what the evidence head reads, found once per pair
        if attender.evidence is not None and (config.salience != "tokens" or self.answer is not None):
            evidence_features = self.token_features(
                config.evidence_features, has, self.vision_slots(hidden), hidden
            )
        salience = None
        if config.salience != "tokens" and evidence_features is not None:
            salience = attender.evidence.trunk(evidence_features)
        mixture = attender.decode(z, branch, coords, v_mask, floor, salience)
        pi_has = render(mixture, coords, v_mask, config.normalisation)
        pi = pi_has if streams.all_rows else pi_has.new_zeros(batch, n_vis).index_copy(0, has, pi_has)

        if config.volume == "sigma2":
            volume = mixture.sigmas.float().pow(2).mean(-1)
        else:
            volume = (mixture.weights.float() * mixture.sigmas.float().pow(2)).sum(-1)
        kl = gaussian_kl(posterior, prior) if posterior is not None else None
        if self.released_no_answer():
            kl = zero
        evidence = None
        if attender.evidence is not None and self.answer is not None:
            mixtures = [mixture]
            if branch is not prior:  # the prior's own map (the one used at inference) learns too
                mixtures.append(attender.decode(prior.mu, prior, coords, v_mask, floor, salience))
            pools = [self.evidence_pool(m, coords, v_mask) for m in mixtures]
            evidence = self.evidence_loss(pools, evidence_features, has)
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

    def token_features(
        self, source: str, has: torch.Tensor, vis_pos: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B_img, Nv, size)`` detached per-token image features, in the attender's dtype.

        ``source``: "embeddings" (the LLM's input), "encoder" (the vision encoder's output) or
        "extraction" (``hidden``, layer e's output). Entries past a sample's image tokens are 0.
        """
        dtype = self.attender.slots.dtype
        if source == "encoder" and self.backbone.vision_encoder_output() is None:
            source = "embeddings"  # the LLM's input is the vision encoder's output (no projector)
        if source == "encoder":
            if self.encoder is None or self.encoder.shape[0] != int(self.layout.valid.sum()):
                raise BackboneError(
                    "VIF did not see the vision encoder's output for this batch's images; pass pixel_values "
                    "with the prompt (the encoder runs in the same forward)."
                )
            out = self.encoder.new_zeros(*self.layout.valid.shape, self.encoder.shape[-1])
            out[self.layout.valid] = self.encoder.to(out.device)
            return out[has].to(dtype)
        full = hidden if source == "extraction" else self.embeddings
        if full is None:
            raise BackboneError("VIF found no LLM input embeddings; was decoder layer 0 hooked?")
        full = full[has].detach().to(dtype)
        return full.gather(1, vis_pos[..., None].expand(-1, -1, full.shape[-1]))

    def evidence_loss(
        self, pools: list[torch.Tensor], features: torch.Tensor, has: torch.Tensor
    ) -> torch.Tensor:
        """The answer-evidence loss, averaged over the maps ``pools`` (each ``(B_img, Nv)``).

        ``features`` ``(B_img, Nv, size)``: the per-token features the head reads
        (see :class:`~vif.attender.EvidenceHead`).
        """
        # End-of-turn and padding tokens follow every answer whatever the image shows: not evidence.
        content = self.answer[has] & ~torch.isin(self.labels[has], self.special_ids(features.device))
        answers, has_answer = gather_tokens(self.labels[has][..., None], content)
        answers = answers.squeeze(-1).masked_fill(~has_answer, IGNORE_INDEX)
        readout = None
        if self.config.evidence_readout == "lm_head":
            readout = self.base_model.get_output_embeddings().weight.detach()
        valid = self.layout.valid[has]
        head = self.attender.evidence
        loss = torch.stack([head(pi, features, readout, answers, valid) for pi in pools]).mean()
        if self.config.salience == "distilled" and bool((answers >= 0).any()):
            # The salience term learns, token by token, the reader's score for any answer: at inference
            # (no answer) it points the centres where the reader would find one.
            # Cross-entropy between the two maps over the image tokens (scale-free: the reader's scores
            # grow without bound under log-sum-exp pooling).
            target = (
                head.answer_scores(features, readout, answers).detach().masked_fill(~valid, float("-inf"))
            )
            salient = self.attender.gmm.center_salience(head.trunk(features)).squeeze(-1).float()
            log_q = torch.log_softmax(salient.masked_fill(~valid, float("-inf")), dim=-1)
            loss = loss - (torch.softmax(target, dim=-1) * log_q.masked_fill(~valid, 0.0)).sum(-1).mean()
        return loss

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
        if self.row_plan[(q_len, kv_len)] is None:
            return None
        rows, inject = self.row_plan[(q_len, kv_len)]
        # Rows that see only part of the map: inside images (Full-Seq) or between them (text);
        # before them no row changes.
        if config.inject_rows == "all":
            window, rows_from = layout.inside, layout.span[0]
        elif layout.gaps[1] > layout.gaps[0]:
            window, rows_from = layout.gaps, layout.gaps[0]
        else:
            window, rows_from = layout.gaps, layout.first_after
        state = self.image_sums.setdefault(layer_idx, ImageSum())
        pi = self.results[layer_idx].pi
        return InjectionPlan(
            pi, layout.positions, rows, inject, config.alpha, layout.span, window, state, rows_from
        )

    def injected_rows(self, q_len: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Query rows ``(B, q_len)`` (kv slots) of this call and which of them receive the map.

        None when no row of the call can be injected (decode steps with ``inject_decode=False``).
        """
        config, layout = self.config, self.layout
        device = layout.positions.device
        first_row = kv_len - q_len
        after_prompt = first_row >= layout.seq_len  # decode steps: no image row, no prompt row
        if after_prompt and not config.inject_decode:
            return None
        rows = torch.arange(first_row, kv_len, device=device)[None].expand(layout.positions.shape[0], -1)
        row_valid = self.row_valid
        if row_valid.shape[1] < kv_len:  # no mask was given for the cached part: all real
            pad = torch.ones(row_valid.shape[0], kv_len - row_valid.shape[1], dtype=torch.bool, device=device)
            row_valid = torch.cat([pad, row_valid], dim=1)
        inject = row_valid[:, row_valid.shape[1] - q_len :] & layout.has_image[:, None]
        if config.inject_rows == "text" and not after_prompt:
            inject &= ~layout.token_mask(kv_len)[:, first_row:]
        if not config.inject_decode:
            inject &= rows < layout.seq_len
        return rows, inject

    # ---------------------------------------------------------------- the KV cache
    def check_continuation(self, past: Any, past_len: int, input_ids: torch.Tensor) -> None:
        """Refuses continuing a cached sequence that no longer matches the prompt the maps came from."""
        layout = self.layout
        if input_ids.shape[0] != layout.positions.shape[0]:
            raise BackboneError(
                f"this call continues a sequence with batch size {input_ids.shape[0]}, but VIF's maps are for "
                f"{layout.positions.shape[0]} prompts; change the batch only through a new prompt."
            )
        if (
            past is not None
            and self.prompt_tag is not None
            and getattr(past, "_vif_prompt", None) != self.prompt_tag
        ):
            raise BackboneError(
                "this call continues a different KV cache than the one VIF's maps were computed with; "
                "run its prompt through the model first."
            )
        if past is not None and past_len < layout.seq_len:
            raise BackboneError(
                f"the KV cache holds {past_len} tokens but VIF's maps come from a {layout.seq_len}-token prompt "
                "(was it cropped into the prompt, or the prompt fed in chunks?); run the whole prompt in "
                "one call before decoding."
            )

    def follow_row_changes(self, past: Any) -> None:
        """Tags the prompt's KV cache and makes its beam reordering reorder VIF's per-row state too.

        The state kept per sample (maps, layout, the decode steps' ``c``) is indexed like
        the cache's rows; ``reorder_cache(beam_idx)`` moves cache row ``beam_idx[r]`` to row
        ``r``, so the state follows the same index. The tag (copied along by ``deepcopy``,
        as a reused prompt cache is) tells later calls which prompt a cache holds.
        """
        self.prompt_tag = None
        if past is None:
            return
        self.prompt_tag = past._vif_prompt = next(_PROMPT_TAGS)
        past._vif_runtime = weakref.ref(self)
        if "reorder_cache" not in vars(past):
            past.reorder_cache = types.MethodType(_reorder_and_follow, past)  # rebinds to a deepcopy

    def select_rows(self, index: torch.Tensor) -> None:
        """Row ``r`` of every per-sample state becomes old row ``index[r]``."""
        self.layout = self.layout.select(index)
        rows = index.to(self.layout.positions.device)
        self.results = {
            d: dataclasses.replace(r, pi=r.pi.index_select(0, rows)) for d, r in self.results.items()
        }
        for state in self.image_sums.values():
            state.select(rows)

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


_PROMPT_TAGS = itertools.count()


def _reorder_and_follow(cache: Any, beam_idx: torch.LongTensor) -> None:
    """``reorder_cache`` of a KV cache VIF tagged: the cache's own, then VIF's per-row state."""
    type(cache).reorder_cache(cache, beam_idx)
    runtime = cache._vif_runtime()
    if runtime is not None and runtime.prompt_tag == getattr(cache, "_vif_prompt", None):
        runtime.select_rows(beam_idx)


def check_cache(past: Any, inject_layers: list[int]) -> None:
    """Refuses a KV cache the closed form cannot trust.

    VIF reads the image tokens' values at their sequence positions and keeps their
    weighted sum from the prompt, so it needs kv slot = sequence position and cached
    values that never change: transformers' ``DynamicCache`` with plain layers.
    """
    if past is None:
        return
    if isinstance(past, StaticCache):
        raise BackboneError(
            "VIF needs the dynamic KV cache (query positions are read from the cache length); "
            "generate without cache_implementation='static'."
        )
    if not isinstance(past, DynamicCache):
        raise BackboneError(
            f"VIF needs transformers' DynamicCache (kv slot = sequence position, cached values never change), "
            f"got a {type(past).__name__}; generate without cache_implementation=... ."
        )
    if getattr(past, "offloading", False):
        raise BackboneError(
            "VIF does not support an offloaded DynamicCache (untested: its layers move between devices); "
            "use DynamicCache() without offloading."
        )
    for d in inject_layers:
        if d < len(past.layers) and type(past.layers[d]) is not DynamicLayer:
            raise BackboneError(
                f"the KV cache of injection layer {d} is a {type(past.layers[d]).__name__} (sliding window, "
                "quantised or indexed): its slots are not the sequence positions VIF injects at. Use a plain "
                "DynamicCache, and no sliding window on injection layers."
            )


@dataclass
class _TokenStream:
    """Where one input stream of the attender sits in the hidden states: ``index`` / ``mask`` ``(B_img, N)``."""

    index: torch.Tensor  # (B_img, N) flat index into hidden.view(B * L, D)
    mask: torch.Tensor  # (B_img, N) bool, False on padding entries

    def take(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B_img, N, D)`` the stream's tokens of ``hidden`` ``(B, L, D)``, in ``dtype``."""
        return hidden.flatten(0, 1)[self.index.to(hidden.device)].to(dtype)


@dataclass
class _AttenderStreams:
    """The attender's inputs of one prompt, found once and reused by every pair (no host sync per pair).

    Only samples with an image token (``rows``) go through the attender.
    """

    rows: torch.Tensor  # (B_img,) which samples
    all_rows: bool  # every sample has an image: no scatter back needed
    vision: _TokenStream
    v_mask: torch.Tensor  # (B_img, Nv)
    coords: torch.Tensor  # (B_img, Nv, 2)
    question: _TokenStream
    question_answer: _TokenStream | None
    any_answer: bool  # some sample of the batch has an answer token (labels)

    @classmethod
    def build(
        cls, layout: VisionLayout, question: torch.Tensor, answer: torch.Tensor | None
    ) -> _AttenderStreams:
        rows = layout.image_rows
        batch, length = question.shape
        offset = (rows * length)[:, None]  # row start in the flattened (B * L) hidden states
        any_answer = answer.any() if answer is not None else question.new_zeros((), dtype=torch.bool)
        question = question.index_select(0, rows)
        both = question | answer.index_select(0, rows) if answer is not None else None
        widest = [any_answer.long(), any_answer.long()]  # placeholders when no sample has an image
        if rows.numel():
            widest = [question.sum(-1).amax(), both.sum(-1).amax() if both is not None else widest[1]]
        # The attender's only host sync: how wide its text streams are, whether labels hold an answer.
        q_width, qa_width, any_answer = torch.stack([*widest, any_answer.long()]).tolist()

        def stream(mask: torch.Tensor, width: int) -> _TokenStream:
            slot = torch.arange(length, device=mask.device).expand_as(mask)
            # Selected positions first, in sequence order.
            index = torch.where(mask, slot, slot + length).sort(dim=1).values[:, : max(width, 1)]
            valid = index < length
            return _TokenStream(offset + index.clamp(max=length - 1), valid)

        vision = layout.positions.index_select(0, rows).clamp(max=length - 1)
        return cls(
            rows=rows,
            all_rows=rows.numel() == batch,
            vision=_TokenStream(offset + vision, layout.valid.index_select(0, rows)),
            v_mask=layout.valid.index_select(0, rows),
            coords=layout.coords.index_select(0, rows),
            question=stream(question, q_width),
            question_answer=stream(both, qa_width) if both is not None else None,
            any_answer=bool(any_answer),
        )


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


class VIFModel(nn.Module):
    """A vision-language model with VIF attached. Build it with :func:`vif.attach`.

    It stands in for the base model wherever that is used: attributes it does not have itself
    come from the base model (``generation_config``, ``dtype``, ``name_or_path``,
    ``get_input_embeddings()``, ``num_parameters()``, ``hf_device_map``, ``can_generate()``, ...,
    as PEFT's ``PeftModel`` does), and its ``forward`` has the base forward's signature (the
    Trainer's ``remove_unused_columns`` reads it). ``pipeline(...)``, a plain ``Trainer`` and
    activation checkpointing work on it as on the base model.
    """

    def __init__(self, base_model: nn.Module, config: VIFConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if getattr(base_model, "_vif_attached", False):
            raise VIFConfigError(
                "this model already has VIF attached; detach() it first or attach to a fresh copy."
            )
        _require_vision_language_model(base_model)
        # Everything up to _install() only reads the base model: a failure leaves it untouched.
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
        needs_vocab = config.evidence_weight > 0 and config.evidence_readout == "learned"
        if needs_vocab and config.vocab_size is None:
            head = base_model.get_output_embeddings().weight
            # the LM head's rows (resized embeddings included); ZeRO-3 partitioned weights are empty
            # here and keep their shape in ds_shape
            vocab = getattr(head, "ds_shape", head.shape)[0]
            config = VIFConfig.from_dict({**config.to_dict(), "vocab_size": int(vocab)})
        if "encoder" in config.token_sources and config.encoder_size is None:
            config = VIFConfig.from_dict({**config.to_dict(), "encoder_size": self._encoder_size(hidden)})
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
        # The attender reads the hidden states of the first extraction layer: it lives where that
        # layer computes (with accelerate's device_map / offload, that is not "the first parameter").
        layers = self.backbone.decoder_layers()
        first = layers[min(config.extract_layers)]
        device = execution_device(first)
        if device is None:  # no hook and no real weights: a model built on the meta device stays there
            on_meta = any(p.device.type == "meta" for p in first.parameters())
            device = torch.device("meta" if on_meta else "cpu")
        self.vif_module = ProbabilisticAttender(config).to(
            device=device, dtype=dtype or _floating_dtype(base_model)
        )
        self._base_attn = base_attn
        self._handles: list[Any] = []
        self._runtime = _Runtime(self)
        self._bind_forward_signature()  # reads the base model only
        self.last_vif: VIFOutput | None = None  # the last forward's out.vif
        self._install()
        self.train(base_model.training)  # a fresh nn.Module starts in training mode; follow the model

    def _encoder_size(self, hidden: int) -> int:
        """Width of the vision encoder's output (``hidden`` when the LLM's input is that output)."""
        module = self.backbone.vision_encoder_output()
        if module is None:
            return hidden
        return next(m.in_features for m in module.modules() if isinstance(m, nn.Linear))

    # ---------------------------------------------------------------- wiring
    def _install(self) -> None:
        """Adds the hooks, the plan attributes and the VIF attention backend; all or nothing."""
        try:
            register_attention_functions()
            layers = self.backbone.decoder_layers()
            runtime = self._runtime
            attender = self.vif_module

            def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                inputs = dict(kwargs)
                if args:
                    inputs.setdefault("input_ids", args[0])
                runtime.begin(inputs)

            def make_extract_hook(layer_idx: int):
                def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                    hidden = output[0] if isinstance(output, tuple) else output
                    # A no-op unless the model is split over devices (accelerate's device_map). (The
                    # attender's `slots`, not next(parameters()): this hook runs again when a checkpointed
                    # layer is recomputed in backward, where FSDP has swapped parameters for plain tensors.)
                    runtime.extract(layer_idx, hidden.to(attender.slots.device))

                return hook

            self.base_model._vif_attached = True
            self._handles.append(self.base_model.register_forward_pre_hook(pre_hook, with_kwargs=True))
            config = self.config_vif
            sources = config.token_sources
            encoder = self.backbone.vision_encoder_output() if "encoder" in sources else None
            if encoder is not None:

                def encoder_hook(_module: nn.Module, args: tuple) -> None:
                    runtime.record_encoder(args[0].to(attender.slots.device))

                self._handles.append(encoder.register_forward_pre_hook(encoder_hook))
            if "embeddings" in sources or ("encoder" in sources and encoder is None):

                def embeddings_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    runtime.record_embeddings(hidden.to(attender.slots.device))

                self._handles.append(layers[0].register_forward_pre_hook(embeddings_hook, with_kwargs=True))
            for e in sorted(set(self.config_vif.extract_layers)):
                self._handles.append(layers[e].register_forward_hook(make_extract_hook(e)))
            for d in self.config_vif.inject_layers:
                setattr(self.backbone.attention_module(layers[d]), PLAN_ATTRIBUTE, runtime)
            self.base_model.set_attn_implementation({"text_config": vif_name(self._base_attn)})
        except BaseException:
            self._uninstall()
            raise

    def _uninstall(self) -> None:
        """Removes whatever :meth:`_install` added (also a partial install); safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.backbone.decoder_layers():
            module = self.backbone.attention_module(layer)
            if hasattr(module, PLAN_ATTRIBUTE):
                delattr(module, PLAN_ATTRIBUTE)
        if (self.backbone.text_config()._attn_implementation or "eager") != self._base_attn:
            self.base_model.set_attn_implementation({"text_config": self._base_attn})
        if "_vif_attached" in vars(self.base_model):
            del self.base_model._vif_attached

    def _bind_forward_signature(self) -> None:
        # `forward(*args, **kwargs)` hides the base forward's parameters from code that reads them
        # (the Trainer's remove_unused_columns, its loss-kwargs check). This instance gets its own
        # copy of VIFModel.forward whose signature is the base model's; the code is the same.
        try:
            base_signature = inspect.signature(self.base_model.forward)
        except (TypeError, ValueError):
            return
        impl = VIFModel.forward
        function = types.FunctionType(impl.__code__, impl.__globals__, impl.__name__, impl.__defaults__)
        function.__doc__, function.__qualname__ = impl.__doc__, impl.__qualname__
        params = list(base_signature.parameters.values())
        # VIF's own keyword (evidence boxes for map_source="boxes"), before any **kwargs.
        boxes = inspect.Parameter("vif_boxes", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        if "vif_boxes" not in base_signature.parameters:
            params.insert(at, boxes)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        function.__signature__ = base_signature.replace(parameters=[self_param, *params])
        self.__dict__["forward"] = types.MethodType(function, self)

    def detach(self) -> nn.Module:
        """Removes every hook and attribute VIF added; returns the untouched base model."""
        self._uninstall()
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

    # ---------------------------------------------------------------- a drop-in for the base model
    def __getattr__(self, name: str) -> Any:
        """Attributes VIFModel lacks come from the base model (as in PEFT's ``PeftModel``)."""
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of this module
        except AttributeError:
            if name == "base_model" or "base_model" not in self._modules:
                raise  # during __init__, before the base model is set
            return getattr(self._modules["base_model"], name)

    @property
    def config(self) -> Any:
        """The base model's transformers config (the VIF config is :attr:`config_vif`)."""
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        """Where inputs go: the execution device of the input embeddings (accelerate-aware)."""
        return input_device(self.base_model)

    @property
    def vif_device(self) -> torch.device:
        """Where the VIF module lives and computes."""
        return next(self.vif_module.parameters()).device

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The base model's activation checkpointing, always non-reentrant.

        The map computed in an extraction layer reaches the checkpointed injection layers as a
        closure, which only non-reentrant checkpointing differentiates; reentrant checkpointing
        would silently give the VIF module no gradient from the injection, so it is refused.
        """
        options = dict(activation_checkpointing_kwargs or {})
        if options.get("use_reentrant", False):
            raise VIFConfigError(
                "use_reentrant=True checkpointing loses the VIF module's gradients (its map reaches the "
                "injection layers as a closure); leave use_reentrant unset or False."
            )
        options["use_reentrant"] = False
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # ---------------------------------------------------------------- running
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
                total = total + cfg.kl_weight * vif.kl.to(total.device)
            if vif.sparsity is not None:
                total = total + cfg.sparsity_weight * vif.sparsity.to(total.device)
            if vif.evidence is not None:
                total = total + cfg.evidence_weight * vif.evidence.to(total.device)
            skipped_posterior = self.vif_module.posterior is not None and not vif.used_posterior
            boxes = cfg.map_source == "boxes"
            no_image = runtime.layout.image_rows.numel() == 0  # known on the host: no sync
            if not vif.importance or no_image or skipped_posterior or boxes:
                # No image in this batch (the attender did not run), no answer token under
                # attender="released" (the posterior did not run), or a ground-truth map. Keep every parameter in the
                # graph so data-parallel gradient reduction still sees all of them.
                total = total + 0.0 * sum(p.sum() for p in self.vif_module.parameters()).to(total.device)
            out.loss = total
        out.vif = vif
        # Also kept here: wrappers that rebuild the output (FSDP, accelerate's mixed-precision fp32
        # conversion) drop the `vif` attribute, and the trainer reads the loss parts from here then.
        self.last_vif = vif
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

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **hub_kwargs: Any,
    ) -> Path:
        """Writes ``vif_config.json`` and ``vif_module.safetensors`` (the VIF module only).

        Takes transformers' ``save_pretrained`` keywords: ``is_main_process`` (False: write nothing,
        for multi-process scripts), ``state_dict`` (e.g. gathered by accelerate / DeepSpeed: the
        VIF module's entries, with or without the ``vif_module.`` prefix, are saved; the rest is
        ignored), ``safe_serialization`` (the module is always safetensors; False is refused) and
        ``max_shard_size`` (accepted; the module is written as one file). ``push_to_hub`` is not
        implemented: upload the folder with ``huggingface_hub.upload_folder``.
        """
        if not safe_serialization:
            raise ValueError(
                "VIF modules are only saved as safetensors (never pickled); drop safe_serialization=False."
            )
        if push_to_hub or hub_kwargs:
            unknown = sorted(hub_kwargs)
            raise TypeError(
                "VIFModel.save_pretrained does not push to the hub"
                + (f" and takes no arguments {unknown}" if unknown else "")
                + "; save to a folder, then upload it with huggingface_hub.upload_folder(repo_id=..., folder_path=...)."
            )
        del max_shard_size  # one file: the module is small next to its base model
        directory = Path(save_directory)
        if not is_main_process:
            return directory
        if state_dict is None:
            state = self.vif_module.state_dict()
        else:
            prefix = "vif_module."
            state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not state:
                state = {k: v for k, v in state_dict.items() if k in self.vif_module.state_dict()}
        directory.mkdir(parents=True, exist_ok=True)
        data = {**self.config_vif.to_dict(), "base_model": self.base_model_info()}
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "vif_version": "1"})
        return directory

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        # Without this, the base model's push_to_hub would be reached through __getattr__.
        raise TypeError(
            "VIFModel.push_to_hub is not implemented (it would otherwise push the base model); save the "
            "adapter with save_pretrained(folder) and upload it with huggingface_hub.upload_folder."
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter: str | Path,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> VIFModel:
        """Attaches a saved VIF module to ``model``; refuses one saved for another backbone.

        ``adapter`` is a ``save_pretrained`` folder or a Hugging Face hub id (``subfolder``,
        ``revision``, ``cache_dir``, ``token``, ``local_files_only`` as in transformers; the hub's
        cache and ``HF_HUB_OFFLINE`` apply). ``overrides`` replace inference-time fields of the
        saved config (e.g. ``alpha``, ``injection``, ``inject_decode``).

        Everything that can be checked without weights is checked before ``model`` is touched
        (:func:`vif.adapter_io.inspect_adapter`); if loading still fails, VIF is detached again,
        so ``model`` is left exactly as it was. Raises :class:`VIFLoadError`.
        """
        directory = resolve_adapter(
            adapter,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        _require_vision_language_model(model)
        config = inspect_adapter(directory, model.config, **overrides)
        vmodel = cls(model, config)
        weights = directory / WEIGHTS_NAME
        try:
            state = load_file(weights, device=str(vmodel.vif_device))
            vmodel.vif_module.load_state_dict(state, strict=True)
        except BaseException as err:
            vmodel.detach()
            if isinstance(err, Exception):
                raise VIFLoadError(f"loading {weights} failed: {type(err).__name__}: {err}") from err
            raise
        return vmodel


def _require_vision_language_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vision_config", None) is None:
        raise BackboneError(
            f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r}) is not a "
            "vision-language model: VIF needs image tokens to attend to. Load a VLM such as "
            "LlavaForConditionalGeneration or Qwen2_5_VLForConditionalGeneration."
        )


def attach(model: nn.Module, config: VIFConfig | None = None, dtype: torch.dtype | None = None) -> VIFModel:
    """Attaches a new (randomly initialised) VIF module to a transformers VLM.

    ``config`` defaults to ``VIFConfig.preset("compact", model)`` (vif's defaults, docs/looking.md;
    ``"paper"`` is the paper's recipe); the module's dtype defaults to the model's. If attaching
    fails, ``model`` is left exactly as it was.
    """
    _require_vision_language_model(model)
    return VIFModel(model, config or VIFConfig.preset("compact", model), dtype=dtype)
