"""What every scorer file shares: the per-sample scorer type and the record-key check."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Scorer = Callable[[str, Mapping[str, Any]], dict[str, float]]
"""``score(prediction, record) -> {"accuracy": ..., ...}`` for one benchmark record."""


def require(record: Mapping[str, Any], key: str, metric: str, fix: str) -> Any:
    """``record[key]``, or a ValueError naming the metric, the key and how to fix it."""
    if key not in record:
        raise ValueError(f"metric {metric!r} needs record[{key!r}] but the record has none; {fix}")
    return record[key]
