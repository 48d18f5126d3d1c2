"""Which exceptions are a user's mistake, as opposed to a bug.

The command line prints a user's mistake as one line, ``error: <message>``, and exits
with status 2 (``--debug`` shows the traceback instead); anything else is a bug and
keeps its traceback. Each error class lives beside the code that raises it; this module
only lists them, plus the few that belong to no other module.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A command-line option, path or combination that cannot work; the message names the fix."""


class OutputDirError(UsageError):
    """An output folder that would overwrite something a user made."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception class whose message is meant for the user (imported on use: light modules only)."""
    from .adapter_io import VIFLoadError
    from .backbones.base import BackboneError
    from .config import VIFConfigError
    from .convert import ConversionError
    from .data.llava_format import BadImageError, LlavaFormatError
    from .eval.benchmark import BenchmarkError
    from .loading import ModelLoadError
    from .training.data import TrainingDataError
    from .training.recipe import RecipeError

    return (
        UsageError,
        VIFLoadError,
        BackboneError,
        VIFConfigError,
        BadImageError,
        LlavaFormatError,
        BenchmarkError,
        ModelLoadError,
        TrainingDataError,
        RecipeError,
        ConversionError,
    )
