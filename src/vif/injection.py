"""Injecting the importance map into attention (spec section 6), one function per base backend.

At an injection layer, for every injected query row ``i`` (non-vision text rows, or
all rows for the Full-Seq ablation), with ``A`` the ordinary attention probabilities
and ``pi~`` the importance map scattered onto the image-token columns:

    A' = row_normalise(visible * ((1 - alpha) * A + alpha * pi~))

Two ways to compute it:

* :func:`fused_correction` - the exact closed form on top of any base backend's output
  ``O = A V``::

      O'_i = ((1 - alpha) O_i + alpha C_i) / ((1 - alpha) + alpha m_i),   C_i = sum_{j in V, j <= i} pi_j V_j

  with ``m_i`` the pi-mass row ``i`` sees. Image tokens are visible to a row exactly
  when they precede it (they are never padding), so a row after every image token of
  its sample sees the whole map: ``C_i = c = sum_j pi_j V_j``, one weighted sum over the
  image span per sample and KV head, ``O(n_vision x d)``. Only rows that sit inside or
  between images (several images in one sample, or the Full-Seq ablation) need partial
  sums: prefix sums over the image span. While decoding, the image values in the KV
  cache never change, so ``c`` is a constant of the prompt: it is kept from the
  prefill (:class:`ImageSum`) and each new token costs one blend per head. The blend
  is written as ``lerp(O_i, c / m, w_i)`` with ``w_i = alpha m_i / ((1 - alpha) + alpha m_i)``:
  one pass over the output, GQA by broadcasting, and ``w_i = 0`` (rows not injected)
  returns ``O_i`` bit for bit.
* :func:`materialised_attention` - the obviously correct reference that builds ``A``,
  mixes, masks and renormalises it, and returns ``A'`` as the attention weights.

The attention functions registered with transformers (``vif_sdpa``, ``vif_eager``) look
up the :class:`InjectionPlan` for the calling layer on the attention module itself
(attribute set by :class:`vif.VIFModel`), so two models in one process never share state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

PLAN_ATTRIBUTE = "_vif_plan_source"
# An optional observer on an attention module, called as
# probe(module, query, key, attention_mask, plan) on every call (plan None when not injecting);
# used by the diagnostics to compute the attention rows they need without output_attentions.
PROBE_ATTRIBUTE = "_vif_probe"


@dataclass
class ImageSum:
    """What a row after every image token needs, kept from the prompt for the decode steps.

    Empty until the layer's first fused call of a prompt fills it. The image values in
    the KV cache never change while decoding, so neither does this.

    mean: ``(B, 1, Hkv, 1, d)`` in the output dtype: ``c / m``, the pi-weighted mean of the
        image values (0 for samples without an image).
    weight: ``(B, 1)`` in the output dtype: the blend weight ``alpha m / ((1 - alpha) + alpha m)``.
    alpha: the alpha it was computed with.
    """

    mean: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    alpha: float | None = None

    def usable(self, batch: int, alpha: float, dtype: torch.dtype) -> bool:
        return (
            self.mean is not None
            and self.alpha == alpha
            and self.mean.shape[0] == batch
            and self.mean.dtype == dtype
        )

    def select(self, index: torch.Tensor) -> None:
        """Follows a reordering of the batch rows (beam search): row ``r`` becomes old row ``index[r]``."""
        if self.mean is not None:
            self.mean = self.mean.index_select(0, index.to(self.mean.device))
            self.weight = self.weight.index_select(0, index.to(self.weight.device))


@dataclass
class InjectionPlan:
    """What one injected layer needs for one attention call.

    pi: ``(B, Nv)`` float32 importance per image token, 0 on padding entries.
    positions: ``(B, Nv)`` sequence (= kv-slot) index of each image token, ascending,
        padding entries after the sample's real ones.
    rows: ``(B, q_len)`` sequence index of each query row.
    inject: ``(B, q_len)`` bool, rows that receive the map.
    alpha: mixing weight.
    span: ``(first, end)`` kv slots holding every image token of the batch. ``None``:
        derived from ``positions`` (entries ``>= kv_len`` are padding; one host sync).
    window: ``(lo, hi)`` the rows (kv slots) that may see only part of the map of their
        sample: injected rows inside or between images. ``None``: every row inside the
        span (always correct); an empty range: none (one image per sample, text rows).
    state: where the layer keeps :class:`ImageSum` from the prompt for its decode steps
        (``None``: recomputed from the cached image values on every call).
    rows_from: no row before this kv slot is changed (none is injected where it sees
        any of the map), so the blend can start there; 0 is always correct.
    """

    pi: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    inject: torch.Tensor
    alpha: float
    span: tuple[int, int] | None = None
    window: tuple[int, int] | None = None
    state: ImageSum | None = field(default=None, repr=False)
    rows_from: int = 0


class PlanSource(Protocol):
    """Implemented by the VIF runtime: the plan for a layer's call, or None to run the base."""

    materialised: bool

    def plan_for(self, layer_idx: int, q_len: int, kv_len: int) -> InjectionPlan | None: ...


