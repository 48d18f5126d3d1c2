"""Shared by the benchmarks: run one configuration in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(script: str, argv: list[str], tag: str) -> dict:
    """Runs ``script *argv --worker tag`` in its own process and returns the JSON line it prints last.

    A process per configuration makes its peak memory (max RSS, or the CUDA allocator's peak)
    its own, not the high-water mark of whatever ran before it.
    """
    done = subprocess.run([sys.executable, script, *argv, "--worker", tag], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
