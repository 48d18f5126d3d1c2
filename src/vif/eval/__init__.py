"""Evaluation: metrics, local benchmark files (``vif eval``) and the lmms-eval plug-in.

* :mod:`vif.eval.metrics`: per-answer-style scoring (pure Python);
* :mod:`vif.eval.benchmark`: reading / validating local JSON(L) benchmark files;
* :mod:`vif.eval.generation`: batched left-padded greedy generation via the chat template;
* :mod:`vif.eval.runner`: :func:`evaluate` (base, base + VIF, or both);
* :mod:`vif.eval.lmms_model`: lmms-eval model classes (needs the optional lmms-eval).
"""

from .benchmark import BenchmarkError, BenchmarkSample, read_benchmark
from .metrics import METRICS, aggregate, get_metric
from .runner import evaluate, format_summary

__all__ = [
    "METRICS",
    "BenchmarkError",
    "BenchmarkSample",
    "aggregate",
    "evaluate",
    "format_summary",
    "get_metric",
    "read_benchmark",
]
