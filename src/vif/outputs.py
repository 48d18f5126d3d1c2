"""Output folders of ``vif eval`` and ``vif diagnose``: never mix a new run with an old one.

A non-empty output folder is refused unless the user says ``--overwrite``; then only the
files the command itself writes (its ``OUTPUT_FILES`` patterns) are removed, right before
the new ones are written, and anything else in the folder is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import OutputDirError


def owned_files(folder: Path, patterns: Sequence[str]) -> list[Path]:
    """Files in ``folder`` matching ``patterns`` (``heatmaps/*.png`` style, relative to it)."""
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def check_output_folder(folder: str | Path, patterns: Sequence[str], overwrite: bool, option: str) -> None:
    """Refuses a non-empty ``folder`` unless ``overwrite`` (checked before any work starts)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{option} {str(folder)!r} is a file; give a folder.")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if overwrite:
        return
    ours = owned_files(folder, patterns)
    what = f"results of an earlier run ({', '.join(p.name for p in ours[:3])}...)" if ours else "other files"
    raise OutputDirError(
        f"{option} {str(folder)!r} is not empty: it holds {what}. Choose an empty or new folder, or pass "
        "--overwrite to replace this command's own files there (nothing else is removed)."
    )


def clear_owned(folder: str | Path, patterns: Sequence[str]) -> list[Path]:
    """Removes this command's own files from ``folder`` (and folders they leave empty); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = owned_files(folder, patterns)
    for path in removed:
        path.unlink()
    for parent in sorted({p.parent for p in removed}, key=lambda p: len(p.parts), reverse=True):
        if parent != folder and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return removed
