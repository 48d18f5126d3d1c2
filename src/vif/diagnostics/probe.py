"""The fast path: attention rows computed inside the attention function, from query and key.

``output_attentions=True`` makes every layer materialise ``(B, H, L, L)`` probabilities
(and forces eager attention). The diagnostics only need a few query rows per sample
(the answer tokens, or the last prompt token), so :class:`AttentionProbe` - installed
as the ``PROBE_ATTRIBUTE`` observer of every LLM attention module (see
:mod:`vif.injection`) - recomputes just those rows: ``rows x kv`` scores per head,
never ``kv x kv``. The attention itself still runs on SDPA, untouched.

In a layer where VIF injects, the observer also receives the layer's
:class:`~vif.injection.InjectionPlan`, and applies the injection's closed form to the
rows it computed, so what it reports is the attention the layer actually used::

    A'_i = visible_i * ((1 - alpha) A_i + alpha pi~) / ((1 - alpha) + alpha m_i)

(the masked renormalisation of spec section 6; ``m_i`` the pi-mass row ``i`` sees).
Rows that are not injected, or see no image token, keep ``A_i``, exactly as
:func:`vif.injection.materialised_attention` does.

What is kept per layer is small: the head-averaged rows, summed over the chosen rows,
at the image columns only - ``(B, Nv)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..backbones import BackboneError, VisionLayout, get_backbone
from ..injection import (
    BASE_BACKENDS,
    PROBE_ATTRIBUTE,
    InjectionPlan,
    register_attention_functions,
    vif_name,
    visibility,
)

IGNORE_INDEX = -100


@dataclass
class RowSelection:
    """Which query rows to read, per sample.

    positions: ``(B, R)`` sequence index (= kv slot) of each chosen row; padding entries
        may hold any index, they are ignored.
    valid: ``(B, R)`` bool, False on padding entries (samples choose different numbers of rows).
    """

    positions: torch.Tensor
    valid: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """``(B,)`` number of rows chosen per sample."""
        return self.valid.sum(-1)


def _pack(mask: torch.Tensor) -> RowSelection:
    """Packs the True positions of a ``(B, L)`` mask into a :class:`RowSelection` (in order)."""
    length = mask.shape[1]
    order = torch.arange(length, device=mask.device).expand_as(mask)
    keys = torch.where(mask, order, order + length)  # chosen positions sort first, in order
    width = max(int(mask.sum(-1).max()), 1)
    positions = keys.argsort(dim=1)[:, :width]
    return RowSelection(positions, mask.gather(1, positions))


def select_rows(
    attention_mask: torch.Tensor | None,
    image_mask: torch.Tensor,
    labels: torch.Tensor | None,
    rows: str,
) -> RowSelection:
    """The query rows of a teacher-forced batch.

    Args:
        attention_mask: ``(B, L)`` 1 on real tokens (None: all real).
        image_mask: ``(B, L)`` bool, True on image tokens.
        labels: ``(B, L)`` with ``-100`` outside the answers, or None.
        rows: ``"answer"`` - every answer token (``labels != -100``; the same positions the
            LM loss and VIF's posterior use); ``"last"`` - the last prompt token, i.e. the
            last real token before the first answer token (the last real token when there
            are no labels), the row that predicts the answer's first token; ``"auto"`` -
            ``"answer"`` for samples with answer tokens, ``"last"`` for the others.

    Returns:
        the :class:`RowSelection`; raises ``ValueError`` if a sample has no such row.
    """
    real = torch.ones_like(image_mask) if attention_mask is None else attention_mask.bool()
    text = real & ~image_mask
    answer = torch.zeros_like(real) if labels is None else (labels != IGNORE_INDEX) & text
    if rows == "answer" and labels is None:
        raise ValueError('rows="answer" needs labels (answer tokens = labels != -100); use rows="last".')
    if rows not in ("auto", "answer", "last"):
        raise ValueError(f'rows must be "auto", "answer" or "last" here, got {rows!r}')
    length = real.shape[1]
    order = torch.arange(length, device=real.device).expand_as(real)
    # The prompt ends where the first answer token starts; its last real token is the row
    # that predicts the answer's first token.
    prompt = real & (order < first_true(answer, default=length)[:, None])
    last_index = torch.where(prompt, order, -1).amax(-1)
    last = (order == last_index[:, None]) & prompt
    if rows == "answer":
        chosen = answer
    elif rows == "last":
        chosen = last
    else:  # auto: the answer where a sample has one
        chosen = torch.where(answer.any(-1, keepdim=True), answer, last)
    if not chosen.any(-1).all():
        empty = (~chosen.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"samples {empty} of the batch have no {rows!r} row (no answer tokens?).")
    return _pack(chosen)


def first_true(mask: torch.Tensor, default: int) -> torch.Tensor:
    """``(B,)`` index of the first True of each row of ``mask`` ``(B, L)``, ``default`` if none."""
    length = mask.shape[1]
    order = torch.arange(length, device=mask.device).expand_as(mask)
    first = torch.where(mask, order, length).amin(-1)
    return torch.where(first == length, torch.full_like(first, default), first)


# --------------------------------------------------------------------------- the math
def row_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of a few query rows.

    Args:
        query: ``(B, Hq, R, d)`` the chosen rows' queries (after RoPE).
        key: ``(B, Hkv, kv, d)`` keys after the cache update; GQA is not expanded.
        visible: ``(B, 1, R, kv)`` bool, which keys each row may attend to.
        scaling: the softmax temperature (``module.scaling``, usually ``d ** -0.5``).

    Returns:
        ``(B, Hq, R, kv)`` float32 probabilities (0 on invisible keys).
    """
    batch, hq, n_rows, dim = query.shape
    hkv = key.shape[1]
    # Query head h uses kv head h // groups (transformers' repeat_kv), so folding the
    # groups into the row axis lets one matmul per kv head serve all its query heads,
    # without copying the keys `groups` times.
    q = query.float().reshape(batch, hkv, (hq // hkv) * n_rows, dim)
    scores = torch.matmul(q, key.float().transpose(2, 3)).reshape(batch, hq, n_rows, -1) * scaling
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a row that sees nothing (never a chosen row)


def inject(
    probs: torch.Tensor,
    visible: torch.Tensor,
    plan: InjectionPlan,
    index: torch.Tensor,
) -> torch.Tensor:
    """The injected attention ``A'`` of the chosen rows (closed form, spec section 6).

    Args:
        probs: ``(B, Hq, R, kv)`` base probabilities ``A`` of the chosen rows.
        visible: ``(B, 1, R, kv)`` bool.
        plan: the layer's plan (``plan.inject`` is ``(B, q_len)`` over the call's rows).
        index: ``(B, R)`` each chosen row's index among the call's ``q_len`` rows.

    Returns:
        ``(B, Hq, R, kv)``: ``A'`` on injected rows that see at least one image token,
        ``A`` elsewhere (as :func:`vif.injection.materialised_attention`).
    """
    kv_len = probs.shape[-1]
    alpha = plan.alpha
    pi_kv = torch.zeros(probs.shape[0], kv_len, device=probs.device, dtype=probs.dtype)
    pi_kv = pi_kv.scatter_add(1, plan.positions.clamp(max=kv_len - 1), plan.pi.to(probs.dtype))
    pi_seen = pi_kv[:, None, None, :] * visible  # (B, 1, R, kv)
    mass = pi_seen.sum(-1, keepdim=True)  # m_i
    injected = ((1.0 - alpha) * probs + alpha * pi_seen) / ((1.0 - alpha) + alpha * mass)
    use = plan.inject.gather(1, index)[:, None, :, None] & (mass > 0)
    return torch.where(use, injected, probs)


def image_mass(probs: torch.Tensor, row_valid: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the chosen rows on each image token, summed over rows.

    probs ``(B, H, R, kv)``, row_valid ``(B, R)``, image_positions ``(B, Nv)`` (kv slots;
    padding entries may point anywhere, the caller masks them) -> ``(B, Nv)`` float32.
    Divide by the number of rows for the row average.
    """
    rows = (probs.mean(1) * row_valid[..., None]).sum(1)  # (B, kv)
    return rows.gather(1, image_positions.clamp(max=rows.shape[-1] - 1)).float()


# --------------------------------------------------------------------------- the observer
class AttentionProbe:
    """The ``PROBE_ATTRIBUTE`` observer: accumulates the chosen rows' attention on the image.

    Two modes, set before each forward:

    * :meth:`expect` (teacher forcing): fixed rows per sample, in sequence coordinates;
      each layer adds up the rows it sees (a call holds rows ``kv - q .. kv - 1``).
    * :meth:`expect_steps` (generation): the last query row of every call - the last
      prompt token at prefill, then each decode step's new token, i.e. exactly the rows
      whose outputs were sampled - one ``(B, Nv)`` entry per call and layer in
      :attr:`steps`, to be masked once the generated lengths are known.

    Results: :attr:`sums` (layer -> ``(B, Nv)``), :attr:`counts` (``(B,)`` rows per
    sample), :attr:`steps` (layer -> list of ``(B, Nv)``), :attr:`importance` (injection
    layer -> ``(B, Nv)`` the plan's pi, i.e. VIF's map in image-token order).
    """

    def __init__(self, layers: list[int] | None = None) -> None:
        self.layers = None if layers is None else set(layers)
        self.layout: VisionLayout | None = None
        self.selection: RowSelection | None = None
        self.sums: dict[int, torch.Tensor] = {}
        self.steps: dict[int, list[torch.Tensor]] = {}
        self.importance: dict[int, torch.Tensor] = {}

    def expect(self, layout: VisionLayout, selection: RowSelection) -> None:
        self.layout, self.selection = layout, selection
        self.sums, self.steps, self.importance = {}, {}, {}

    def expect_steps(self, layout: VisionLayout) -> None:
        self.layout, self.selection = layout, None
        self.sums, self.steps, self.importance = {}, {}, {}

    @property
    def counts(self) -> torch.Tensor:
        return self.selection.counts

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        plan: InjectionPlan | None,
    ) -> None:
        layer = module.layer_idx
        if self.layout is None or (self.layers is not None and layer not in self.layers):
            return
        if plan is not None and layer not in self.importance:
            self.importance[layer] = plan.pi.detach().float()  # prefill's map, reused by decode steps
        batch, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        first = kv_len - q_len  # kv slot of the call's first query row (dynamic cache)
        if self.selection is None:
            index = torch.full((batch, 1), q_len - 1, device=query.device)
            row_valid = torch.ones(batch, 1, dtype=torch.bool, device=query.device)
        else:
            index = self.selection.positions.to(query.device) - first
            row_valid = self.selection.valid.to(query.device) & (index >= 0) & (index < q_len)
            if not row_valid.any():
                return
            index = index.clamp(0, q_len - 1)

        with torch.no_grad():
            q = query.gather(2, index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]))
            visible = self._visible(attention_mask, index, first, batch, kv_len)
            scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            probs = row_probabilities(q, key, visible, scaling)
            if plan is not None:
                probs = inject(probs, visible, plan, index)
            mass = image_mass(probs, row_valid, self.layout.positions.to(query.device))
        if self.selection is None:
            self.steps.setdefault(layer, []).append(mass)
        else:
            self.sums[layer] = self.sums[layer] + mass if layer in self.sums else mass

    @staticmethod
    def _visible(
        attention_mask: torch.Tensor | None, index: torch.Tensor, first: int, batch: int, kv_len: int
    ) -> torch.Tensor:
        """``(B, 1, R, kv)`` bool visibility of the chosen rows (from the call's mask)."""
        if attention_mask is None:  # nothing padded: plain causal
            return visibility(None, index + first, kv_len)
        mask = attention_mask.expand(batch, 1, -1, -1)
        rows = mask.gather(2, index[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
        return visibility(rows, index + first, kv_len)


# --------------------------------------------------------------------------- installing it
def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a :class:`vif.VIFModel` (or the model itself)."""
    return getattr(model, "base_model", model) if hasattr(model, "vif_module") else model


@contextlib.contextmanager
def probing(model: nn.Module, probe: AttentionProbe | None) -> Iterator[None]:
    """Installs ``probe`` on every LLM attention module for the duration of the block.

    The observer is only called by the ``vif_<base>`` attention functions, so a model
    without VIF is switched from ``sdpa`` / ``eager`` to ``vif_sdpa`` / ``vif_eager``
    (which, without a plan, run the base function unchanged) and switched back after.
    ``probe=None`` does nothing (the ``output_attentions`` route).
    """
    if probe is None:
        yield
        return
    base = hf_model(model)
    backbone = get_backbone(base)
    current = backbone.text_config()._attn_implementation or "eager"
    switched = None
    if not current.startswith("vif_"):
        if current not in BASE_BACKENDS:
            raise BackboneError(
                f"the diagnostics probe runs on the attention backends {sorted(BASE_BACKENDS)}, but the "
                f"language model uses {current!r}; load the model with attn_implementation='sdpa'."
            )
        register_attention_functions()
        base.set_attn_implementation({"text_config": vif_name(current)})
        switched = current
    modules = [backbone.attention_module(layer) for layer in backbone.decoder_layers()]
    for module in modules:
        setattr(module, PROBE_ATTRIBUTE, probe)
    try:
        yield
    finally:
        for module in modules:
            if getattr(module, PROBE_ATTRIBUTE, None) is probe:
                delattr(module, PROBE_ATTRIBUTE)
        if switched is not None:
            base.set_attn_implementation({"text_config": switched})