# --------------------------------------------------------------------------- the math
def fused_correction(
    out: torch.Tensor, value: torch.Tensor, plan: InjectionPlan, inplace: bool = False
) -> torch.Tensor:
    """Applies the closed form to a base backend's output.

    Extra work per layer: at prefill one weighted sum of the image span's values per
    sample and KV head (``O(n_vision x d)``; prefix sums over the span only when
    ``plan.window`` holds rows), then one blend pass over the output. When decoding,
    with ``plan.state`` filled by the prefill, only the blend: the cache is not read.

    Args:
        out: ``(B, q_len, Hq, d)`` the base attention output ``O``.
        value: ``(B, Hkv, kv_len, d)`` values after the cache update (GQA not expanded).
        plan: the layer's :class:`InjectionPlan`; its rows must be the last ``q_len`` kv
            slots (true for every call with a dynamic cache, prefill or decode).
        inplace: blend into ``out`` itself, from row ``plan.rows_from`` on (no copy of
            the output; only where no gradient flows through ``out``).

    Returns:
        ``(B, q_len, Hq, d)`` in ``out``'s dtype; rows not injected are returned bit-exact.
    """
    batch, hkv, kv_len, dim = value.shape
    q_len = out.shape[1]
    first_row = kv_len - q_len
    first, end = plan.span if plan.span is not None else _derived_span(plan.positions, kv_len)
    end = min(end, kv_len)
    if end <= first:  # no image token in these slots
        return out
    lo, hi = plan.window if plan.window is not None else (first, end - 1)
    lo, hi = max(lo, first_row, first), min(hi, kv_len, end)  # window rows in this call
    state = plan.state
    alpha = plan.alpha
    out5 = out.unflatten(2, (hkv, out.shape[2] // hkv))  # (B, q, Hkv, G, d): GQA by broadcasting

    if first_row >= end and state is not None and state.usable(batch, alpha, out.dtype):
        # Decoding: every row follows every image token; the prompt's sum is all it needs.
        weight = plan.inject * state.weight  # (B, q); 0 on rows not injected
        return _blend(out5, state.mean, weight, inplace, 0).flatten(2, 3)

    pi_span = spread(plan, first, end, value.dtype)  # (B, n) on the span's slots
    span_values = value[:, :, first:end]  # (B, Hkv, n, d), a view
    acc = torch.promote_types(value.dtype, torch.float32)
    prefix = None
    if hi > lo:
        # Rows inside / between images: prefix sums over the span (fp32 for half precision).
        prefix = (pi_span.to(acc)[:, None, :, None] * span_values.to(acc)).cumsum(2)  # (B, Hkv, n, d)
        image_sum = prefix[:, :, -1]
    else:
        image_sum = torch.matmul(pi_span[:, None, None, :], span_values).squeeze(2).to(acc)  # (B, Hkv, d)
    mass = pi_span.to(acc).sum(-1)  # (B,)
    mean = (image_sum / mass.clamp_min(torch.finfo(acc).tiny)[:, None, None]).to(out.dtype)[:, None, :, None]
    full_weight = blend_weight(mass[:, None], alpha).to(out.dtype)  # (B, 1)
    if state is not None:
        state.mean, state.weight, state.alpha = mean.detach(), full_weight.detach(), alpha

    # Rows before the sample's first image token see none of the map, rows after its last
    # see all of it; rows in the window are blended below from their own prefix sums.
    sees_all = plan.rows >= plan.positions[:, :1]  # (B, q)
    if hi > lo:
        sees_all[:, lo - first_row : hi - first_row] = False
    skip = min(max(plan.rows_from - first_row, 0), q_len)  # leading rows no weight reaches
    new = _blend(out5, mean, (plan.inject & sees_all) * full_weight, inplace, skip)
    if hi > lo:
        rows = slice(lo - first_row, hi - first_row)
        part_mass = pi_span.to(acc).cumsum(-1)[:, lo - first : hi - first]  # (B, w)
        part_sum = prefix[:, :, lo - first : hi - first].transpose(1, 2)[:, :, :, None]  # (B, w, Hkv, 1, d)
        part_mean = part_sum / part_mass.clamp_min(torch.finfo(acc).tiny)[..., None, None, None]
        part_weight = plan.inject[:, rows] * blend_weight(part_mass, alpha)
        # The main blend left these rows untouched (weight 0); `new` is fresh or `out` itself.
        new[:, rows] = _blend(out5[:, rows], part_mean.to(out.dtype), part_weight.to(out.dtype), False, 0)
    return new.flatten(2, 3)


def blend_weight(mass: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha m / ((1 - alpha) + alpha m)``: the share of ``c / m`` in an injected row (0 where ``m = 0``)."""
    return alpha * mass / ((1.0 - alpha) + alpha * mass).clamp_min(torch.finfo(mass.dtype).tiny)


def _blend(
    out5: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor, inplace: bool, skip: int
) -> torch.Tensor:
    """``out5 + weight * (mean - out5)`` in one pass; out5 ``(B, q, Hkv, G, d)``, weight ``(B, q)``.

    In place, the first ``skip`` rows (weight 0 there) are not touched at all.
    """
    weight = weight[:, :, None, None, None]
    if inplace:
        out5[:, skip:].lerp_(mean, weight[:, skip:])
        return out5
    return torch.lerp(out5, mean, weight)


def _derived_span(positions: torch.Tensor, kv_len: int) -> tuple[int, int]:
    """``(first, end)`` kv slots of the image tokens (entries ``>= kv_len`` are padding); one host sync."""
    real = positions[positions < kv_len]
    if real.numel() == 0:
        return 0, 0
    first, last = torch.stack([real.min(), real.max()]).tolist()
    return first, last + 1


def spread(plan: InjectionPlan, first: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, end - first)``: pi on kv slots ``first .. end - 1`` (0 off the image; padding entries carry 0)."""
    slots = (plan.positions - first).clamp(0, end - first - 1)
    zeros = torch.zeros(plan.pi.shape[0], end - first, device=plan.pi.device, dtype=dtype)
    return zeros.scatter_add(1, slots, plan.pi.to(dtype))


def visibility(attention_mask: torch.Tensor | None, rows: torch.Tensor, kv_len: int) -> torch.Tensor:
    """``(B or 1, 1, q_len, kv_len)`` bool: which key each query row may attend to."""
    if attention_mask is None:
        # transformers passes no mask when nothing is padded: plain causal.
        return (torch.arange(kv_len, device=rows.device)[None, None, :] <= rows[:, :, None])[:, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive eager mask


def materialised_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    plan: InjectionPlan,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference injection: builds ``A``, mixes in ``pi~``, masks and renormalises.

    query ``(B, Hq, q, d)``, key/value ``(B, Hkv, kv, d)``. Returns the output
    ``(B, q, Hq, d)`` and the injected probabilities ``A'`` ``(B, Hq, q, kv)``.
    """
    groups = query.shape[1] // key.shape[1]
    kv_len = key.shape[2]
    acc = torch.promote_types(query.dtype, torch.float32)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query.to(acc), k.to(acc).transpose(2, 3)) * scaling
    visible = visibility(attention_mask, plan.rows, kv_len)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows that see nothing (fully padded)

    pi_full = torch.zeros(query.shape[0], kv_len, device=query.device, dtype=acc)
    pi_full = pi_full.scatter_add(1, plan.positions.clamp(max=kv_len - 1), plan.pi.to(acc))
    mixed = (1.0 - plan.alpha) * probs + plan.alpha * pi_full[:, None, None, :]
    mixed = mixed * visible
    injected = mixed / mixed.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    # Rows that see no image token have m_i = 0; renormalising returns A, but keep them exact.
    sees_image = (pi_full[:, None, None, :] * visible).sum(-1) > 0  # (B, 1 or Hq, q)
    use = plan.inject[:, None, :] & sees_image
    weights = torch.where(use[..., None], injected, probs)
    if dropout > 0.0 and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    out = torch.matmul(weights, v.to(acc)).transpose(1, 2).contiguous().to(query.dtype)
    return out, weights.to(query.dtype)


# --------------------------------------------------------------------------- backends
AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

#: Base backends VIF can sit on, by transformers' name.
BASE_BACKENDS: dict[str, tuple[AttentionFn, Callable[..., Any]]] = {
    "sdpa": (sdpa_attention_forward, sdpa_mask),
    "eager": (eager_attention_forward, eager_mask),
}


def vif_name(base: str) -> str:
    # Never put "flash" in the name: transformers switches behaviour on that substring.
    return f"vif_{base}"


def _make_attention(base: str) -> AttentionFn:
    base_fn = BASE_BACKENDS[base][0]

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        source: PlanSource | None = getattr(module, PLAN_ATTRIBUTE, None)
        plan = None if source is None else source.plan_for(module.layer_idx, query.shape[2], key.shape[2])
        probe = getattr(module, PROBE_ATTRIBUTE, None)
        if probe is not None:
            probe(module, query, key, attention_mask, plan)
        if plan is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        # An eager base builds the matrix anyway: use the reference, which also returns A'.
        if source.materialised or base == "eager":
            return materialised_attention(
                module,
                query,
                key,
                value,
                attention_mask,
                plan,
                scaling=kwargs.get("scaling"),
                dropout=kwargs.get("dropout", 0.0),
            )
        out, weights = base_fn(module, query, key, value, attention_mask, **kwargs)
        # Without autograd the blend goes into the backend's fresh output: no copy of it.
        return fused_correction(out, value, plan, inplace=not torch.is_grad_enabled()), weights

    attention.__name__ = f"{vif_name(base)}_attention_forward"
    return attention


def register_attention_functions() -> None:
    """Registers ``vif_sdpa`` / ``vif_eager`` (+ their mask functions) with transformers. Idempotent."""
    for base, (_, mask_fn) in BASE_BACKENDS.items():
        name = vif_name(base)
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_attention(base))
            AttentionMaskInterface.register(name, mask_fn)
