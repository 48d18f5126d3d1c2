"""Injecting the importance map into attention (spec section 6), one function per base backend.

At an injection layer, for every injected query row ``i`` (non-vision text rows, or
all rows for the Full-Seq ablation), with ``A`` the ordinary attention probabilities
and ``pi~`` the importance map scattered onto the image-token columns:

    A' = row_normalise(visible * ((1 - alpha) * A + alpha * pi~))

Two ways to compute it:

* :func:`fused_correction` - the exact closed form on top of any base backend's output
  ``O = A V``::

      O'_i = ((1 - alpha) O_i + alpha * sum_{j in V, j visible to i} pi_j V_j) / ((1 - alpha) + alpha m_i)

  where ``m_i`` is the pi-mass visible to row ``i``. Image tokens are visible to a row
  exactly when they precede it (they are never padding), so the visible sums are
  prefix sums along the kv axis of ``pi_j V_j`` at prefill, and one matrix-vector product
  over the cached values of the image span when decoding (``O(n_vision x head_dim)`` per
  KV head for one image per sample); never a ``(q_len x kv_len)`` matrix.
* :func:`materialised_attention` - the obviously correct reference that builds ``A``,
  mixes, masks and renormalises it, and returns ``A'`` as the attention weights.

The attention functions registered with transformers (``vif_sdpa``, ``vif_eager``) look
up the :class:`InjectionPlan` for the calling layer on the attention module itself
(attribute set by :class:`vif.VIFModel`), so two models in one process never share state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
class InjectionPlan:
    """What one injected layer needs for one attention call.

    pi: ``(B, Nv)`` float32 importance per image token, 0 on padding entries.
    positions: ``(B, Nv)`` sequence (= kv-slot) index of each image token, ascending,
        padding entries past every row.
    rows: ``(B, q_len)`` sequence index of each query row.
    inject: ``(B, q_len)`` bool, rows that receive the map.
    alpha: mixing weight.
    span: ``(first, end)`` kv slots holding every image token of the batch (``None``: all
        slots). Known once per prompt, it lets the fused path read only those values.
    """

    pi: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    inject: torch.Tensor
    alpha: float
    span: tuple[int, int] | None = None


class PlanSource(Protocol):
    """Implemented by the VIF runtime: the plan for a layer's call, or None to run the base."""

    materialised: bool

    def plan_for(self, layer_idx: int, q_len: int, kv_len: int) -> InjectionPlan | None: ...


# --------------------------------------------------------------------------- the math
def fused_correction(out: torch.Tensor, value: torch.Tensor, plan: InjectionPlan) -> torch.Tensor:
    """Applies the closed form to a base backend's output.

    Extra work per KV head: a prefix sum of ``pi_j V_j`` along the kv axis at prefill; when
    decoding, one matrix-vector product over the cached values of the image span
    ``plan.span`` (``O(n_vision x head_dim)`` for one image per sample).

    Args:
        out: ``(B, q_len, Hq, d)`` the base attention output ``O``.
        value: ``(B, Hkv, kv_len, d)`` values after the cache update (GQA not expanded).
        plan: the layer's :class:`InjectionPlan`; its rows must be the last ``q_len`` kv
            slots (true for every call with a dynamic cache, prefill or decode).

    Returns:
        ``(B, q_len, Hq, d)`` in ``out``'s dtype; rows not injected are returned bit-exact.
    """
    batch, hkv, kv_len, dim = value.shape
    q_len, hq = out.shape[1], out.shape[2]
    acc = torch.promote_types(out.dtype, torch.float32)  # accumulate half precision in fp32
    alpha = plan.alpha
    if q_len == 1:
        # Decoding: the new row sits after every image token, so it sees the whole map; only
        # the cached values of the image span are read.
        first, end = plan.span if plan.span is not None else (0, kv_len)
        pi_span = spread(plan, first, min(end, kv_len), acc)  # (B, S)
        mass = pi_span.sum(-1, keepdim=True)  # (B, 1)
        mixed_v = torch.matmul(pi_span[:, None, None, :], value[:, :, first:end].to(acc))  # (B, Hkv, 1, d)
    else:
        # Prefill: row i (kv slot kv_len - q_len + i) sees the slots up to its own, so the
        # pi-weighted value sums it needs are prefix sums along the kv axis.
        pi_kv = spread(plan, 0, kv_len, acc)  # (B, kv)
        mass = pi_kv.cumsum(-1)[:, kv_len - q_len :]  # (B, q)
        mixed_v = (pi_kv[:, None, :, None] * value.to(acc)).cumsum(2)[:, :, kv_len - q_len :]

    mixed_v = mixed_v.repeat_interleave(hq // hkv, dim=1).transpose(1, 2)  # (B, q, Hq, d)
    denom = ((1.0 - alpha) + alpha * mass)[:, :, None, None]
    new = ((1.0 - alpha) * out.to(acc) + alpha * mixed_v) / denom
    inject = (plan.inject & (mass > 0))[:, :, None, None]
    return torch.where(inject, new.to(out.dtype), out)


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
        return fused_correction(out, value, plan), weights

    attention.__name__ = f"{vif_name(base)}_attention_forward"
    return attention


def register_attention_functions() -> None:
    """Registers ``vif_sdpa`` / ``vif_eager`` (+ their mask functions) with transformers. Idempotent."""
    for base, (_, mask_fn) in BASE_BACKENDS.items():
        name = vif_name(base)
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_attention(base))
            AttentionMaskInterface.register(name, mask_fn)
