"""Per-layer numbers from the collected records (spec section 10), as JSON-ready dicts.

Definitions, for one sample and one layer, with ``a`` the attention of the chosen query
rows averaged over heads and rows (a distribution over the sequence):

* **visual attention ratio** ``r = sum_{j in V} a_j``: the mass on the image tokens;
* **visual attention distribution** ``p = a_V / r``: that mass renormalised over the
  sample's ``Nv`` image tokens (all its images together);
* **entropy** ``H(p) = -sum p_j ln p_j`` in nats, at most ``ln Nv`` (uniform; 6.356 for
  LLaVA-1.5's 576 tokens).

Per layer the summary reports the mean and standard deviation over samples of ``r`` and
``H``, and quantiles of the pooled values ``p_j`` of all samples (the violins).
**Deep-layer entropy** is the mean of the per-layer mean entropies over the last half of
the model's decoder layers (layers ``num_layers // 2 .. num_layers - 1`` that were
analysed): the paper reports 5.36 (LLaVA-1.5-7B) vs 3.23 (with VIF) for this quantity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .collect import Collection, SampleRecord

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def entropy(p: np.ndarray) -> float:
    """Shannon entropy (nats) of a distribution ``p`` ``(N,)``; zeros contribute 0."""
    p = p[p > 0].astype(np.float64)
    return float(-(p * np.log(p)).sum())


def distribution(record: SampleRecord, layer_pos: int) -> np.ndarray:
    """The renormalised visual attention ``p`` ``(Nv,)`` of one sample at analysed layer ``layer_pos``."""
    a = record.visual[layer_pos].astype(np.float64)
    return a / max(a.sum(), np.finfo(np.float64).tiny)


def distributions(collection: Collection, layer_pos: int) -> list[np.ndarray]:
    """Per sample, :func:`distribution` at analysed layer ``layer_pos``."""
    return [distribution(record, layer_pos) for record in collection.records]


def deep_layers(collection: Collection) -> list[int]:
    """The analysed layers in the last half of the model (see the module docstring)."""
    return [layer for layer in collection.layers if layer >= collection.num_layers // 2]


def summarise(collection: Collection) -> dict[str, Any]:
    """The JSON summary of one run; see the module docstring for the definitions."""
    records = collection.records
    counts = np.array([r.visual.shape[1] for r in records], dtype=np.float64)
    per_layer = []
    for pos, layer in enumerate(collection.layers):
        ratios = np.array([r.visual[pos].sum(dtype=np.float64) for r in records])
        dists = distributions(collection, pos)
        entropies = np.array([entropy(p) for p in dists])
        pooled = np.concatenate(dists) if dists else np.zeros(0)
        per_layer.append(
            {
                "layer": layer,
                "ratio": _mean(ratios),
                "ratio_std": _std(ratios),
                "entropy": _mean(entropies),
                "entropy_std": _std(entropies),
                "quantiles": {str(q): float(np.quantile(pooled, q)) for q in QUANTILES}
                if pooled.size
                else {},
            }
        )
    deep = deep_layers(collection)
    deep_rows = [row for row in per_layer if row["layer"] in deep]
    summary: dict[str, Any] = {
        "label": collection.label,
        "rows": collection.rows,
        "route": collection.route,
        "n_samples": len(records),
        "n_skipped_without_image": collection.skipped,
        "mean_rows_per_sample": _mean(np.array([r.n_rows for r in records], dtype=np.float64)),
        "num_layers": collection.num_layers,
        "layers": collection.layers,
        "n_image_tokens": {
            "min": int(counts.min()) if records else 0,
            "max": int(counts.max()) if records else 0,
            "mean": _mean(counts),
        },
        # ln Nv, the entropy of a uniform distribution over a sample's image tokens (mean over samples).
        "max_entropy": _mean(np.log(counts)) if records else None,
        "deep_layers": deep,
        "deep_entropy": _mean(np.array([row["entropy"] for row in deep_rows])) if deep_rows else None,
        "deep_ratio": _mean(np.array([row["ratio"] for row in deep_rows])) if deep_rows else None,
        "per_layer": per_layer,
        "vif": None,
    }
    if collection.injection_layers:
        importance_entropy = {}
        for d in collection.injection_layers:
            maps = [r.importance[d] for r in records if d in r.importance]
            importance_entropy[str(d)] = _mean(np.array([entropy(m) for m in maps])) if maps else None
        summary["vif"] = {
            "injection_layers": collection.injection_layers,
            "alpha": collection.alpha,
            "importance_entropy": importance_entropy,
        }
    return summary


def difference(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other - base`` for the headline numbers and each layer both analysed."""
    base_rows = {row["layer"]: row for row in base["per_layer"]}
    per_layer = [
        {
            "layer": row["layer"],
            "ratio": _sub(row["ratio"], base_rows[row["layer"]]["ratio"]),
            "entropy": _sub(row["entropy"], base_rows[row["layer"]]["entropy"]),
        }
        for row in other["per_layer"]
        if row["layer"] in base_rows
    ]
    return {
        "deep_entropy": _sub(other["deep_entropy"], base["deep_entropy"]),
        "deep_ratio": _sub(other["deep_ratio"], base["deep_ratio"]),
        "per_layer": per_layer,
    }


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def _std(x: np.ndarray) -> float | None:
    return float(x.std()) if x.size else None


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def violin_values(collection: Collection, max_points: int = 20_000, seed: int = 0) -> dict[int, np.ndarray]:
    """Layer -> the pooled ``Nv * p_j`` of all samples (1 = uniform share), float32.

    Scaling by ``Nv`` makes samples with different token counts comparable. At most
    ``max_points`` values per layer are kept (a seeded random subset; the quantiles in
    the summary use all of them).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for pos, layer in enumerate(collection.layers):
        dists = distributions(collection, pos)
        values = np.concatenate([p * p.size for p in dists]) if dists else np.zeros(0)
        if values.size > max_points:
            values = rng.choice(values, max_points, replace=False)
        out[layer] = values.astype(np.float32)
    return out
